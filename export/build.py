"""`ldm-export build`: load -> export each component -> verify against torch -> fp16 -> bundle (atomic)."""
from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ldm_export import __version__
from ldm_export.runtime.bundle import FORMAT, FORMAT_VERSION, GENERIC_DEFAULTS, MANIFEST, sha256_file
from ldm_export.runtime.checks import cap_threads, resolve_seed
from ldm_export.runtime.errors import LdmExportError, overflow_fix
from ldm_export.zoo import AUTO_MODEL, DEFAULT_MODEL, ModelSpec, get_model

from .bundle_writer import check_out_dir, staging
from .precision import PRECISIONS

if TYPE_CHECKING:
    from ldm_export.calibration.int8 import Int8Config

log = logging.getLogger(__name__)

TARGETS = ("cpu", "cuda", "tensorrt")
# Optimum's model_index entries for ONNX Runtime pipelines by component kind, so its loader recognises the bundle.
_ORT_CLASSES = {"clip_text": "ORTModelTextEncoder", "unet": "ORTModelUnet", "vae_decoder": "ORTModelVaeDecoder",
                "vae_encoder": "ORTModelVaeEncoder"}


@dataclass
class BuildConfig:
    model: str = DEFAULT_MODEL
    precision: str = "fp32"
    weights: Path | None = None
    random_weights: bool = False
    seed: int = 0
    out: Path | None = None
    force: bool = False
    static_shape: bool = False
    trust_pickle: bool = False
    target: str = "cpu"
    threads: int | None = None
    verify_provider: str | None = None  # ONNX Runtime provider for verification; default: the target's
    no_half_vae: bool = False  # fp16 builds: keep the VAE decoder in fp32 (A1111's --no-half-vae)
    int8: "Int8Config | None" = None  # int8 builds: calibration and quantisation settings (None: the defaults)
    loras: tuple = ()  # LoraRef: fused into the weights before export (--lora FILE[:SCALE])
    vae_encoder: bool = False  # also export the VAE encoder (image-to-image, inpainting)
    fused_attention: bool = False  # cpu target: the UNet's attention as ONNX Runtime's MultiHeadAttention (low memory)
    sequential_cfg: bool = False  # static shapes: the denoiser at batch 1, CFG as two calls (SD3 on cuda: fused AdaLN)

    def component_precision(self, component: str, vae_config: dict | None = None) -> str:
        """fp32 for int8 builds (exported and verified in fp32; calibration/ then quantises the int8 components),
        for the VAE decoder with --no-half-vae or when the VAE's config says it overflows fp16 (diffusers'
        ``force_upcast``: SDXL's VAE), and for the VAE encoder (run once per edit, and as prone to overflow); the
        build's precision otherwise."""
        if self.precision == "int8" or component == "vae_encoder":
            return "fp32"
        if component == "vae_decoder" and (self.no_half_vae or (vae_config or {}).get("force_upcast")):
            return "fp32"
        return self.precision

    def components(self, spec) -> list[str]:
        """The components this build exports: the family's required ones, and the VAE encoder when asked for or when
        the UNet is an inpainting one (latents, mask, masked-image latents: it runs only on encoded images)."""
        from ldm_export.runtime.editing import is_inpainting_unet

        family = spec.family_def
        inpaint = is_inpainting_unet(spec.component_specs()[family.denoiser], family.latent_format(spec.configs).channels)
        return [c.name for c in spec.family_def.exported(("vae_encoder",) if self.vae_encoder or inpaint else ())]

    def resolved_verify_provider(self) -> str:
        # tensorrt-target graphs are standard ONNX ops: ONNX Runtime's CPU provider verifies them anywhere
        return self.verify_provider or ("cuda" if self.target == "cuda" else "cpu")

    def resolved_out(self) -> Path:
        if self.out:
            return Path(self.out)
        if self.model == AUTO_MODEL and self.weights is not None:  # named after the folder or file the weights are in
            from .folder_spec import folder_model_name

            weights = Path(self.weights)
            return Path(f"{folder_model_name(weights if weights.is_dir() else weights.with_suffix(''))}-{self.precision}")
        return Path(f"{self.model}-{self.precision}")


