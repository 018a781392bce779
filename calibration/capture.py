"""Capture the UNet's inputs while the project's own sampler runs: the calibration data of int8 builds.

The recipe follows TensorRT's diffusion demo (NVIDIA Model Optimizer): real prompts, the real sampler with CFG
(batch 2: uncond + cond), every UNet call of each denoising step recorded with its step index, so activation
ranges can be taken per step and combined across steps.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ldm_export.runtime.errors import LdmExportError

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "demo_prompts.txt"
CAPTURE_VERSION = 1
_ARRAYS = "unet_inputs.npz"
_MANIFEST = "capture.json"


def read_prompts(path: str | Path | None, limit: int | None = None, warn_short: bool = False) -> list[str]:
    """Prompts from a text file, one a line (blank lines and lines starting with # skipped); the default file
    ships for the embedded demo model. The first ``limit``; ``warn_short``: warn (once) when the file has fewer."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    if path.is_dir():
        raise LdmExportError(f"calibration prompt file {path} is a folder; pass --calib-prompts FILE with one prompt a line")
    if path.exists() and not path.is_file():  # a pipe, e.g. --calib-prompts <(grep cat prompts.txt): read more than once
        raise LdmExportError(f"calibration prompt file {path} is not a regular file (a pipe or device); write the prompts "
                             "to a file and pass --calib-prompts FILE")
    if not path.is_file():
        raise LdmExportError(f"calibration prompt file {path} does not exist; pass --calib-prompts FILE with one prompt a line")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not part of a prompt
    except (OSError, UnicodeDecodeError) as e:
        raise LdmExportError(f"cannot read calibration prompt file {path}: {e}; give a UTF-8 text file, one prompt a line") from None
    prompts = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not prompts:
        raise LdmExportError(f"calibration prompt file {path} has no prompts; write one prompt a line")
    if limit is not None:
        if limit < 1:
            raise LdmExportError(f"--calib-size must be at least 1, got {limit}")
        if warn_short and limit > len(prompts) and (str(path), limit) not in _WARNED_SHORT:
            _WARNED_SHORT.add((str(path), limit))
            log.warning(
                f"--calib-size {limit} asks for more prompts than {path.name} holds: calibrating on its {len(prompts)}")
        prompts = prompts[:limit]
    return prompts


_WARNED_SHORT: set = set()


@dataclass
class Capture:
    """Recorded UNet calls: ``sample`` (N, B, C, h, w), ``timestep`` (N, ...) as fed, ``step`` (N,) the denoising step
    of each call, ``prompt`` (N,) the prompt index of each call; ``encoder_hidden_states`` (P, B, L, D) once per prompt."""

    sample: np.ndarray
    timestep: np.ndarray
    step: np.ndarray
    prompt: np.ndarray
    encoder_hidden_states: np.ndarray
    info: dict = field(default_factory=dict)  # prompts, steps, sampler, seed, guidance, shapes, model identity

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in np.unique(self.step))

    def feeds(self, index: int) -> dict[str, np.ndarray]:
        """The UNet feeds of recorded call ``index``."""
        return {"sample": self.sample[index], "timestep": np.asarray(self.timestep[index]),
                "encoder_hidden_states": self.encoder_hidden_states[self.prompt[index]]}

    def indices(self, step: int | None = None) -> list[int]:
        return [i for i in range(len(self.step)) if step is None or int(self.step[i]) == step]


class _Recorder:
    """An engine wrapper that records every feed the sampler loop gives the UNet (the engine protocol: spec + run)."""

    def __init__(self, engine):
        self.engine = engine
        self.spec = engine.spec
        self.calls: list[tuple[int, dict[str, np.ndarray]]] = []
        self.step = 0

    def run(self, feeds):
        self.calls.append((self.step, {k: np.array(v, copy=True) for k, v in feeds.items()}))
        return self.engine.run(feeds)


