"""Replace a UNet graph's unfused attentions with ONNX Runtime's com.microsoft.MultiHeadAttention: a measurement tool.

A `--target cpu` UNet carries attention as standard ops (Reshape/Transpose, the scale split as two Muls, MatMul,
Softmax, MatMul, Transpose, Reshape), which at 512 px make 0.54 GB score matrices; ONNX Runtime's CPU
MultiHeadAttention (fp32; an fp16 graph gets Casts around it) computes attention in blocks. This rewrites a copy of
the graph so the difference can be measured (`python tools/peak_memory.py`-style probes, docs/runtime.md); builds do
not use it (TensorRT's parser reads no contrib op, so the cpu target keeps standard ops).

    python tools/mha_rewrite.py BUNDLE/unet/model.onnx OUT.onnx --heads 8
"""
from __future__ import annotations

import argparse
import collections

import onnx
from onnx import helper


def rewrite(model: onnx.ModelProto, heads: int) -> int:
    """Rewrite ``model`` in place; returns the attentions replaced. The scale is MultiHeadAttention's default,
    1/sqrt(head size), which the two Muls on Q and K (each head_size**-0.25) make."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    cons = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            cons[i].append(n)

    def up(name: str, op: str):
        n = prod[name]
        if n.op_type != op:
            raise ValueError(f"unexpected attention pattern: {n.op_type} where {op} was expected ({name})")
        return n

    def down(name: str, op: str):
        (n,) = cons[name]
        if n.op_type != op:
            raise ValueError(f"unexpected attention pattern: {n.op_type} where {op} was expected ({name})")
        return n

    fused = {}
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        scores = up(sm.input[0], "MatMul")
        q = up(up(up(scores.input[0], "Mul").input[0], "Transpose").input[0], "Reshape").input[0]
        k = up(up(up(scores.input[1], "Mul").input[0], "Transpose").input[0], "Reshape").input[0]
        mix = down(sm.output[0], "MatMul")
        v = up(up(mix.input[1], "Transpose").input[0], "Reshape").input[0]
        out = down(down(mix.output[0], "Transpose").output[0], "Reshape")
        fused[id(out)] = helper.make_node("MultiHeadAttention", [q, k, v], [out.output[0]], domain="com.microsoft",
                                          num_heads=heads, name=out.name + "/MultiHeadAttention")
    nodes = [fused.get(id(n), n) for n in g.node]
    outputs = {o.name for o in g.output}
    while True:  # drop what fed only the replaced nodes
        used = {i for n in nodes for i in n.input} | outputs
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(fused)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--heads", type=int, default=8, help="attention heads (SD 1.5: 8 in every block)")
    a = ap.parse_args()
    model = onnx.load(a.model)
    n = rewrite(model, a.heads)
    onnx.save(model, a.out)
    print(f"{n} attentions replaced: {a.out}")


if __name__ == "__main__":
    main()