# (component, stage, detail) -> None; the CLI turns these into its progress display
Progress = Callable[[str, str, str], None]


def _noop(component: str, stage: str, detail: str = "") -> None:
    pass


def static_dims(spec: ModelSpec, component: str) -> dict[str, int]:
    """The dims of a ``--static-shape`` build (the family's: CFG's batch 2 for encoders and denoiser, 1 to decode)."""
    return spec.static_dims(component)


def validate(cfg: BuildConfig) -> ModelSpec:
    """Check everything that can be checked before loading weights; return the model spec."""
    if cfg.model == AUTO_MODEL:
        from .folder_spec import is_pipeline_folder, model_of_checkpoint, spec_from_folder

        if cfg.random_weights:
            raise LdmExportError(f"--model {AUTO_MODEL} reads the architecture from the weights given as --weights; "
                                 "for random weights name a zoo model with --model")
        if cfg.weights is None:
            raise LdmExportError(f"--model {AUTO_MODEL} reads the architecture from the weights: pass a diffusers "
                                 "pipeline folder or a single-file .safetensors checkpoint as --weights PATH")
        path = Path(cfg.weights).expanduser()
        if path.is_dir() or is_pipeline_folder(path):
            spec = spec_from_folder(path)
        else:  # a single file names a zoo model: resolved once (build validates again), the bundle still named after it
            cfg.out = cfg.resolved_out()
            cfg.model = model_of_checkpoint(path)
            spec = get_model(cfg.model)
    else:
        try:
            spec = get_model(cfg.model)
        except LdmExportError as e:
            raise LdmExportError(f"{e}; or {AUTO_MODEL}: the architecture the --weights say (a diffusers folder, a "
                                 ".safetensors checkpoint)") from None
    if cfg.precision not in PRECISIONS + ("int8",):
        raise LdmExportError(f"unknown precision '{cfg.precision}'; choose one of: {', '.join(PRECISIONS + ('int8',))}")
    if cfg.precision == "int8":
        from ldm_export.calibration.int8 import Int8Config, validate as validate_int8

        cfg.int8 = cfg.int8 or Int8Config()
        validate_int8(cfg.int8, spec.name, cfg.target, cfg.resolved_out())
    elif cfg.int8 is not None:
        raise LdmExportError("calibration and quant-level options apply to int8 builds: add --precision int8")
    if cfg.no_half_vae and cfg.precision != "fp16":
        raise LdmExportError("--no-half-vae keeps the VAE decoder in fp32 in an fp16 build; it needs --precision fp16")
    if cfg.target not in TARGETS:
        raise LdmExportError(f"unknown target '{cfg.target}'; choose one of: {', '.join(TARGETS)}")
    if cfg.fused_attention and (cfg.target != "cpu" or spec.unet is None):
        raise LdmExportError("--fused-attention puts ONNX Runtime's CPU attention into a UNet's --target cpu graph; "
                             + ("--target cuda fuses attention already and tensorrt fuses its own" if cfg.target != "cpu"
                                else f"{spec.name} has no UNet"))
    if cfg.sequential_cfg:
        fam = spec.family_def
        if fam.denoiser != "transformer":
            raise LdmExportError(f"--sequential-cfg is for SD3-class transformers (their fused AdaLN modulation); "
                                 f"'{spec.name}' is a U-Net, which a static bundle runs at CFG's batch 2: for half its "
                                 "memory, build without --static-shape and run `generate --cfg-mode sequential` or --low-memory")
        if fam.component(fam.denoiser).static_batch == 1:
            raise LdmExportError(f"--sequential-cfg changes nothing for '{spec.name}': its transformer runs at batch 1 "
                                 "already (no CFG batch); leave the flag out")
        if not cfg.static_shape:
            raise LdmExportError("--sequential-cfg fixes the denoiser's batch at 1 in a --static-shape build; add "
                                 "--static-shape (a dynamic-shape bundle takes any batch: `generate --cfg-mode sequential`)")
    if cfg.vae_encoder and not any(c.name == "vae_encoder" for c in spec.family_def.components):
        raise LdmExportError(f"--vae-encoder adds the VAE encoder for image-to-image and inpainting, which the "
                             f"{spec.family_def.name} family of '{spec.name}' does not do yet; editing runs on the U-Net "
                             "families (SD 1.x/2.x, SDXL)")
    if cfg.loras:
        from .lora import check_lora_model

        check_lora_model(spec.name, spec.unet is not None)
    from ldm_export.kernels import disabled_kinds

    disabled_kinds()  # a misspelt LDM_EXPORT_DISABLE_KERNELS fails here, before any work
    if cfg.weights is not None and cfg.random_weights:
        raise LdmExportError("give either --weights PATH or --random-weights, not both")
    if cfg.weights is None and not cfg.random_weights and spec.embedded_weights is None:
        raise LdmExportError(f"model '{spec.name}' needs weights: pass --weights PATH (a diffusers folder or a .safetensors "
                             "checkpoint) or --random-weights for the real architecture with random weights")
    from . import onnx_export

    onnx_export.check_verify_provider(cfg.resolved_verify_provider())  # --target cuda on a machine without the provider
    check_out_dir(cfg.resolved_out(), cfg.force, cfg.weights)
    cfg.threads = cap_threads(cfg.threads)
    if cfg.seed == -1:  # as generate takes it: a random seed, recorded in the manifest (the bundle can be made again)
        cfg.seed = resolve_seed(-1)
        log.warning("--seed -1: building with seed %d", cfg.seed)
    else:
        try:
            cfg.seed = resolve_seed(cfg.seed)
        except LdmExportError as e:
            raise LdmExportError(f"--{e}") from None
    return spec


