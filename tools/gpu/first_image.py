"""First-image and batched timings of an SD 1.5 bundle on the CUDA engine, one cuDNN search option per process.

  python tools/gpu/first_image.py pipeline BUNDLE SEARCH OUT.json   Pipeline.from_bundle(provider="cuda") load time,
        the first 50-step image, then 3 more (the steady state), with cudnn_search=SEARCH, in this fresh process.
  python tools/gpu/first_image.py table OUT_DIR                      one table of every *.json in OUT_DIR, and
        OUT_DIR/first_image.json with all figures.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
STEPS = 50


def pipeline(bundle: str, search: str, out: str) -> None:
    import onnxruntime as ort

    from ldm_export.runtime.pipeline import Pipeline

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit(f"onnxruntime has no CUDA provider ({ort.get_available_providers()}); install onnxruntime-gpu")
    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle, provider="cuda", cudnn_search=search)
    load = time.perf_counter() - t0
    times = []
    for k in range(4):
        t = time.perf_counter()
        pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, seed=k)
        times.append(time.perf_counter() - t)
    result = {"search": search, "load_s": load, "first_image_s": times[0], "steady_s": times[1:],
              "steady_mean_s": sum(times[1:]) / 3, "engines": {c: type(e).__name__ for c, e in pipe.engines.items()}}
    Path(out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def table(folder: str) -> None:
    d = Path(folder)
    rows = {}
    for f in sorted(d.glob("pipeline_*.json")):
        r = json.loads(f.read_text())
        rows.setdefault(r["search"], {}).update(pipeline=r)
    for f in sorted(d.glob("generate_*.json")):
        r = json.loads(f.read_text())
        rows.setdefault(r["search"], {}).update(generate=r)
    head = ("cuDNN search", "Pipeline load s", "first image s", "steady s/image", "generate load s", "generate first s",
            "generate s/image after first", "generate / steady")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for search, r in rows.items():
        p, g = r.get("pipeline", {}), r.get("generate", {})
        f = lambda x: f"{x:.3f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
        ratio = g.get("per_image_s") / p["steady_mean_s"] if g.get("per_image_s") and p.get("steady_mean_s") else None
        lines.append("| " + " | ".join([search, f(p.get("load_s")), f(p.get("first_image_s")), f(p.get("steady_mean_s")),
                                        f(g.get("load_s")), f(g.get("first_image_s")), f(g.get("per_image_s")),
                                        f(ratio)]) + " |")
    text = "\n".join(lines)
    print(text)
    (d / "first_image.md").write_text(text + "\n")
    (d / "first_image.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    if sys.argv[1] == "pipeline":
        pipeline(*sys.argv[2:5])
    elif sys.argv[1] == "table":
        table(sys.argv[2])
    else:
        sys.exit(__doc__)
