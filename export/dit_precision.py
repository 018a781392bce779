"""fp16 policies of the DiT component kinds (T5 encoder, CLIP with projection, SD3 / FLUX transformers), and why.

Same mechanism as ``precision.py`` (ONNX Runtime's float16 converter with op-type and node-scope block lists),
keyed by component kind, so a family made of known kinds gets its policy for free.

T5: its feed-forward overflows fp16 (T5 v1.1 was trained in bf16: the gated-GELU product times ``wo`` exceeds
65504 in late layers on real weights; random or tiny weights cannot show it, so nothing is measured here).
transformers keeps ``wo`` in fp32 when loading T5 in fp16 (``_keep_in_fp32_modules = ["wo"]``) and clamps the
residual stream; diffusers' SD3/FLUX pipelines load T5 in bf16, and Optimum exports it fp32. The policy chosen: the
feed-forward output projection ``wo``, the residual adds and the RMS norms in fp32 (the residual stream never
passes through fp16), the attention and the ``wi`` projections in fp16: most of T5's FLOPs (wi is 2/3 of the
feed-forward) run fp16 while every place values grow stays fp32. A build with ``--precision fp32`` is the fallback
the NaN/Inf guard names. bf16 would be the better cure on GPUs, but ONNX Runtime's CPU provider (which verifies
every build) runs no bf16 MatMul.
"""
from __future__ import annotations

import logging

import onnx

from .precision import _NORMS, FP16_POLICY, Fp16Policy, fp16_policy

log = logging.getLogger(__name__)

_T5_REASON = ("T5's feed-forward output projection (wo), its residual adds and RMS norms in fp32, as transformers "
              "keeps wo fp32 in fp16 T5 (its activations exceed fp16 on real weights); attention and wi in fp16")
_TRANSFORMER_REASON = (
    "LayerNorm/RMSNorm statistics in fp32; the timestep (and guidance) sinusoidal embedding in fp32 (fp16 cannot "
    "hold fractional timesteps near 1000); the AdaLN modulation linears in fp32 (their shift/scale/gate multiply "
    "every activation of a block, so their rounding is amplified); attention and MLPs fp16; latents in and out "
    "float32 at the graph boundary")

DIT_FP16_POLICY: dict[str, Fp16Policy] = {
    "t5_encoder": Fp16Policy(_NORMS, ("/DenseReluDense/wo/", "/layer_norm/", "/final_layer_norm/", "/layer.0/Add",
                            "/layer.1/Add"), _T5_REASON),
    "clip_text_with_projection": FP16_POLICY["text_encoder"],
    "sd3_transformer": Fp16Policy(_NORMS, ("/time_text_embed/", "/norm1/linear/", "/norm1_context/linear/",
                                         "/norm_out/linear/"), _TRANSFORMER_REASON,
                                keep_fp32_io=("hidden_states", "timestep", "out_hidden_states")),
    "flux_transformer": Fp16Policy(_NORMS, ("/time_text_embed/", "/norm1/linear/", "/norm1_context/linear/",
                                          "/norm/linear/", "/norm_out/linear/"), _TRANSFORMER_REASON,
                                 keep_fp32_io=("hidden_states", "timestep", "guidance", "img_ids", "txt_ids",
                                               "out_hidden_states")),
}


# RMS norms of the attention's queries and keys (SD3.5, FLUX): their sum of squares over 64-128 channels overflows
# fp16 once the rms passes ~22, so their statistics stay fp32 like LayerNorm's
_QK_NORM_SCOPES = ("/norm_q/", "/norm_k/", "/norm_added_q/", "/norm_added_k/")  # image and text streams


def component_fp16_policy(kind: str, component: str, target: str, configs, extra_scopes: tuple[str, ...] = ()) -> Fp16Policy:
    """The fp16 policy of one component: the U-Net families' by component name, the DiT kinds' by kind (plus the
    q/k RMS norms where the transformer has them); on ``cuda`` LayerNorm runs fp16 (its kernel accumulates in fp32)."""
    if kind not in DIT_FP16_POLICY:
        return fp16_policy(component, target, extra_scopes)
    policy = DIT_FP16_POLICY[kind]
    transformer = configs.get("transformer", {})
    if kind == "flux_transformer" or (kind == "sd3_transformer" and transformer.get("qk_norm")):
        policy = Fp16Policy(policy.keep_op_types, policy.keep_name_prefixes + _QK_NORM_SCOPES,
                            policy.reason + "; the q/k RMS norms in fp32", policy.keep_fp32_io)
    if target == "cuda" and "LayerNormalization" in policy.keep_op_types:
        policy = Fp16Policy(tuple(op for op in policy.keep_op_types if op != "LayerNormalization"),
                            policy.keep_name_prefixes, policy.reason + "; on cuda LayerNormalization runs fp16 (its "
                            "kernel accumulates in fp32)", policy.keep_fp32_io)
    return policy


def convert_fp16_with(model_path: str, policy: Fp16Policy, what: str) -> onnx.ModelProto:
    """fp32 graph on disk -> fp16 graph keeping ``policy``'s ops, scopes and boundary tensors in fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    names = [n.name for n in onnx.load(model_path, load_external_data=False).graph.node]
    block_nodes = [n for n in names if any(p in n for p in policy.keep_name_prefixes)]
    unmatched = [p for p in policy.keep_name_prefixes if not any(p in n for n in names)]
    if unmatched:  # a scope that matches nothing would silently ship an overflowing graph
        raise RuntimeError(f"{what}: fp16 policy scopes {unmatched} match no node of the exported graph")
    log.info("%s: fp16 with op types %s and %d named nodes kept in fp32", what, policy.keep_op_types, len(block_nodes))
    return convert_float_to_float16(model_path, keep_io_types=list(policy.keep_fp32_io) or False,
                                    op_block_list=list(policy.keep_op_types), node_block_list=block_nodes)
