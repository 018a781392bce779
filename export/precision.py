"""The fp16 policy: which ops stay fp32, and why. One explicit, listed policy per component.

fp16 conversion runs on the verified fp32 graph with ONNX Runtime's own converter
(``onnxruntime.transformers.float16``); the lists below are its block lists.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class Fp16Policy:
    """Ops (by type) and node-name scopes kept in fp32 for one component, with the reason."""

    keep_op_types: tuple[str, ...]
    keep_name_prefixes: tuple[str, ...]  # module scopes, matched anywhere in the exported node name
    reason: str
    keep_fp32_io: tuple[str, ...] = ()  # inputs/outputs that stay float32 at the graph boundary

    def to_json(self) -> dict:
        return {"keep_fp32_op_types": list(self.keep_op_types),
                "keep_fp32_node_prefixes": list(self.keep_name_prefixes), "keep_fp32_io": list(self.keep_fp32_io),
                "reason": self.reason}


# Normalisation statistics (mean/variance over many elements) overflow or lose precision in fp16;
# GroupNorm exports as InstanceNormalization (TorchScript exporter) or GroupNormalization.
_NORMS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization")

# The latents in and out (and the decoded image) stay float32 at the graph boundary: the Casts run on the device,
# and the host, whose sampler works in float32, is spared numpy's slow float16 conversions (about 1 ms for a
# 512x512 image on a fast CPU, on every decode; a little on every step).
_IO_REASON = "latents in and out and the decoded image float32 at the graph boundary (cast on the device)"

FP16_POLICY: dict[str, Fp16Policy] = {
    "text_encoder": Fp16Policy(
        _NORMS, (),
        "LayerNorm statistics in fp32; the causal mask's -inf is clamped to fp16 range by the converter",
    ),
    "unet": Fp16Policy(
        _NORMS, ("/model/time_proj/",),
        "GroupNorm/LayerNorm statistics in fp32; the timestep and its sinusoidal projection in fp32 (fp16 cannot "
        "hold fractional timesteps near 1000, which Karras-style samplers use); everything else fp16" + "; " + _IO_REASON,
        keep_fp32_io=("timestep", "sample", "out_sample"),
    ),
    "vae_decoder": Fp16Policy(
        _NORMS + ("Softmax",), (),
        "GroupNorm statistics and the mid-block attention softmax in fp32; everything else fp16, as diffusers runs "
        "SD 1.x/2.x decoders in fp16 (a decoder that overflows fp16, like SDXL's original VAE, needs --no-half-vae, "
        "which keeps the whole decoder in fp32; the runtime's NaN/Inf guard says so); " + _IO_REASON,
        keep_fp32_io=("latent_sample", "sample"),
    ),
}


# ONNX Runtime's CUDA LayerNormalization kernel reads fp16 and accumulates its statistics in fp32 itself, so on
# the cuda target LayerNorm runs in fp16 and the ~100 Cast nodes around each fp32 LayerNorm of the UNet go away.
_FP32_KERNEL_STATS = {"cuda": ("LayerNormalization",)}


# components that share another's policy (SDXL's second text encoder is a CLIP text encoder too)
_SAME_AS = {"text_encoder_2": "text_encoder"}


def fp16_policy(component: str, target: str = "cpu", extra_scopes: tuple[str, ...] = ()) -> Fp16Policy:
    """The component's fp16 policy for a build target; ``extra_scopes``: node scopes the family keeps fp32 besides
    (SDXL's time-id sinusoids)."""
    policy = FP16_POLICY[_SAME_AS.get(component, component)]
    if extra_scopes:
        policy = Fp16Policy(policy.keep_op_types, policy.keep_name_prefixes + tuple(extra_scopes),
                            policy.reason + f"; the family keeps {', '.join(extra_scopes)} fp32 too", policy.keep_fp32_io)
    native = _FP32_KERNEL_STATS.get(target, ())
    if not native or not set(native) & set(policy.keep_op_types):
        return policy
    return Fp16Policy(tuple(op for op in policy.keep_op_types if op not in native), policy.keep_name_prefixes,
                      policy.reason + f"; on {target}, {', '.join(native)} runs in fp16 (its kernel accumulates in fp32)",
                      policy.keep_fp32_io)


def convert_fp16(model_path: str, component: str, target: str = "cpu", extra_scopes: tuple[str, ...] = ()) -> onnx.ModelProto:
    """fp32 graph on disk -> fp16 graph, keeping the component's policy ops, and its ``keep_fp32_io`` inputs and
    outputs, in fp32 (the other inputs and outputs become fp16).

    Takes a path so the converter can run shape inference on models over 2 GB (it needs value types to
    put Cast nodes around the fp32 islands)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    policy = fp16_policy(component, target, extra_scopes)
    names = [n.name for n in onnx.load(model_path, load_external_data=False).graph.node]
    block_nodes = [n for n in names if any(p in n for p in policy.keep_name_prefixes)]
    unmatched = [p for p in policy.keep_name_prefixes if not any(p in n for n in names)]
    if unmatched:  # a policy that silently matches nothing would ship overflowing fp16 graphs
        raise RuntimeError(f"{component}: fp16 policy scopes {unmatched} match no node of the exported graph")
    log.info("%s: fp16 with op types %s and %d named nodes kept in fp32", component, policy.keep_op_types, len(block_nodes))
    return convert_float_to_float16(
        model_path, keep_io_types=list(policy.keep_fp32_io) or False, op_block_list=list(policy.keep_op_types), node_block_list=block_nodes,
    )
