"""Read a bundle: its manifest ``ldm_export.json``, component specs, and sha256 checks of every file."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LdmExportError
from .spec import ComponentSpec

log = logging.getLogger(__name__)

MANIFEST = "ldm_export.json"
FORMAT = "ldm-export-bundle"
FORMAT_VERSION = 1  # the newest bundle format this runtime reads
DAMAGED = 1  # exit code of a damaged bundle (a missing or changed file, an unreadable manifest)
MTIME_SLACK = 2.0  # seconds: FAT and some network filesystems keep modification times to 2 s


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# sampling defaults of a model that names none (A1111's steps, SD 1.x's usual guidance)
GENERIC_DEFAULTS = {"steps": 20, "guidance_scale": 7.5}


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]
    changed: list[str] = field(default_factory=list)  # files whose size or mtime differ from the manifest (open)
    _actual_hash: str | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, verify: bool = False) -> "Bundle":
        """Open a bundle folder; with ``verify`` check every file's sha256 against the manifest."""
        path = Path(path)
        mpath = path / MANIFEST
        if path.is_file():
            raise LdmExportError(f"{path} is a file, not a bundle: a bundle is the folder `ldm-export build --out DIR` "
                                 "writes")
        if not path.is_dir():
            raise LdmExportError(f"no bundle at {path}: build one with `ldm-export build --out {path}`")
        if not mpath.is_file():
            raise LdmExportError(f"{path} has no {MANIFEST}; it is not an ldm-export bundle (rebuild it with `ldm-export build`)")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise LdmExportError(f"cannot read {mpath}: {e}; rebuild the bundle", exit_code=DAMAGED) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            what = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise LdmExportError(f"{mpath} is not an ldm-export manifest (format {what!r}); rebuild the bundle with "
                                 "`ldm-export build`", exit_code=DAMAGED)
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise LdmExportError(
                f"bundle format version {version} is newer than this ldm-export reads ({FORMAT_VERSION}); upgrade ldm-export"
            )
        bundle = cls(path, manifest)
        missing = [f for f in manifest.get("files", {}) if not (path / f).is_file()]
        if missing:
            raise LdmExportError(f"bundle {path} is missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                                 + "; rebuild it", exit_code=DAMAGED)
        if verify:
            bad = bundle.check_hashes()
            if bad:
                raise LdmExportError(f"bundle {path}: sha256 mismatch in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                                     + "; the file was changed or damaged, rebuild the bundle", exit_code=DAMAGED)
            bundle.changed = []
        else:
            bundle.changed = bundle.check_stats()
            if bundle.changed:
                log.warning("bundle %s: %s changed since the build (size or modification time differs from the manifest); "
                            "its hash in the image metadata is recomputed; check every file with --verify (a copy that "
                            "does not keep modification times shows as changed: copy with cp -p or rsync -t)",
                            path, ", ".join(bundle.changed))
        return bundle

    def check_stats(self) -> list[str]:
        """Relative paths whose size, or modification time (where the manifest records it), differs from the
        manifest: a cheap check on every load; a full sha256 check is ``check_hashes`` (``--verify``)."""
        changed = []
        for rel, info in self.manifest["files"].items():
            st = (self.path / rel).stat()
            mtime = info.get("mtime")
            if st.st_size != info["size"] or (mtime is not None and abs(st.st_mtime - mtime) > MTIME_SLACK):
                changed.append(rel)
        return changed

    def check_hashes(self) -> list[str]:
        """Relative paths whose sha256 differs from the manifest (empty when all match)."""
        bad = []
        for rel, info in self.manifest["files"].items():
            p = self.path / rel
            if not p.is_file() or p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
                bad.append(rel)
        return bad

    @property
    def components(self) -> list[str]:
        return list(self.manifest["components"])

    def spec(self, component: str) -> ComponentSpec:
        try:
            return ComponentSpec.from_json(self.manifest["components"][component]["spec"])
        except KeyError:
            raise LdmExportError(f"bundle {self.path} has no component '{component}'") from None

    def model_path(self, component: str) -> Path:
        return self.path / self.manifest["components"][component]["files"][0]

    def precision(self, component: str) -> str:
        return self.manifest["components"][component]["precision"]

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def defaults(self) -> dict[str, Any]:
        """The model's default sampling settings (``steps``, ``guidance_scale``) as its zoo entry gives them (SD3 28 /
        7.0, FLUX-dev 28 / 3.5, FLUX-schnell 4 / 0, the demo DiT 20 / 5.0); bundles written before: 20 / 7.5."""
        return {**GENERIC_DEFAULTS, **self.model.get("defaults", {})}

    @property
    def family(self):
        """The model family (``runtime.families``) this bundle's manifest names."""
        from .families import get_family

        return get_family(self.model.get("family", "sd1"))

    @property
    def module_configs(self) -> dict[str, dict[str, Any]]:
        """Each torch module's config by module name (text_encoder, unet, vae, ...)."""
        if "modules" in self.model:
            return self.model["modules"]
        # bundles before families keyed the configs by component (vae_decoder for the vae)
        by_component = self.model.get("configs", {})
        return {c.module: by_component[c.name] for c in self.family.components if c.name in by_component}

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())

    @property
    def model_hash(self) -> str:
        """A1111-style short hash: first 10 hex digits of the denoiser graph's sha256 (UNet or transformer; computed
        from the file, once, when the load found it changed; else the manifest's)."""
        rel = self.manifest["components"][self.family.denoiser]["files"][0]
        if rel not in self.changed:
            return self.manifest["files"][rel]["sha256"][:10]
        if self._actual_hash is None:
            self._actual_hash = sha256_file(self.path / rel)
        return self._actual_hash[:10]