def build(cfg: BuildConfig, progress: Progress = _noop) -> dict:
    """Build the bundle described by ``cfg``; return its manifest. Leaves no bundle if anything fails."""
    import torch

    from ldm_export import kernels

    from . import models as M
    from . import onnx_export as X
    from .dit_export import sample_inputs
    from .dit_models import export_patches as dit_export_patches
    from .dit_models import register_onnx_symbolics
    from .dit_precision import component_fp16_policy, convert_fp16_with
    from .weights import load_weights

    spec = validate(cfg)
    out = cfg.resolved_out()
    _check_host_memory(spec, cfg.weights)
    progress("weights", "loading", str(cfg.weights or ("random" if cfg.random_weights else "embedded")))
    weights_path = cfg.weights
    given = Path(cfg.weights).expanduser() if cfg.weights is not None else None  # the user's --weights
    embedded = weights_path is None and not cfg.random_weights
    if embedded:
        weights_path = embedded_weights_path(spec)
        if not weights_path.exists():
            raise LdmExportError(f"the embedded weights of '{spec.name}' are not installed ({weights_path}); train "
                                 "and install them (docs/dit.md), or pass --weights PATH or --random-weights")
    loaded = load_weights(spec, weights_path, random_weights=cfg.random_weights, seed=cfg.seed,
                          trust_pickle=cfg.trust_pickle)
    if given is not None and cfg.model != AUTO_MODEL and given.is_dir():
        from .folder_spec import with_folder_scheduler

        # its weights' prediction type, shift, ...: once the folder loaded as this model (a folder of another pipeline
        # is refused first, without a warning about its scheduler)
        spec = with_folder_scheduler(spec, given)
    _check_t5_tokenizers(spec, loaded)  # before the exports: a bad file would otherwise fail at the first generate
    if loaded.source != "random":
        _check_finite(loaded.modules)
    modules = loaded.modules
    loras = _fuse_loras(modules, cfg, spec)
    torch.set_grad_enabled(False)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    specs = spec.component_specs()
    family = spec.family_def
    manifest: dict = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": spec.name, "family": spec.family, "description": spec.description,
            "resolution": spec.resolution, "vae_scale_factor": spec.vae_scale_factor,
            "latent_scale": float(modules[family.vae_module].config.scaling_factor),
            "latent_channels": spec.vae["latent_channels"], "max_length": spec.max_length,
            "pad_token": _pad_token(spec),
            "defaults": {**GENERIC_DEFAULTS, **spec.defaults},
            "modules": {m.name: _module_config(modules[m.name]) for m in family.modules},
        },
        "weights": {**(embedded_weights_info(spec, loaded) if embedded else
                       {"source": loaded.source, "sha256": loaded.sha256, "seed": loaded.seed,
                        # the name alone: a full path would name the build machine's folders
                        "path": Path(weights_path).name if weights_path and loaded.source != "random" else None}),
                    # where `ldm-export lora` appends its own: inspect shows them, in the order they were fused
                    **({"loras": loras} if loras else {})},
        "target": cfg.target, "static_shape": cfg.static_shape, "verify_provider": cfg.resolved_verify_provider(),
        **({"fused_attention": True} if cfg.fused_attention else {}),
        **({"sequential_cfg": True} if cfg.sequential_cfg else {}),
        "components": {}, "files": {},
        "tools": _tool_versions(),
    }
    with staging(out, cfg.force, cfg.weights) as stage, kernels.cpu_kernels(("attention",) if cfg.fused_attention else ()):
        components = cfg.components(spec)
        for component in components:
            cspec = specs[component]
            dims = static_dims(spec, component)
            if cfg.sequential_cfg and component == family.denoiser:
                dims["batch"] = 1  # CFG as two calls: the runtime splits a batch of 2 for a static batch-1 engine
            batch = int(dims["batch"]) if cfg.static_shape else None
            if cfg.static_shape:
                cspec = cspec.static(dims)
            folder = stage / component
            folder.mkdir()
            wrapper = M.wrap(component, modules, family)
            decl = family.component(component)
            feeds = sample_inputs(decl.kind, cspec, dims, cfg.seed, spec.configs.get(decl.module, {}),
                                  family.latent_format(spec.configs))
            progress(component, "torch reference", "")
            try:
                reference = X.torch_outputs(wrapper, cspec, feeds)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # the model itself fails: say which
                raise LdmExportError(
                    f"{component}: the PyTorch model fails on sample inputs of its own spec ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:200]}); its config is inconsistent or of a variant ldm-export does "
                    "not export (run with --debug for the traceback)") from exc
            progress(component, "export", "")
            register_onnx_symbolics(X.OPSET)
            with dit_export_patches(decl.kind), kernels.export_patches(wrapper, component, cfg.target, batch):
                model = X.export_onnx(wrapper, cspec, stage, feeds, static=cfg.static_shape)
            model = kernels.rewrite(model, component, cfg.target, batch)
            initializers = _initializer_map(component, modules, model)
            path = folder / "model.onnx"
            files = X.save_onnx(model, path)
            del model
            gc.collect()
            progress(component, "verify fp32", "")
            report = {"fp32": X.verify(path, cspec, feeds, reference, "fp32", cfg.threads, cfg.resolved_verify_provider()).to_json()}
            _check(report["fp32"], component, "fp32")
            precision = cfg.component_precision(component, spec.configs[family.vae_module])
            scopes = family.fp32_scopes if component == family.denoiser else ()
            policy = component_fp16_policy(decl.kind, component, cfg.target, spec.configs, scopes) \
                if precision == "fp16" else None
            if precision == "fp16":
                progress(component, "fp16", "")
                model16 = convert_fp16_with(str(path), policy, component)
                kernels.dedupe_nodes(model16)  # the converter can emit one Cast twice (static sd15 UNet)
                for f in files:
                    f.unlink()
                files = X.save_onnx(model16, path)
                del model16
                gc.collect()
                cspec = cspec.with_dtype("float16", [t.name for t in (*cspec.inputs, *cspec.outputs)
                                                     if t.dtype == "float32" and t.name not in policy.keep_fp32_io])
                progress(component, "verify fp16", "")
                report["fp16"] = X.verify(path, cspec, feeds, reference, "fp16", cfg.threads, cfg.resolved_verify_provider()).to_json()
                _check(report["fp16"], component, "fp16")
            _write_json(folder / "config.json", _module_config(modules[family.component(component).module]))
            manifest["components"][component] = {
                "precision": precision, "spec": cspec.to_json(),
                "files": [str(f.relative_to(stage)) for f in files],
                "fp16_policy": policy.to_json() if precision == "fp16" else None, "kind": decl.kind,
                "kernels": kernels.describe(component, cfg.target),
                "verification": report,
                **({"initializers": initializers} if initializers else {}),
            }
            del wrapper, reference
            done = family.component(component).module
            if all(family.component(c).module != done for c in components if c not in manifest["components"]):
                modules.pop(done, None)  # no component left to trace from it: free its memory
            gc.collect()
            progress(component, "done", "")
        progress("bundle", "writing", "")
        _write_side_files(stage, spec, loaded, given)
        if cfg.precision == "int8":
            from ldm_export.calibration.int8 import quantize_stage

            quantize_stage(stage, manifest, cfg.int8, progress, cfg.threads)
        manifest["files"] = {str(p.relative_to(stage)): {"sha256": sha256_file(p), "size": p.stat().st_size,
                                                          "mtime": p.stat().st_mtime}
                             for p in sorted(stage.rglob("*")) if p.is_file()}
        _write_json(stage / MANIFEST, manifest)
    progress("bundle", "done", str(out))
    return manifest