def capture_unet_inputs(pipe, prompts: Sequence[str], num_inference_steps: int = 20, scheduler: str | None = None,
            seed: int = 0, guidance_scale: float = 7.5, record_steps: Sequence[int] | None = None,
            model_identity: dict | None = None) -> Capture:
    """Run ``pipe`` (a runtime ``Pipeline``) once per prompt and record the UNet's inputs at ``record_steps``
    (default: every step); prompt i starts from seed + i."""
    from ldm_export.runtime.schedulers import a1111_name

    if not prompts:
        raise LdmExportError("no calibration prompts; give at least one")
    recorder = _Recorder(pipe.engines["unet"])
    pipe.engines["unet"] = recorder
    wanted = None if record_steps is None else set(int(s) for s in record_steps)
    samples, timesteps, steps, owners, ehs = [], [], [], [], []
    try:
        for p, prompt in enumerate(prompts):
            recorder.calls.clear()
            recorder.step = 0

            def on_step(i, n, x):
                recorder.step = i + 1

            pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed + p,
                 scheduler=scheduler, callback=on_step, return_latents=True)
            first = None
            for step, feeds in recorder.calls:
                if wanted is not None and step not in wanted:
                    continue
                if first is None:
                    first = feeds["encoder_hidden_states"]
                    ehs.append(first)
                elif not np.array_equal(feeds["encoder_hidden_states"], first):
                    raise LdmExportError("the UNet's text embeddings changed within one prompt's sampling; capture needs "
                                         "one conditioning per prompt")
                samples.append(feeds["sample"])
                timesteps.append(np.asarray(feeds["timestep"]))
                steps.append(step)
                owners.append(len(ehs) - 1)
            log.info("captured prompt %d/%d: %d UNet calls", p + 1, len(prompts), len(recorder.calls))
    finally:
        pipe.engines["unet"] = recorder.engine
    if not samples:
        raise LdmExportError(f"no UNet call was recorded at steps {sorted(wanted or [])}; the sampler ran "
                             f"{num_inference_steps} steps (0-based step indices)")
    sampler = scheduler or a1111_name(pipe.bundle.scheduler_config)
    shapes = {"sample": list(samples[0].shape), "timestep": list(timesteps[0].shape),
              "encoder_hidden_states": list(ehs[0].shape)}
    info = {"version": CAPTURE_VERSION, "prompts": list(prompts), "num_inference_steps": int(num_inference_steps),
            "recorded_steps": sorted(set(steps)), "sampler": sampler, "seed": int(seed),
            "guidance_scale": float(guidance_scale), "cfg_mode": pipe.cfg_mode, "shapes": shapes,
            "calls": len(samples), "model": dict(model_identity or {})}
    return Capture(np.stack(samples), np.stack(timesteps), np.asarray(steps, np.int32), np.asarray(owners, np.int32),
                   np.stack(ehs), info)


def model_identity(bundle) -> dict:
    """What a capture belongs to: model name, weights (source, hash or seed) and the UNet's input spec (a cache of
    another model or shape is refused). Not the graph's sha256: exports need not be byte-identical."""
    unet = bundle.manifest["components"]["unet"]
    weights = bundle.manifest.get("weights")
    if bundle.manifest.get("loras"):  # `build --lora` records its LoRAs beside the weights (`ldm-export lora`, inside)
        weights = {"weights": weights, "loras": bundle.manifest["loras"]}
    return {"name": bundle.model["name"],
            "weights": hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:16],
            "unet_inputs": unet["spec"]["inputs"]}


