"""What SmoothQuant does to the Linear layers alone: the UNet's SQNR against fp32 with only its level-3 Linear layers
int8 (no convolutions), SmoothQuant off and at several alphas, per calibration method; and how far the Linear
inputs' per-tensor range sits above their typical channel (the outliers SmoothQuant moves).

    python tools/smoothquant_linear_only.py --bundle demo-fp32 --methods minmax,percentile --alphas 0.5,0.8,1.0

One capture (the sweep's defaults: the first 8 prompts of the demo prompt file x 20 steps, CFG 7.5); prints a
markdown table.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="an fp32 bundle")
    p.add_argument("--methods", default="minmax,percentile")
    p.add_argument("--alphas", default="0.5,0.8,1.0")
    p.add_argument("--calib-size", type=int, default=8)
    p.add_argument("--calib-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import onnx

    from ldm_export.calibration import capture as C
    from ldm_export.calibration import quantize as Q
    from ldm_export.calibration import report as R
    from ldm_export.calibration import smooth as S
    from ldm_export.runtime.engine import OrtEngine
    from ldm_export.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(a.bundle, threads=a.threads)
    cap = C.capture_unet_inputs(pipe, C.read_prompts(None, a.calib_size), a.calib_steps,
                                model_identity=C.model_identity(pipe.bundle))
    spec = pipe.bundle.spec("unet")
    with tempfile.TemporaryDirectory(prefix=".sq-linear-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        Q.preprocess(Path(a.bundle) / "unet" / "model.onnx", pre, False)
        model = onnx.load(str(pre))
        ops = {n.name: n.op_type for n in model.graph.node}
        nodes = [n for n in Q.select_nodes(model, 3.0)[0] if ops[n] != "Conv"]
        groups = S.groups_of(model, nodes)
        act = S.activation_amax(pre, cap, {g.tensor: g.channels for g in groups}, work, False, a.threads)
        ratios = sorted(float(v.max() / np.median(v)) for v in act.values())
        print(f"{len(nodes)} Linear layers reading {len(groups)} tensors; per-tensor max |x| / median channel max |x|: "
              f"min {ratios[0]:.1f}, median {ratios[len(ratios) // 2]:.1f}, max {ratios[-1]:.1f}\n")
        print("| method | SmoothQuant | UNet SQNR dB (Linear layers int8 only) |\n|---|---:|---:|")
        for method in a.methods.split(","):
            for alpha in [None] + [S.parse_alpha(x) for x in a.alphas.split(",")]:
                graph = pre
                if alpha is not None:
                    m = onnx.load(str(pre))
                    S.apply_smoothing(m, S.groups_of(m, nodes), act, alpha)
                    graph = work / "smoothed.onnx"
                    onnx.save_model(m, str(graph))
                tensors = Q.calibration_tensors(onnx.load(str(graph)), nodes)
                amax = Q.combine_steps(Q.step_amax(graph, cap, method, tensors, work, False))
                Q.write_table(amax, method, work / "table.json")
                Q.quantize_qdq(graph, work / "int8.onnx", work / "table.json", method, nodes, "onnxruntime", "u8")
                r = R.unet_sqnr(pipe.engines["unet"], OrtEngine(work / "int8.onnx", spec, threads=a.threads), cap)
                print(f"| {method} | {'off' if alpha is None else format(alpha, 'g')} | {r['sqnr_db']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