def _fuse_loras(modules: dict, cfg: BuildConfig, spec) -> list[dict]:
    """Fuse ``--lora`` files into the loaded modules (diffusers' loaders, PEFT's merge); what the manifest records."""
    if not cfg.loras:
        return []
    from .lora import apply_loras

    return apply_loras(modules, cfg.loras, spec.name)


def _initializer_map(component: str, modules: dict, model) -> dict:
    """torch parameter -> ONNX initializer of the components a LoRA adapts (``ldm-export lora`` reads it)."""
    if component not in ("unet", "text_encoder", "text_encoder_2") or component not in modules:
        return {}
    from .lora import initializer_map

    return initializer_map(modules[component], model)


def embedded_weights_path(spec: ModelSpec) -> Path:
    """The diffusers folder shipped inside the package for ``spec`` (the embedded demo model)."""
    import ldm_export

    return Path(ldm_export.__file__).resolve().parent / spec.embedded_weights


def embedded_weights_info(spec: ModelSpec, loaded) -> dict:
    # no path: it would name this machine's site-packages; the model name finds the weights anywhere
    return {"source": "embedded", "model": spec.name, "sha256": None, "seed": None, "path": None,
            "files": dict(loaded.files)}


def _check(report: dict, component: str, precision: str) -> None:
    if report["passed"]:
        return
    worst = min(report["outputs"].items(), key=lambda kv: kv[1]["cosine"] if kv[1]["cosine"] == kv[1]["cosine"] else -2)
    name, r = worst
    bad_ref = next((n for n, o in report["outputs"].items() if not math.isfinite(o["ref_max_abs"])), None)
    if bad_ref is not None:
        raise LdmExportError(f"{component}: the PyTorch model's own output '{bad_ref}' holds NaN/Inf on sample inputs; "
                             "its weights are damaged or out of range: check the checkpoint, no bundle was written")
    if precision == "fp16" and r["cosine"] != r["cosine"]:  # the graph's output holds NaN/Inf where torch's is finite
        raise LdmExportError(
            f"{component} overflows fp16 with these weights: its output '{name}' holds NaN/Inf where PyTorch's fp32 "
            f"output is finite (largest value {r['ref_max_abs']:.3g}); {overflow_fix(component, precision)}, no bundle "
            "was written")
    raise LdmExportError(
        f"verification failed: {component} {precision} output '{name}' has cosine {r['cosine']:.6f} against torch "
        f"(threshold {report['cosine_threshold']}), max abs error {r['max_abs']:.3g}; the export is wrong, no bundle was written"
    )