def save_capture(cap: Capture, folder: str | Path) -> Path:
    """Write the capture (arrays as .npz, the manifest as JSON) into ``folder``, atomically per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (".tmp-" + _ARRAYS)
    with open(tmp, "wb") as f:
        np.savez(f, sample=cap.sample, timestep=cap.timestep, step=cap.step, prompt=cap.prompt,
                 encoder_hidden_states=cap.encoder_hidden_states)
    tmp.replace(folder / _ARRAYS)
    (folder / (".tmp-" + _MANIFEST)).write_text(json.dumps(cap.info, indent=2) + "\n")
    (folder / (".tmp-" + _MANIFEST)).replace(folder / _MANIFEST)
    return folder


_KEYS = ("sample", "timestep", "step", "prompt", "encoder_hidden_states")


def _damaged_arrays(folder: Path, e: BaseException) -> LdmExportError:
    why = f"no array {e}" if isinstance(e, KeyError) else "cut short or not an array file"
    return LdmExportError(f"calibration cache {folder} is damaged ({_ARRAYS}: {why}); delete it to capture anew")


def _open_arrays(folder: Path):
    """The capture's .npz, its member list checked (cheap: the zip directory only); one line when it is damaged."""
    try:
        z = np.load(Path(folder) / _ARRAYS, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # cut short (no zip directory), or not a .npz
        raise _damaged_arrays(Path(folder), e) from None
    missing = [k for k in _KEYS if k not in getattr(z, "files", ())]
    if missing:
        if hasattr(z, "close"):
            z.close()
        raise _damaged_arrays(Path(folder), KeyError(missing[0]))
    return z


def check_arrays(folder: str | Path) -> None:
    """Refuse a cache whose arrays file is damaged, before a build that would reuse it does any work."""
    _open_arrays(Path(folder)).close()


def has_capture(folder: str | Path) -> bool:
    return (Path(folder) / _MANIFEST).is_file() and (Path(folder) / _ARRAYS).is_file()


def load_capture(folder: str | Path, expect_model: dict | None = None, expect_shapes: dict | None = None) -> Capture:
    """Read a capture written by :func:`save_capture`; refuse one of another model, weights or input shape."""
    folder = Path(folder)
    if not has_capture(folder):
        raise LdmExportError(f"{folder} holds no calibration capture ({_MANIFEST} + {_ARRAYS}); remove it or point "
                             "--calib-cache at an empty folder to capture anew")
    try:
        info = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise LdmExportError(f"calibration cache {folder} is damaged ({e}); delete it to capture anew") from None
    try:
        with _open_arrays(folder) as z:
            arrays = {k: z[k] for k in _KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a member cut short inside the archive
        raise _damaged_arrays(folder, e) from None
    if info.get("version") != CAPTURE_VERSION:
        raise LdmExportError(f"calibration cache {folder} has format version {info.get('version')}, this ldm-export "
                             f"writes {CAPTURE_VERSION}; delete it to capture anew")
    if expect_model is not None:
        got = info.get("model", {})
        for key in ("name", "weights", "unet_inputs"):
            if got.get(key) != expect_model.get(key):
                raise LdmExportError(f"calibration cache {folder} was captured for another model ({key} "
                                     f"{got.get(key)!r}, this build has {expect_model.get(key)!r}); use another "
                                     "--calib-cache folder or delete it")
    shapes = info.get("shapes", {})
    actual = {k: list(arrays[k].shape[1:]) for k in ("sample", "encoder_hidden_states")}
    calls = {len(arrays[k]) for k in ("sample", "timestep", "step", "prompt")} | {info.get("calls", len(arrays["sample"]))}
    if any(shapes.get(k) != v for k, v in actual.items()) or len(calls) != 1 or (
            len(arrays["encoder_hidden_states"]) != len(info.get("prompts", arrays["encoder_hidden_states"]))) or (
            len(arrays["prompt"]) and int(arrays["prompt"].max()) >= len(arrays["encoder_hidden_states"])):
        raise LdmExportError(f"calibration cache {folder} is damaged: its arrays do not match its manifest; delete it")
    if expect_shapes is not None:
        for k, want in expect_shapes.items():
            if shapes.get(k) != list(want):
                raise LdmExportError(f"calibration cache {folder} holds {k} of shape {shapes.get(k)}, this build feeds "
                                     f"{list(want)}; use another --calib-cache folder or delete it")
    return Capture(arrays["sample"], arrays["timestep"], arrays["step"], arrays["prompt"],
                   arrays["encoder_hidden_states"], info)
