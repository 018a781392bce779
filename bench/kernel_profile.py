"""GPU time by kernel and by kind for any CUDA work in this process, from PyTorch's profiler (CUPTI).

ONNX Runtime's own profiler times nodes on the host; without per-kernel device timing that is mostly launch and
bookkeeping time, and it cannot run under CUDA graphs. CUPTI, which PyTorch's profiler drives, records every kernel
the process launches, ONNX Runtime's included and inside CUDA graph replays, with its device duration. So this
profiles the engine exactly as it runs.
"""
from __future__ import annotations

import re
from typing import Callable

# first match wins; names are cuDNN/cuBLAS/CUTLASS/ONNX Runtime kernel names, lower-cased
KINDS: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|attention|sdpa"),
    ("conv", r"fprop|conv|implicit_gemm|winograd|dgrad"),
    ("gemm", r"gemm|cublas|cutlass|s16816|h16816|xmma|nvjet"),
    ("groupnorm", r"groupnorm"),
    ("layernorm", r"layernorm|layer_norm"),
    ("transpose", r"transpose"),
    ("resize", r"resize|upsample"),
    ("copy", r"memcpy|memset"),
    ("conv bias", r"op_generic_tensor_kernel"),  # cuDNN's add-tensor: the bias after each convolution
    ("elementwise", r"elementwise|binary|unary|impl_|cast|concat|expand|softmax|reduce|pad|slice|gelu|split|bias"),
)


def kind_of(kernel_name: str) -> str:
    n = kernel_name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, n):
            return kind
    return "other"


def profile_kernels(fn: Callable[[], object], runs: int = 5, top: int = 25) -> dict:
    """Run ``fn`` ``runs`` times under the profiler; device time per run by kernel kind and the top kernels.

    ``fn`` must leave the device idle when it returns (ONNX Runtime's run does). Returns
    ``{"runs", "kernels_per_run", "device_ms_per_run", "by_kind": [{kind, ms_per_run, calls_per_run, share}],
    "top_kernels": [{name, kind, ms_per_run, calls_per_run}]}``; ``kernels_per_run`` 0 means the profiler saw
    no kernels (CUPTI unavailable)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        per.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1000.0)
    total = sum(sum(v) for v in per.values()) / runs
    kinds: dict[str, list[float]] = {}
    for name, v in per.items():
        k = kinds.setdefault(kind_of(name), [0.0, 0.0])
        k[0] += sum(v) / runs
        k[1] += len(v) / runs
    by_kind = sorted(({"kind": k, "ms_per_run": ms, "calls_per_run": n, "share": ms / (total or 1.0)}
                      for k, (ms, n) in kinds.items()), key=lambda r: -r["ms_per_run"])
    tops = sorted(({"name": name[:160], "kind": kind_of(name), "ms_per_run": sum(v) / runs, "calls_per_run": len(v) / runs}
                   for name, v in per.items()), key=lambda r: -r["ms_per_run"])[:top]
    return {"runs": runs, "kernels_per_run": sum(len(v) for v in per.values()) / runs, "device_ms_per_run": total,
            "by_kind": by_kind, "top_kernels": tops}


def format_profile(p: dict, title: str) -> str:
    """Markdown: the by-kind table of :func:`profile_kernels`."""
    lines = [f"{title}: {p['device_ms_per_run']:.3f} ms of kernels a run, {p['kernels_per_run']:.0f} kernels", "",
             "| kind | ms a run | kernels | share |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['ms_per_run']:.3f} | {r['calls_per_run']:.0f} | {r['share']:.1%} |" for r in p["by_kind"]]
    return "\n".join(lines)