def _pad_token(spec: ModelSpec) -> str:
    return spec.family_def.pad_token


def _module_config(mod) -> dict:
    """A module's config as its ``config.json`` has it (transformers' ``to_dict``, diffusers' frozen dict), without
    ``_name_or_path``: that is the folder the weights were read from, a path of the build machine."""
    if hasattr(mod.config, "to_dict"):
        return {k: v for k, v in mod.config.to_dict().items() if k != "_name_or_path"}
    return {"_class_name": type(mod).__name__, **{k: v for k, v in dict(mod.config).items() if not k.startswith("_")}}


def _parameter_count(spec: ModelSpec) -> int:
    import torch

    with torch.device("meta"):
        from .models import build_module

        return sum(p.numel() for m in spec.family_def.modules for p in build_module(spec, m.name).parameters())


def _check_host_memory(spec: ModelSpec, weights: str | Path | None = None) -> None:
    """Refuse, before minutes of loading, a model whose fp32 weights alone (what the build holds while it traces; it
    peaks higher) exceed the memory and swap this machine has free: the build could only end killed. Where the
    ``weights`` folder's own configs describe a model that would fit, the named ``--model`` is the mistake: said so."""
    from ldm_export.runtime.checks import available_memory, available_swap

    available = available_memory()
    if available is None or os.environ.get("LDM_EXPORT_NO_MEMORY_CHECK") == "1":
        return
    available += available_swap()
    params = _parameter_count(spec)
    if 4 * params > available and weights is not None and spec.name != AUTO_MODEL:
        from .folder_spec import is_pipeline_folder, spec_from_folder

        folder = Path(weights).expanduser()
        try:
            own = spec_from_folder(folder) if is_pipeline_folder(folder) else None
            own_params = _parameter_count(own) if own is not None else None
        except Exception:  # a folder --model auto cannot read: the loader names what is wrong with it later
            own_params = None
        if own_params is not None and own_params != params and 4 * own_params <= available:
            raise LdmExportError(f"--model {spec.name} ({params / 1e9:.2f} B parameters) is not the model in {folder}, "
                                 f"whose configs describe {own_params / 1e9:.3g} B parameters ({own.family_def.name} "
                                 "family): pass the --model these weights belong to, or --model auto to build the "
                                 "folder's own architecture")
    if 4 * params > available:
        raise LdmExportError(f"{spec.name} has {params / 1e9:.2f} B parameters: {4 * params / 1e9:.1f} GB as the fp32 "
                             f"weights the build holds (it peaks higher), more than the {available / 1e9:.1f} GB of "
                             "memory and swap free here; build on a machine with more memory (where this count is "
                             "wrong, LDM_EXPORT_NO_MEMORY_CHECK=1 skips it)", exit_code=3)


