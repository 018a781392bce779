"""`ldm-export build --precision int8`: capture -> calibrate -> QDQ UNet -> quality report, inside the build's
staging folder (so a failed or interrupted int8 build leaves nothing, as every build)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ldm_export.runtime.errors import LdmExportError

from . import capture as C
from . import quantize as Q

log = logging.getLogger(__name__)

INT8_COMPONENTS = ("unet",)
# why the others stay floating point: a user asking for them gets this reason
_NOT_INT8 = {
    "text_encoder": "the text encoder runs once an image (no speed to win) and its LayerNorm/attention outliers "
                    "have not been measured safe in int8; it stays fp32",
    "vae_decoder": "the VAE decoder's last up-blocks overflow even fp16 on some models and its int8 quality has not "
                   "been measured; it stays fp32",
}


@dataclass
class Int8Config:
    prompts: Path | None = None  # one prompt a line; None: the file shipped for the embedded demo model
    size: int = 32  # prompts used for calibration (the first N of the file)
    steps: int = 20  # sampler steps per prompt; every step's UNet calls are recorded
    method: str = "percentile"  # ONNX Runtime calibrator for each step's ranges
    level: float = 2.5
    components: tuple[str, ...] = INT8_COMPONENTS
    format: str = "onnxruntime"  # QDQ flavour: onnxruntime (int32 biases, CPU kernels) or tensorrt (float biases)
    activation_type: str | None = None  # s8 or u8; default: u8 for onnxruntime (its fast x86 int8 kernels), s8 for tensorrt
    step_share: float = 1.0  # the first share of the steps whose ranges are combined (noisiest first)
    smoothquant: float | None = None  # SmoothQuant's alpha on the int8 Linear layers (0 < alpha <= 1); None: off
    sampler: str | None = None  # default: the bundle's
    guidance_scale: float = 7.5
    seed: int = 0
    cache: Path | None = None  # a folder for the captured inputs, reused by later builds of the same model
    quality_prompts: int = 4  # images for the PSNR against fp32
    quality_steps: int | None = None  # sampler steps for those images (default: ``steps``)
    adherence_prompts: int | None = None  # demo model: prompt cases for the adherence check (None: all 120; 0: skip)
    size_given: bool = False  # --calib-size was asked for: a prompt file shorter than it is warned about

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("size_given")
        d["prompts"] = str(self.prompts) if self.prompts else None
        d["cache"] = str(self.cache) if self.cache else None
        d["components"] = list(self.components)
        return d


# the models whose denoiser the capture drives: one text encoder, a text-to-image UNet on sample, timestep and
# encoder_hidden_states (SDXL's added conditioning, DiTs and inpainting UNets are not calibrated yet)
INT8_FAMILIES = ("sd1", "sd2")


def _check_model(model_name: str) -> None:
    from ldm_export.zoo import get_model

    try:
        spec = get_model(model_name)
    except LdmExportError:  # a bundle of a model this version does not know: the capture says what it lacks
        return
    if spec.family not in INT8_FAMILIES:
        raise LdmExportError(f"int8 is built for SD 1.x/2.x-style UNets (one text encoder; sample, timestep and "
                             f"encoder_hidden_states); {model_name} is a {spec.family} model ({', '.join(spec.components)}), "
                             "which calibration does not drive yet: build it with --precision fp16 or fp32")
    in_channels = (spec.unet or {}).get("in_channels", 4)
    if in_channels != spec.vae.get("latent_channels", 4):
        raise LdmExportError(f"int8 calibration samples text-to-image and {model_name}'s UNet takes {in_channels} input "
                             "channels (an inpainting UNet); build it with --precision fp16 or fp32")


def validate(cfg: Int8Config, model_name: str, target: str, out: Path | None = None) -> list[str]:
    """Check an int8 request before any work (``out``: the bundle folder the build writes); return the calibration
    prompts."""
    _check_model(model_name)
    if target != "cpu":
        raise LdmExportError("int8 builds write standard-op QDQ graphs (ONNX Runtime and TensorRT both take them): "
                             "use --target cpu" + (", with --int8-format tensorrt for `ldm-export engines`"
                                                   if target == "tensorrt" else ""))
    for comp in cfg.components:
        if comp in _NOT_INT8:
            raise LdmExportError(f"{comp} cannot be int8: {_NOT_INT8[comp]}; int8 applies to: {', '.join(INT8_COMPONENTS)}")
        if comp not in INT8_COMPONENTS:
            raise LdmExportError(f"unknown component {comp!r} for int8; int8 applies to: {', '.join(INT8_COMPONENTS)}")
    if not cfg.components:
        raise LdmExportError(f"no component to quantise; int8 applies to: {', '.join(INT8_COMPONENTS)}")
    cfg.level = Q.parse_level(cfg.level)
    if cfg.smoothquant is not None:
        from .smooth import parse_alpha

        cfg.smoothquant = parse_alpha(cfg.smoothquant)
        if cfg.level < 2:
            raise LdmExportError(f"--smoothquant smooths Linear layers and quant level {cfg.level:g} quantises convolutions "
                                 "only; use --quant-level 2, 2.5 or 3, or leave --smoothquant out")
    if cfg.method not in Q.METHODS:
        raise LdmExportError(f"unknown calibration method {cfg.method!r}; choose one of: {', '.join(Q.METHODS)}")
    if cfg.format not in Q.FORMATS:
        raise LdmExportError(f"unknown int8 format {cfg.format!r}; choose one of: {', '.join(Q.FORMATS)}")
    if cfg.activation_type is None:
        cfg.activation_type = "u8" if cfg.format == "onnxruntime" else "s8"
    if cfg.format == "tensorrt" and cfg.activation_type != "s8":
        raise LdmExportError("TensorRT takes symmetric int8 activations only: use s8 activations with --int8-format tensorrt")
    if cfg.activation_type not in Q.ACTIVATION_TYPES:
        raise LdmExportError(f"unknown activation type {cfg.activation_type!r}; choose one of: {', '.join(Q.ACTIVATION_TYPES)}")
    if not isinstance(cfg.steps, int) or not 1 <= cfg.steps <= 1000:
        raise LdmExportError(f"--calib-steps must be an integer from 1 to 1000, got {cfg.steps!r}")
    if cfg.quality_prompts < 0:
        raise LdmExportError(f"--quality-prompts must be 0 (no PSNR images) or more, got {cfg.quality_prompts}")
    if cfg.quality_steps is not None and cfg.quality_steps < 1:
        raise LdmExportError(f"the quality images need at least 1 sampler step, got {cfg.quality_steps}")
    if cfg.adherence_prompts is not None and cfg.adherence_prompts < 0:
        raise LdmExportError(f"--adherence-prompts must be 0 (skip the check) or more, got {cfg.adherence_prompts}; "
                             "leave it out for all 120 cases")
    prompts = C.read_prompts(cfg.prompts, cfg.size, warn_short=cfg.size_given)
    if cfg.cache is not None and out is not None:
        cache, bundle = Path(os.path.abspath(cfg.cache)), Path(os.path.abspath(out))
        if cache == bundle or bundle in cache.parents:  # the finished bundle is renamed into place over its folder
            raise LdmExportError(f"--calib-cache {cfg.cache} is inside the bundle folder {out}, which the build replaces "
                                 "whole; keep the cache outside it (e.g. beside it)")
    if cfg.cache is not None and Path(cfg.cache).exists():
        if not Path(cfg.cache).is_dir():
            raise LdmExportError(f"--calib-cache {cfg.cache} is not a folder; give a folder (made if missing)")
        if C.has_capture(cfg.cache):
            try:
                info = json.loads((Path(cfg.cache) / "capture.json").read_text())
            except (OSError, ValueError) as e:
                raise LdmExportError(f"calibration cache {cfg.cache} is damaged ({e}); delete it to capture anew") from None
            if not isinstance(info, dict) or not isinstance(info.get("model", {}), dict):
                raise LdmExportError(f"calibration cache {cfg.cache} is damaged (capture.json is not a capture "
                                     "manifest); delete it to capture anew")
            got = info.get("model", {}).get("name")
            if got != model_name:
                raise LdmExportError(f"calibration cache {cfg.cache} was captured for model {got!r}, this build is "
                                     f"{model_name!r}; use another --calib-cache folder or delete it")
            _check_cache_request(cfg, info, prompts)
            C.check_arrays(cfg.cache)
        elif any(Path(cfg.cache).iterdir()):
            raise LdmExportError(f"--calib-cache {cfg.cache} is a folder with other files and no capture; give an empty "
                                 "or new folder")
    if cfg.prompts is None and model_name != "demo" and model_name not in _WARNED_NO_PROMPTS:  # after the checks
        _WARNED_NO_PROMPTS.add(model_name)  # once: `build` validates twice (before torch is imported, then in build())
        log.warning("no --calib-prompts: calibrating %s on the prompt file shipped for the demo model (simple shapes "
                    "and colours); pass prompts like the ones you will generate with --calib-prompts FILE", model_name)
    return prompts


_WARNED_NO_PROMPTS: set = set()


def _check_cache_request(cfg: Int8Config, info: dict, prompts: list[str]) -> None:
    """Refuse a cache captured with other prompts, steps, seed, guidance or sampler than this build asks for: reusing
    it would calibrate on something else than the options say (and the manifest would record the cache's)."""
    from ldm_export.runtime.schedulers import canonical_sampler

    asked = {"prompts": prompts, "num_inference_steps": cfg.steps, "seed": cfg.seed, "guidance_scale": cfg.guidance_scale}
    if cfg.sampler is not None:
        asked["sampler"] = canonical_sampler(cfg.sampler)
    for key, want in asked.items():
        got = info.get(key)
        if key == "sampler" and isinstance(got, str):
            got = canonical_sampler(got)
        if got == want:
            continue
        if key == "prompts" and isinstance(got, list) and len(got) != len(prompts):
            what = f"{len(got)} prompts, this build asks for {len(prompts)} (--calib-prompts, --calib-size)"
        elif key == "prompts":
            what = "other prompts than this build's --calib-prompts"
        elif key == "num_inference_steps":
            what = f"{got!r} steps, this build asks for {want!r} (--calib-steps)"
        else:
            what = f"{key.replace('_', ' ')} {got!r}, this build asks for {want!r}"
        raise LdmExportError(f"calibration cache {cfg.cache} was captured with {what}; use another --calib-cache "
                             "folder, delete it, or repeat the options it was captured with")


Progress = Callable[[str, str, str], None]


def quantize_stage(stage: Path, manifest: dict, cfg: Int8Config, progress: Progress, threads: int | None = None) -> None:
    """Quantise the staged fp32 bundle's UNet in place: capture, calibrate, QDQ, quality report; updates
    ``manifest`` (precision, files, ``int8`` section). Writes only inside ``stage`` (and the capture cache)."""
    from ldm_export.runtime.bundle import MANIFEST
    from ldm_export.runtime.engine import OrtEngine
    from ldm_export.runtime.pipeline import Pipeline

    from . import report as R

    prompts = C.read_prompts(cfg.prompts, cfg.size)
    # the staged fp32 bundle, readable by the runtime (hashes come when the build writes the final manifest)
    files = {str(p.relative_to(stage)): {"sha256": "staged", "size": p.stat().st_size} for p in stage.rglob("*") if p.is_file()}
    (stage / MANIFEST).write_text(json.dumps({**manifest, "files": files}) + "\n")
    pipe = Pipeline.from_bundle(stage, threads=threads)
    identity = C.model_identity(pipe.bundle)
    side = pipe.resolution // pipe.vae_scale_factor
    uspec = pipe.bundle.spec("unet")
    ehs_dim = next(t for t in uspec.inputs if t.name == "encoder_hidden_states").shape[-1]
    expect = {"sample": [2, pipe.latent_channels, side, side], "encoder_hidden_states": [2, pipe.bundle.model["max_length"], ehs_dim]}
    if cfg.cache is not None and C.has_capture(cfg.cache):
        progress("unet", "int8 capture", f"from cache {cfg.cache}")
        cap = C.load_capture(cfg.cache, identity, expect)
    else:
        progress("unet", "int8 capture", f"{len(prompts)} prompts x {cfg.steps} steps")
        cap = C.capture_unet_inputs(pipe, prompts, cfg.steps, cfg.sampler, cfg.seed, cfg.guidance_scale,
                                    model_identity=identity)
        if cfg.cache is not None:
            C.save_capture(cap, cfg.cache)
    bundle, tokenizer = pipe.bundle, pipe.tokenizer
    del pipe  # its fp32 UNet session: an SD 1.5 UNet holds 3.4 GB, calibration needs the memory
    folder = stage / "unet"
    fp32_files = [stage / f for f in manifest["components"]["unet"]["files"]]
    tmp_out = folder / ".int8.onnx"
    smooth = f", SmoothQuant alpha {cfg.smoothquant:g}" if cfg.smoothquant is not None else ""
    progress("unet", "int8 calibrate + quantise", f"{cfg.method}, level {cfg.level:g}{smooth}, {len(cap.steps)} steps")
    qinfo = Q.quantize_unet(fp32_files[0], tmp_out, cap, cfg.method, cfg.level, cfg.format, cfg.activation_type,
                            cfg.step_share, table_out=folder / "int8_ranges.json", smoothquant=cfg.smoothquant)
    pipe = Pipeline.from_bundle(stage, threads=threads)
    progress("unet", "int8 quality", "")
    fp32_engine = pipe.engines["unet"]
    int8_engine = OrtEngine(tmp_out, uspec, threads=threads)
    quality: dict = {"components": {}}
    quality["components"]["unet"] = {"precision": "int8", **R.unet_sqnr(fp32_engine, int8_engine, cap)}
    for comp in pipe.bundle.components:
        if comp != "unet":
            quality["components"][comp] = {"precision": manifest["components"][comp]["precision"], "sqnr_db": None}
    if not all(v == v for v in [quality["components"]["unet"]["sqnr_db"]]):
        raise LdmExportError("the int8 UNet gives NaN; the calibration ranges are broken, no bundle was written")
    pipe8 = Pipeline(bundle, {**pipe.engines, "unet": int8_engine}, tokenizer=tokenizer)
    eval_prompts = C.read_prompts(cfg.prompts)[cfg.size:cfg.size + cfg.quality_prompts] or prompts[:cfg.quality_prompts]
    if cfg.quality_prompts:
        quality["image"] = R.image_psnr(pipe, pipe8, eval_prompts, cfg.quality_steps or cfg.steps, seed=1000)
    if manifest["model"]["name"] == "demo" and cfg.adherence_prompts != 0:
        progress("unet", "int8 adherence", "fp32 vs int8")
        quality["adherence"] = R.demo_adherence(pipe, pipe8, cfg.adherence_prompts)
    del pipe, pipe8, fp32_engine, int8_engine
    for f in fp32_files:
        f.unlink()
    files = _commit_graph(tmp_out, folder)
    comp = manifest["components"]["unet"]
    comp["precision"] = "int8"
    comp["files"] = [f"unet/{f.name}" for f in files]
    manifest["int8"] = {"components": list(cfg.components), "config": cfg.to_json(), "calibration": cap.info,
                        "ranges": "unet/int8_ranges.json", "quantisation": qinfo, "quality": quality}
    (stage / MANIFEST).unlink()
    log.info("int8 UNet: SQNR %.2f dB", quality["components"]["unet"]["sqnr_db"])


def _commit_graph(tmp_out: Path, folder: Path) -> list[Path]:
    """Move the quantised graph at ``tmp_out`` to ``folder/model.onnx``; a graph whose weights ONNX Runtime wrote
    beside it (an fp32 source over 2 GB, as SD 1.5's UNet) keeps them as one ``model.onnx_data`` (Optimum's name),
    with the graph's external-data locations rewritten to it. Returns the files, graph first."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from ldm_export.export.onnx_export import EXTERNAL_DATA

    model = onnx.load(str(tmp_out), load_external_data=False)
    tensors = [t for t in _all_tensors(model) if uses_external_data(t)]
    if not tensors:
        tmp_out.replace(folder / "model.onnx")
        return [folder / "model.onnx"]
    sources = {ExternalDataInfo(t).location for t in tensors}
    if len(sources) != 1:
        raise LdmExportError(f"the int8 UNet's weights came in {len(sources)} files; expected one, no bundle was written")
    (src,) = sources
    (folder / src).replace(folder / EXTERNAL_DATA)
    for t in tensors:  # the tensors' data are not loaded: rename the location entry in place
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = EXTERNAL_DATA
    onnx.save_model(model, str(folder / "model.onnx"))
    tmp_out.unlink()
    return [folder / "model.onnx", folder / EXTERNAL_DATA]


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


def quantize_bundle(src: Path, out: Path, cfg: Int8Config, force: bool = False, progress: Progress = lambda *a: None,
                    threads: int | None = None) -> dict:
    """An int8 bundle from an fp32 bundle of this project (no re-export): the same steps as
    ``build --precision int8`` after its export; written atomically to ``out``."""
    from ldm_export.export.build import _write_json
    from ldm_export.export.bundle_writer import check_out_dir, staging
    from ldm_export.runtime.bundle import MANIFEST, Bundle, sha256_file

    fp32 = Bundle.open(src)
    bad = [c for c in fp32.components if fp32.precision(c) != "fp32"]
    if bad:
        raise LdmExportError(f"{src} is not an fp32 bundle ({bad[0]} is {fp32.precision(bad[0])}); quantise an fp32 "
                             "bundle (`ldm-export build --precision fp32`)")
    if fp32.manifest.get("target", "cpu") != "cpu":
        raise LdmExportError(f"{src} is a {fp32.manifest.get('target')}-target bundle; int8 needs a --target cpu bundle")
    validate(cfg, fp32.model["name"], "cpu", out)
    if Path(out).resolve() == Path(src).resolve():
        raise LdmExportError("--out must differ from the fp32 bundle")
    check_out_dir(Path(out), force, source=Path(src))
    manifest = json.loads(json.dumps(fp32.manifest))
    manifest["files"] = {}
    manifest["int8_source"] = {"bundle": str(src), "created": fp32.manifest.get("created")}
    quantised = {f for c in cfg.components for f in fp32.manifest["components"][c]["files"]}
    for rel in sorted(quantised):  # a cut or replaced graph would fail later, named by its staging copy's path
        if not (Path(src) / rel).is_file() or (Path(src) / rel).stat().st_size != fp32.manifest["files"][rel]["size"]:
            raise LdmExportError(f"{Path(src) / rel} is missing or not the size its manifest records; the fp32 bundle "
                                 f"is damaged: check it with `ldm-export inspect {src}` and rebuild it")
    with staging(Path(out), force) as stage:
        for rel in fp32.manifest["files"]:
            if rel == MANIFEST:
                continue
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel in quantised:  # copied: ONNX refuses external data with several hard links (a link attack)
                shutil.copy2(src / rel, dst)
                continue
            try:
                os.link(src / rel, dst)  # the fp32 files stay untouched: the stage only drops its own links
            except OSError:
                shutil.copy2(src / rel, dst)
        quantize_stage(stage, manifest, cfg, progress, threads)
        manifest["files"] = {str(p.relative_to(stage)): {"sha256": sha256_file(p), "size": p.stat().st_size}
                             for p in sorted(stage.rglob("*")) if p.is_file()}
        _write_json(stage / MANIFEST, manifest)
    return manifest
