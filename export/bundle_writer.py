"""Write a bundle atomically: everything goes to a hidden staging folder beside ``--out``, renamed into place
only when complete. A failed or interrupted build removes its staging folder; one killed outright leaves
only a hidden ``.NAME.partial-PID`` folder, which the next build removes."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Iterator

from ldm_export.runtime.errors import LdmExportError

log = logging.getLogger(__name__)


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` without ``force``, and an unwritable parent, before any work is done."""
    if out.exists() and not force:
        raise LdmExportError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise LdmExportError(f"{out} exists and is not a folder; choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise LdmExportError(f"cannot create {parent}: {e.strerror}; choose another --out") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LdmExportError(f"cannot write to {parent} (read-only or permission denied); choose another --out")


def _remove_stale(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s left by a build that was killed", p)
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C so the staging folder is removed."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def staging(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty staging folder; on success rename it to ``out`` (replacing it with ``force``)."""
    out = Path(out)
    check_out_dir(out, force)
    _remove_stale(out)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
    except OSError as e:
        raise LdmExportError(f"cannot create {stage}: {e.strerror}; choose another --out") from None
    try:
        with _sigterm_as_interrupt():
            yield stage
            _commit(stage, out, force)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise LdmExportError(f"disk full while writing the bundle under {out.parent}; free space or choose another --out "
                                 "(nothing was left behind)") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise LdmExportError(f"cannot write under {out.parent}: {e.strerror}; choose another --out") from None
        raise
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _commit(stage: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:  # it appeared while we were building
            raise LdmExportError(f"{out} appeared during the build; pass --force to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)
