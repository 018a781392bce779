"""Torch-free I/O contract of each exported component (the single source for export, checks and profiles).

Names follow Optimum's Stable Diffusion ONNX export so bundles interoperate:
text_encoder ``input_ids`` -> ``last_hidden_state`` (+ ``pooler_output``); unet ``sample``,
``timestep``, ``encoder_hidden_states`` -> ``out_sample``; vae_decoder ``latent_sample`` -> ``sample``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .errors import LdmExportError

Dim = int | str  # a fixed size, or the name of a symbolic dimension


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int32", "int64"
    shape: tuple[Dim, ...]

    def symbolic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ComponentSpec:
    """Inputs, outputs and the min/opt/max value of every symbolic dimension of one component."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # symbolic dim -> (min, opt, max); the TensorRT optimisation profile reads these
    profile: Mapping[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def is_static(self) -> bool:
        """Every input and output dimension is a number (a ``--static-shape`` bundle)."""
        return all(isinstance(d, int) for t in (*self.inputs, *self.outputs) for d in t.shape)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for t in (*self.inputs, *self.outputs):
            sym = t.symbolic_axes()
            if sym:
                axes[t.name] = sym
        return axes

    def concrete_shape(self, tensor: TensorSpec, dims: Mapping[str, int] | None = None, which: str = "opt") -> tuple[int, ...]:
        """Shape of ``tensor`` with symbolic dims taken from ``dims`` or else the profile's ``which`` value."""
        k = {"min": 0, "opt": 1, "max": 2}[which]
        out = []
        for d in tensor.shape:
            if isinstance(d, int):
                out.append(d)
            elif dims and d in dims:
                out.append(int(dims[d]))
            else:
                out.append(self.profile[d][k])
        return tuple(out)

    def with_dtype(self, dtype: str, names: Sequence[str] | None = None) -> "ComponentSpec":
        """The same spec with floating tensors (or those in ``names``) switched to ``dtype``."""
        def conv(t: TensorSpec) -> TensorSpec:
            if (names is None and t.dtype.startswith("float")) or (names is not None and t.name in names):
                return TensorSpec(t.name, dtype, t.shape)
            return t
        return ComponentSpec(self.name, tuple(map(conv, self.inputs)), tuple(map(conv, self.outputs)), dict(self.profile))

    def static(self, dims: Mapping[str, int]) -> "ComponentSpec":
        """The spec with every symbolic dim fixed (for static-shape builds)."""
        def fix(t: TensorSpec) -> TensorSpec:
            return TensorSpec(t.name, t.dtype, tuple(int(dims[d]) if isinstance(d, str) else d for d in t.shape))
        return ComponentSpec(self.name, tuple(map(fix, self.inputs)), tuple(map(fix, self.outputs)), {})

    def with_batch(self, dim: Dim, skip: Sequence[str] = ()) -> "ComponentSpec":
        """The same spec with axis 0 of every tensor (except those in ``skip``: inputs with no batch axis) set to
        ``dim``: a symbolic name makes a static spec take any batch."""
        def conv(t: TensorSpec) -> TensorSpec:
            return t if t.name in skip or not t.shape else TensorSpec(t.name, t.dtype, (dim, *t.shape[1:]))
        profile = dict(self.profile)
        if isinstance(dim, str) and dim not in profile:
            profile[dim] = (1, 2, 8)
        return ComponentSpec(self.name, tuple(map(conv, self.inputs)), tuple(map(conv, self.outputs)), profile)

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Refuse feeds whose names, dtypes or ranks/fixed sizes differ from the spec; say expected and got."""
        expected = set(self.input_names)
        got = set(feeds)
        if expected != got:
            raise LdmExportError(
                f"{self.name}: expected inputs {sorted(expected)}, got {sorted(got)}"
            )
        bound: dict[str, int] = {}
        for t in self.inputs:
            a = feeds[t.name]
            if str(a.dtype) != t.dtype:
                raise LdmExportError(f"{self.name}.{t.name}: expected dtype {t.dtype}, got {a.dtype}")
            if a.ndim != len(t.shape):
                raise LdmExportError(f"{self.name}.{t.name}: expected shape {_fmt(t.shape)}, got {tuple(a.shape)}")
            for d, n in zip(t.shape, a.shape):
                if isinstance(d, int) and d != n:
                    raise LdmExportError(f"{self.name}.{t.name}: expected shape {_fmt(t.shape)}, got {tuple(a.shape)}")
                if isinstance(d, str):
                    if d in bound and bound[d] != n:
                        raise LdmExportError(
                            f"{self.name}.{t.name}: dimension '{d}' is {n} here but {bound[d]} in another input"
                        )
                    bound[d] = n

    def check_graph(self, session, path) -> None:
        """Refuse a graph whose inputs or outputs are not this spec's (another component's model.onnx in its place),
        at load rather than as an ONNX Runtime error mid-run. ``session``: an onnxruntime InferenceSession."""
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        ranks = {i.name: len(i.shape) for i in session.get_inputs()}
        wrong_rank = [t.name for t in self.inputs if t.name in ranks and ranks[t.name] != len(t.shape)]
        if set(got_in) != set(self.input_names) or not set(self.output_names) <= set(got_out) or wrong_rank:
            raise LdmExportError(f"{path} is not a {self.name} graph: it takes {got_in} and gives {got_out}, the bundle's "
                                 f"spec says {self.input_names} -> {self.output_names}; the bundle is damaged, rebuild it",
                                 exit_code=1)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "inputs": [asdict(t) | {"shape": list(t.shape)} for t in self.inputs],
            "outputs": [asdict(t) | {"shape": list(t.shape)} for t in self.outputs],
            "profile": {k: list(v) for k, v in self.profile.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "ComponentSpec":
        def ts(x):
            return TensorSpec(x["name"], x["dtype"], tuple(x["shape"]))
        return cls(d["name"], tuple(map(ts, d["inputs"])), tuple(map(ts, d["outputs"])),
                   {k: tuple(v) for k, v in d.get("profile", {}).items()})


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def text_encoder_spec(hidden_size: int, max_length: int = 77, with_pooler: bool = True,
                      batch: tuple[int, int, int] = (1, 2, 8)) -> ComponentSpec:
    outputs = [TensorSpec("last_hidden_state", "float32", ("batch", "sequence", hidden_size))]
    if with_pooler:
        outputs.append(TensorSpec("pooler_output", "float32", ("batch", hidden_size)))
    return ComponentSpec(
        "text_encoder",
        (TensorSpec("input_ids", "int32", ("batch", "sequence")),),
        tuple(outputs),
        {"batch": batch, "sequence": (max_length, max_length, max_length)},
    )


def unet_spec(in_channels: int, out_channels: int, context_dim: int, latent_hw: tuple[int, int, int],
              max_length: int = 77, batch: tuple[int, int, int] = (1, 2, 8)) -> ComponentSpec:
    """``latent_hw`` is the (min, opt, max) latent side; the same profile serves height and width."""
    return ComponentSpec(
        "unet",
        (
            TensorSpec("sample", "float32", ("batch", in_channels, "height", "width")),
            # a scalar, as Optimum's current SD export has it; the graph broadcasts it over the batch
            TensorSpec("timestep", "float32", ()),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", context_dim)),
        ),
        (TensorSpec("out_sample", "float32", ("batch", out_channels, "height", "width")),),
        {"batch": batch, "height": latent_hw, "width": latent_hw, "sequence": (max_length, max_length, max_length)},
    )


def vae_decoder_spec(latent_channels: int, latent_hw: tuple[int, int, int], scale: int = 8,
                     batch: tuple[int, int, int] = (1, 1, 8)) -> ComponentSpec:
    return ComponentSpec(
        "vae_decoder",
        (TensorSpec("latent_sample", "float32", ("batch", latent_channels, "height", "width")),),
        (TensorSpec("sample", "float32", ("batch", 3, "image_height", "image_width")),),
        {"batch": batch, "height": latent_hw, "width": latent_hw,
         "image_height": tuple(scale * x for x in latent_hw), "image_width": tuple(scale * x for x in latent_hw)},
    )
