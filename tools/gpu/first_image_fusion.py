"""First image with and without cuDNN's conv+bias runtime fusion (its kernels are compiled at first use), from a
cold CUDA JIT cache and from a warm one: python tools/gpu/first_image_fusion.py BUNDLE FUSE(0|1) SEARCH OUT.json"""
import json
import sys
import time

import torch  # noqa: F401  loads the CUDA libraries onnxruntime-gpu uses

from ldm_export.runtime import pipeline as P
from ldm_export.runtime.bundle import Bundle

bundle_path, fuse, search, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
t0 = time.perf_counter()
bundle = Bundle.open(bundle_path)
engines = {c: P.cuda_engine(bundle, c, extra_options={"fuse_conv_bias": fuse} if c in P.CONVOLUTIONAL else None,
                            cudnn_search=search) for c in bundle.components}
pipe = P.Pipeline(bundle, engines)
load = time.perf_counter() - t0
times = []
for k in range(4):
    t = time.perf_counter()
    pipe("a photograph of an astronaut riding a horse", num_inference_steps=50, seed=k)
    times.append(time.perf_counter() - t)
r = {"fuse_conv_bias": fuse, "search": search, "load_s": load, "first_image_s": times[0], "steady_s": times[1:]}
print(json.dumps(r))
json.dump(r, open(out, "w"))