def _write_side_files(stage: Path, spec: ModelSpec, loaded=None, weights: Path | None = None) -> None:
    from ldm_export.runtime.tokenizer import write_tokenizer_files

    family = spec.family_def
    index = {k: v for k, v in spec.model_index().items() if k not in {m.name for m in family.modules}}
    for comp in family.exported(("vae_encoder",)):
        if not (stage / comp.name).is_dir():
            continue
        index[comp.name] = ["optimum", _ORT_CLASSES.get(comp.kind, "ORTModel")]
    _write_json(stage / "model_index.json", index)
    (stage / "scheduler").mkdir()
    import diffusers
    _write_json(stage / "scheduler" / "scheduler_config.json", {**spec.scheduler, "_diffusers_version": diffusers.__version__})
    classes = dict(zip(family.tokenizers, family.tokenizer_classes))
    for folder, pad in family.tokenizer_pads().items():
        if classes.get(folder) == "T5TokenizerFast":
            _write_t5_tokenizer(stage / folder, (getattr(loaded, "tokenizer_dirs", None) or {}).get(folder),
                                spec.configs[family.text_encoders[family.tokenizers.index(folder)]]["vocab_size"])
        else:
            write_tokenizer_files(stage / folder, pad_token=pad)
            source = (getattr(loaded, "tokenizer_dirs", None) or {}).get(folder) or (
                weights / folder if weights is not None and weights.is_dir() else None)
            if source is not None and source.is_dir():
                _copy_added_tokens(stage / folder, source,
                                   spec.configs[family.text_encoders[family.tokenizers.index(folder)]])


