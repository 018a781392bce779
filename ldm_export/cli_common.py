"""What every `ldm-export` command shares: the consoles and the error guard (one line and an exit code)."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from typing import Iterator

import click
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


# Optional packages by the extra that installs them (pyproject.toml): a command that needs one says which to install
_EXTRAS = {**dict.fromkeys(("torch", "diffusers", "transformers", "onnx", "onnxscript", "safetensors", "peft"), "export"),
           **dict.fromkeys(("ray", "fastapi", "starlette", "uvicorn", "pydantic", "yaml", "psutil"), "serve"),
           "polygraphy": "tensorrt"}


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """The one-line message for an optional package that is not installed, or None for any other missing module."""
    top = (e.name or "").split(".")[0]
    extra = _EXTRAS.get(top)
    if extra is None:
        return None
    return (f"this command needs the Python package '{top}', which the base install (the runtime) leaves out: "
            f"pip install 'ldm-export[{extra}]'")


def interrupted_within(exc: BaseException) -> bool:
    """A Ctrl-C that surfaced as another exception: an import it cut short raises ImportError ('initialization
    failed') from the KeyboardInterrupt."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def out_of_memory(exc: BaseException) -> str | None:
    """What an allocation failure that is not a MemoryError asked for (torch's CPU allocator: "can't allocate memory:
    you tried to allocate 3221225472 bytes", CUDA's "out of memory"), as text; None for any other error."""
    import re

    text = str(exc)
    if not isinstance(exc, RuntimeError) or not any(k in text for k in ("can't allocate memory", "out of memory",
                                                                         "OutOfMemory")):
        return None
    m = re.search(r"allocate (\d+) bytes", text)
    if m:
        return f"{int(m.group(1)) / 1e9:.1f} GB more"
    m = re.search(r"allocate ([\d.]+ [KMGT]i?B)", text)
    return f"{m.group(1)} more" if m else "the memory it asked for"


# click 8.2's: a group or command run without arguments shows its help (click 8.1 shows it without raising)
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineErrors(click.Group):
    """click's usage errors (an unknown option, a value that is not a number, a missing argument) as one line that
    names the help to read, like every other error of the tool, instead of click's four-line usage block."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as e:  # a bare `ldm-export` or command group: its help (click 8.2+)
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else self._command_named(args, kwargs)
            console.print(f"[red]error:[/red] {escape(e.format_message())} (see '{escape(where)} --help')",
                          soft_wrap=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C at one of click's own prompts
            console.print("[yellow]interrupted[/yellow]: stopped", soft_wrap=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def _command_named(self, args: tuple, kwargs: dict) -> str:
        """``PROG COMMAND`` from the command line, for an error click raised without its context (an option missing
        its value)."""
        prog = kwargs.get("prog_name") or self.name
        argv = kwargs.get("args") or (args[0] if args else None) or sys.argv[1:]
        sub = next((a for a in argv if a in self.commands), None)
        return f"{prog} {sub}" if sub else prog


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
        except ModuleNotFoundError as e:
            message = missing_extra(e)
            if debug or message is None:
                raise
            console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
            sys.exit(2)
        except MemoryError:
            console.print("[red]error:[/red] out of memory; close other programs or build a smaller model", soft_wrap=True)
            sys.exit(3)
        except (KeyboardInterrupt, Exception) as e:  # Ctrl-C, or one that cut an import short (ImportError from it);
            # commands that write say what they kept (LdmExportError, exit code 130)
            if out_of_memory(e) and not debug:  # torch's allocators raise RuntimeError, not MemoryError
                console.print("[red]error:[/red] out of memory (the allocator could not get "
                              f"{escape(out_of_memory(e))}); close other programs or use a machine with more memory",
                              soft_wrap=True)
                sys.exit(3)
            if not interrupted_within(e) or (debug and not isinstance(e, KeyboardInterrupt)):
                raise
            console.print("[yellow]interrupted[/yellow]: stopped", soft_wrap=True)
            sys.exit(130)
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
