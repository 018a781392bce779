"""What every `ldm-export` command shares: the consoles and the error guard (one line and an exit code)."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from typing import Iterator

from rich.console import Console
from rich.markup import escape

from ldm_export.runtime.errors import LdmExportError

console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _guard(fn):
    """Turn user errors into one line and an exit code; tracebacks only with --debug / LDM_EXPORT_DEBUG=1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("LDM_EXPORT_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except LdmExportError as e:
            if debug:
                raise
            console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
            sys.exit(e.exit_code)
        except NotImplementedError as e:
            if debug:
                raise
            console.print(f"[red]error:[/red] not built yet: {escape(str(e))}", soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:  # commands that write say what they kept (LdmExportError, exit code 130)
            console.print("[yellow]interrupted[/yellow]: stopped", soft_wrap=True)
            sys.exit(130)
        except MemoryError:
            console.print("[red]error:[/red] out of memory; close other programs or build a smaller model", soft_wrap=True)
            sys.exit(3)
    return wrapper


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (they arrive after it), so a step that must finish whole
    (write an image and count it) is never cut in two."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no POSIX signal masks here: run the block as is
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