def _copy_added_tokens(dest: Path, source: Path, encoder_config: dict) -> None:
    """A fine-tune's added CLIP tokens (textual inversion: ``<cat-toy>``), which the folder's text encoder embeds past
    CLIP's vocabulary: into the bundle's tokenizer, so that prompts naming them get their ids, as in diffusers."""
    from ldm_export.runtime.tokenizer import ADDED_TOKENS_FILE, read_added_tokens

    base = len(json.loads((dest / "vocab.json").read_text(encoding="utf-8")))  # CLIP's own ids, before any added
    added = read_added_tokens(source, base)
    if not added:
        return
    vocab = int(encoder_config.get("vocab_size", base))
    if base + len(added) > vocab:
        raise LdmExportError(f"{source} adds {len(added)} tokens ({', '.join(list(added)[:3])}) but the text encoder "
                             f"embeds {vocab} ids, not {base + len(added)}: save the text encoder and its tokenizer "
                             "from the same pipeline (after load_textual_inversion)")
    _write_json(dest / ADDED_TOKENS_FILE, added)
    log.info("%s/: %d added tokens kept (%s)", dest.name, len(added), ", ".join(list(added)[:5]))


def _check_finite(modules: dict) -> None:
    """Refuse weights holding NaN or infinities (a damaged download): they would fail verification later as if the
    export were wrong, after minutes of work."""
    import torch

    for name, module in modules.items():
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise LdmExportError(f"the {name} weights hold NaN or infinite values (first: '{key}'); the checkpoint "
                                     "is damaged: download or save it again")


def _check_t5_tokenizers(spec: ModelSpec, loaded) -> None:
    """The T5 tokenizers a build copies from the weights' folder load, and their ids fit the encoder's vocabulary (an
    mT5/umT5 tokenizer beside T5-XXL gives ids past its embedding table: ONNX Runtime's Gather fails on them)."""
    from ldm_export.runtime.tokenizer_t5 import T5Tokenizer

    family = spec.family_def
    for folder, cls in zip(family.tokenizers, family.tokenizer_classes):
        if cls != "T5TokenizerFast":
            continue
        source = (getattr(loaded, "tokenizer_dirs", None) or {}).get(folder)
        if source is None:
            if loaded.source in ("random", "embedded"):
                continue  # a stand-in tokenizer is written for random weights (its ids are not T5's, as the weights)
            # real T5 weights with made-up ids would condition on garbage: refuse before any export
            raise LdmExportError(f"these weights bring no T5 tokenizer ({folder}/); put the model's {folder}/ folder "
                                 "(tokenizer.json, from the same release) beside the weights file, or pass the model's "
                                 "diffusers folder")
        if not (source / "tokenizer.json").is_file():
            raise LdmExportError(
                f"{source} has no tokenizer.json (the runtime reads T5's fast-tokenizer file); write it there with "
                f"transformers: python -c \"from transformers import T5TokenizerFast as T; "
                f"T.from_pretrained('{source}').save_pretrained('{source}')\"")
        tokens = T5Tokenizer(source).vocab_size  # a malformed file is refused here, in one line
        encoder = family.text_encoders[family.tokenizers.index(folder)]
        vocab = int(loaded.modules[family.component(encoder).module].config.vocab_size)
        if tokens > vocab:
            raise LdmExportError(f"{source}/tokenizer.json has {tokens} tokens but {encoder}'s vocabulary holds {vocab}; "
                                 "ids past it cannot be embedded: use the tokenizer that came with these weights")


def _write_t5_tokenizer(dest: Path, source: Path | None, vocab_size: int) -> None:
    """T5's fast-tokenizer files from the weights' folder, or a stand-in (random-weights builds: no T5 file here)."""
    import shutil

    from .t5_tokenizer import write_standin_t5_tokenizer

    if source is None:
        log.warning("%s: these weights bring no T5 tokenizer; writing a stand-in tokenizer (its ids are not T5's)",
                    dest.name)
        write_standin_t5_tokenizer(dest, vocab_size=min(1000, int(vocab_size)))
        return
    if not (source / "tokenizer.json").is_file():
        raise LdmExportError(f"{source} has no tokenizer.json; the runtime reads T5's fast-tokenizer file")
    dest.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / f).is_file():
            shutil.copyfile(source / f, dest / f)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _tool_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"ldm_export": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
