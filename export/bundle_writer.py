"""Write a bundle atomically: everything goes to a hidden staging folder beside ``--out``, renamed into place
only when complete. A failed or interrupted build removes its staging folder; one killed outright leaves
only a hidden ``.NAME.partial-PID`` folder, which the next build removes."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from ldm_export.runtime.bundle import FORMAT, MANIFEST
from ldm_export.runtime.checks import refuse_out_under_a_file
from ldm_export.runtime.errors import LdmExportError, sigterm_as_interrupt

log = logging.getLogger(__name__)


def is_replaceable(out: Path) -> bool:
    """What ``--force`` may replace: an ldm-export bundle (its manifest names the format) or an empty folder."""
    if not out.is_dir() or out.is_symlink():
        return False
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    return not any(out.iterdir())


# what ldm-export itself writes into a bundle folder besides the files its manifest lists (and engines/)
OWN_EXTRA_FILES = (MANIFEST, "serve.yaml")  # serve.yaml: `serve`'s deploy config (ldm_export/serve/service.py)


def foreign_files(out: Path) -> list[str]:
    """Files inside a bundle folder that the bundle did not write: not in its manifest's file list, not the manifest,
    not what ldm-export itself keeps there (the engine caches in ``engines/``, ``serve``'s serve.yaml): a user's
    notes, an image ``generate --out BUNDLE`` wrote. ``--force`` keeps its promise to delete nothing else by refusing where there are any."""
    from ldm_export.runtime.engine_tensorrt import ENGINES_DIR

    try:
        listed = set(json.loads((out / MANIFEST).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return []
    found = []
    for f in sorted(out.rglob("*")):
        if f.is_dir() and not f.is_symlink():
            continue
        rel = f.relative_to(out).as_posix()
        if rel not in listed and rel not in OWN_EXTRA_FILES and rel.split("/")[0] != ENGINES_DIR:
            found.append(rel)
    return found


def check_out_dir(out: Path, force: bool, weights: Path | None = None, source: Path | None = None) -> None:
    """Refuse, before any work: ``out`` holding the weights being read or the current folder; ``out`` being the
    bundle ``source`` a command reads (``lora``, ``quantize``), holding it or inside it (a bundle stays as written);
    an existing ``out`` without ``force``, or with ``force`` when it is not a bundle or an empty folder (nothing else
    is ever deleted); an unwritable parent."""
    out = Path(os.path.abspath(out))
    cwd = Path.cwd()
    if out == cwd or out in cwd.parents:
        raise LdmExportError(f"--out {out} is the current folder or holds it; name a new folder for the bundle")
    if weights is not None:
        w = Path(os.path.abspath(weights))
        if out == w or out in w.parents:
            raise LdmExportError(f"--out {out} is the weights folder being read (or holds it); choose another --out")
    if source is not None:
        src = Path(os.path.realpath(source))
        real = Path(os.path.realpath(out))
        if real == src or real in src.parents or src in real.parents:
            raise LdmExportError(f"--out {out} is the bundle being read, holds it or lies inside it; write the new bundle "
                                 "to a folder of its own")
    if out.exists() and not force:
        raise LdmExportError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise LdmExportError(f"{out} exists and is not a folder; choose another --out")
    if out.exists() and not is_replaceable(out):
        raise LdmExportError(f"{out} is not an ldm-export bundle (no {MANIFEST}) and not empty; --force replaces only "
                             "bundles and empty folders, so choose another --out")
    foreign = foreign_files(out) if out.exists() else []
    if foreign:
        more = f" and {len(foreign) - 2} more" if len(foreign) > 2 else ""
        raise LdmExportError(f"{out} is a bundle but also holds files it did not write ({', '.join(foreign[:2])}{more}); "
                             "--force replaces nothing else, so move them out or choose another --out")
    refuse_out_under_a_file(out)
    parent = out.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as e:
            raise LdmExportError(f"cannot create {parent}: {e.strerror}; choose another --out") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LdmExportError(f"cannot write to {parent} (read-only or permission denied); choose another --out")


def _remove_stale(out: Path) -> None:
    for p in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        pid = p.name.rsplit(".", 1)[-1].split("-")[1]  # .NAME.partial-PID-TAG / .NAME.old-PID-TAG
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s left by a build that was killed", p)
            shutil.rmtree(p, ignore_errors=True)


def _tag() -> str:
    """PID (a later build removes what a killed one left) and a random part (builds in one process, threads)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staging(out: Path, force: bool, weights: Path | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; on success rename it to ``out`` (replacing it with ``force``)."""
    out = Path(os.path.abspath(out))
    check_out_dir(out, force, weights)
    _remove_stale(out)
    stage = out.parent / f".{out.name}.partial-{_tag()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
    except OSError as e:
        raise LdmExportError(f"cannot create {stage}: {e.strerror}; choose another --out") from None
    try:
        with sigterm_as_interrupt():
            yield stage
            _commit(stage, out, force)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise LdmExportError(f"disk full while writing the bundle under {out.parent}; free space or choose another --out "
                                 "(nothing was left behind)") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise LdmExportError(f"cannot write under {out.parent}: {e.strerror}; choose another --out") from None
        raise LdmExportError(f"cannot put the bundle at {out}: {e.strerror or e}; nothing was left behind, "
                             "build again") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


@contextlib.contextmanager
def _parent_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (flock on its descriptor): builds committing beside each other take
    turns, and no lock file is left behind."""
    try:
        import fcntl
    except ImportError:  # not POSIX: commits are not serialised
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _commit(stage: Path, out: Path, force: bool) -> None:
    with _parent_lock(out.parent):
        if out.exists():
            if not force:  # it appeared while we were building
                raise LdmExportError(f"{out} appeared during the build; pass --force to replace it")
            if not is_replaceable(out):
                raise LdmExportError(f"{out} became something other than a bundle during the build; it was left as it "
                                     "is, choose another --out")
            old = out.parent / f".{out.name}.old-{_tag()}"
            os.replace(out, old)
            try:
                os.replace(stage, out)
            except OSError:
                os.replace(old, out)  # put the previous bundle back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
