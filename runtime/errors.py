"""The one error class users see: a one-line message that says what was wrong and what to do."""
import contextlib
import signal
from typing import Iterator

import numpy as np


def overflow_fix(component: str, precision: str | None = None) -> str:
    """What to do when ``component`` produced NaN/Inf. In an fp16 graph (or one of unknown precision) the build flag
    that keeps it in fp32; in an fp32 graph no flag helps: its inputs or the model's weights are out of range."""
    if precision == "fp32":
        feeds = "the latents it decoded" if component == "vae_decoder" else "its inputs"
        return (f"{component} already runs in fp32, so {feeds} or the model's weights are out of range (a damaged or "
                "mismatched checkpoint, a LoRA fused at too large a scale, or a run that diverged): check the weights "
                "and LoRA scales, or try a lower guidance scale")
    return "rebuild with --no-half-vae (the decoder in fp32)" if component == "vae_decoder" else "rebuild with --precision fp32"


def overflow_message(component: str, precision: str | None = None) -> str:
    """The reason part of a NaN/Inf refusal: an fp16 overflow where the graph is fp16, a value out of range otherwise."""
    if precision == "fp32":
        return "values out of range: " + overflow_fix(component, precision)
    return "the graph overflows at this precision: " + overflow_fix(component, precision)


def all_finite(a: np.ndarray) -> bool:
    """No NaN or Inf in ``a`` (non-float arrays are finite)."""
    if a.dtype == np.float16:  # numpy's float16 isfinite is slow; an exponent of all ones is Inf or NaN
        return not bool(((a.view(np.uint16) & 0x7C00) == 0x7C00).any())
    if not np.issubdtype(a.dtype, np.floating):
        return True
    return bool(np.isfinite(a).all())


class LdmExportError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM, and SIGHUP (the terminal closed) where nothing else handles it (``nohup`` ignores it), unwind
    like Ctrl-C, so a command (a build's staging folder, generate's images) cleans up and says what it kept."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    wanted = [signal.SIGTERM]
    hup = getattr(signal, "SIGHUP", None)
    if hup is not None and signal.getsignal(hup) == signal.SIG_DFL:
        wanted.append(hup)
    old = {}
    try:
        for sig in wanted:
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def load_error(path, exc: Exception, where: str = "") -> "LdmExportError":
    """ONNX Runtime could not open a bundle's graph: a damaged file (truncated, overwritten) is the bundle's fault,
    named as such (exit 1, as for a missing or wrong graph); anything else keeps ONNX Runtime's first line."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    reasons = {"Protobuf parsing failed": "protobuf parsing failed: cut short or overwritten",
               "INVALID_PROTOBUF": "not a protobuf", "NO_SUCHFILE": "missing"}
    reason = next((r for marker, r in reasons.items() if marker in first), None)
    if reason is not None:
        return LdmExportError(f"{path} is not a readable ONNX graph ({reason}); the bundle is damaged, rebuild it "
                              "(`generate --verify` checks every file against the manifest)", exit_code=1)
    return LdmExportError(f"cannot load {path}{where}: {first}")
