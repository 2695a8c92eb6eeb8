"""The compiled bundle ``NAME.jei/``: manifest schema, path rules and the integrity check.

Layout (schema version 1)::

    NAME.jei/
      manifest.json        this file's schema: see ``SCHEMA`` / ``docs/runtime.md``
      stages/stage0.onnx   one graph per stage (``x``/``hidden_in`` -> ``hidden_out, probs, gate``)
      ...
      plain.onnx           the plain backbone (no IMs, no gates) as one graph: ``x`` -> ``probs``
      model.pt             optional: the checkpoint it was built from (torch-cuda executor)
      report.json          the build report (parity, decision agreement, timings)
      report.txt           the same for humans

``manifest["files"]`` maps every other file's relative path to its sha256 and size. The check
here detects corruption and accidental edits; it is an **integrity check, not security**: whoever
can edit a file can rewrite the manifest too. Every path (manifest entries, ONNX external data)
must stay inside the bundle: absolute paths, ``..`` and symlinks leading out are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, List, Optional

from jei_edge.errors import BundleError

SCHEMA = "jei-edge/bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema", "schema_version", "stages", "input", "num_classes", "exits", "files",
                 "target", "precision", "toolchain")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def check_relpath(rel: Any, what: str) -> str:
    """``rel`` must be a plain relative POSIX path without ``.``/``..`` parts; returns it."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{what}: path {rel!r} is not a non-empty string")
    if "\\" in rel or "\x00" in rel or PureWindowsPath(rel).drive or PurePosixPath(rel).is_absolute():
        raise BundleError(f"{what}: path {rel!r} is absolute or not a plain relative path",
                          hint="paths in a bundle must stay inside it; rebuild the bundle")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"{what}: path {rel!r} leaves the bundle or is not normalised",
                          hint="paths in a bundle must stay inside it; rebuild the bundle")
    return rel


def resolve_inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` after ``check_relpath``, refusing symlinks that lead out of ``root``."""
    check_relpath(rel, what)
    root_r = Path(root).resolve()
    target = (root_r / rel).resolve()
    try:
        target.relative_to(root_r)
    except ValueError:
        raise BundleError(f"{what}: '{rel}' resolves to '{target}', outside the bundle '{root_r}'",
                          hint="a symlink leads out of the bundle; replace it by the real file or rebuild") from None
    return target


def _walk_files(root: Path) -> List[str]:
    """Relative POSIX paths of every non-directory entry under ``root`` (symlinks not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in filenames + [n for n in dirnames if (d / n).is_symlink()]:
            out.append((d / name).relative_to(root).as_posix())
    return sorted(out)


class Bundle:
    """A bundle directory and its manifest. ``Bundle.open`` verifies it (see ``verify``)."""

    def __init__(self, path, manifest: Dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    # -- opening ---------------------------------------------------------------------------
    @staticmethod
    def read_manifest(path) -> Dict[str, Any]:
        path = Path(path)
        if not path.exists():
            raise BundleError(f"bundle '{path}' does not exist", hint="build one with `jei-edge build model.pt -o NAME.jei`")
        if not path.is_dir():
            raise BundleError(f"bundle '{path}' is not a directory",
                              hint="a bundle is the NAME.jei/ directory written by `jei-edge build`")
        mpath = path / MANIFEST
        if not mpath.is_file() or mpath.is_symlink():
            raise BundleError(f"bundle '{path}' has no {MANIFEST}", hint="it is not a jei-edge bundle, or the build did not finish")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"bundle '{path}': {MANIFEST} is not valid JSON ({exc})", hint="rebuild the bundle") from exc
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
            raise BundleError(f"bundle '{path}': {MANIFEST} is not a jei-edge bundle manifest (schema tag missing)")
        version = manifest.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise BundleError(f"bundle '{path}': invalid schema_version {version!r}", hint="rebuild the bundle")
        if version > SCHEMA_VERSION:
            raise BundleError(f"bundle '{path}' has schema version {version}; this jei-edge reads up to {SCHEMA_VERSION}",
                              hint="upgrade jei-edge on this device, or build with the jei-edge installed here")
        if version != SCHEMA_VERSION:
            raise BundleError(f"bundle '{path}' has unsupported schema version {version}", hint="rebuild the bundle")
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise BundleError(f"bundle '{path}': {MANIFEST} lacks {missing}", hint="rebuild the bundle")
        return manifest

    @classmethod
    def open(cls, path, verify: bool = True) -> "Bundle":
        """Read the manifest; with ``verify`` raise a BundleError on the first integrity problem."""
        bundle = cls(path, cls.read_manifest(path))
        if verify:
            problems = bundle.verify()
            if problems:
                more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
                raise BundleError(f"bundle '{bundle.path}' failed its integrity check: {problems[0]}{more}",
                                  hint="rebuild it with `jei-edge build`, or copy it again")
        return bundle

    # -- integrity ---------------------------------------------------------------------------
    def referenced_files(self) -> List[str]:
        """Every path the manifest refers to besides ``files`` itself."""
        m = self.manifest
        refs = [s.get("file") for s in m.get("stages", [])]
        if m.get("plain"):
            refs.append(m["plain"].get("file"))
        for key in ("model_file", "report", "report_text"):
            if m.get(key):
                refs.append(m[key])
        return refs

    def verify(self, check_hashes: bool = True) -> List[str]:
        """All integrity problems (empty = ok): unsafe/missing/altered/unlisted files, external data."""
        from jei_edge.runtime.onnx_scan import OnnxScanError, scan_onnx_file

        problems: List[str] = []
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not files:
            return ["manifest lists no files"]
        safe: Dict[str, Path] = {}
        for rel, entry in sorted(files.items()):
            try:
                p = resolve_inside(self.path, rel, "manifest file entry")
            except BundleError as exc:
                problems.append(exc.message)
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                problems.append(f"manifest entry for '{rel}' has no sha256")
                continue
            if not p.is_file():
                problems.append(f"file '{rel}' listed in the manifest is missing")
                continue
            if entry.get("size") is not None and p.stat().st_size != entry["size"]:
                problems.append(f"file '{rel}' has size {p.stat().st_size}, manifest says {entry['size']} (altered or truncated)")
                continue
            if check_hashes and sha256_file(p) != entry["sha256"]:
                problems.append(f"file '{rel}' does not match its sha256 in the manifest (altered or corrupted)")
                continue
            safe[rel] = p
        for rel in _walk_files(self.path):
            if rel != MANIFEST and rel not in files:
                problems.append(f"file '{rel}' is in the bundle but not in its manifest")
        for ref in self.referenced_files():
            if ref not in files:
                problems.append(f"manifest refers to '{ref}', which is not in its file list")
        for rel, p in safe.items():
            if not rel.endswith(".onnx"):
                continue
            try:
                info = scan_onnx_file(p)
            except OnnxScanError as exc:
                problems.append(f"'{rel}' is not a readable ONNX file ({exc})")
                continue
            base = PurePosixPath(rel).parent
            for loc in info.external_locations:
                what = f"external data of '{rel}'"
                try:
                    if not loc:
                        raise BundleError(f"{what} has no location")
                    check_relpath(loc, what)
                    target = (base / loc).as_posix()
                    resolve_inside(self.path, target, what)
                except BundleError as exc:
                    problems.append(exc.message)
                    continue
                if target not in files:
                    problems.append(f"{what}: '{target}' is not listed in the manifest")
        return problems

    # -- access ----------------------------------------------------------------------------------
    def file(self, relpath: str) -> Path:
        """Absolute path of a listed file inside the bundle (BundleError otherwise)."""
        if relpath not in self.manifest.get("files", {}):
            raise BundleError(f"bundle '{self.path}': '{relpath}' is not listed in its manifest")
        return resolve_inside(self.path, relpath, f"bundle '{self.path}'")

    @property
    def model_path(self) -> Optional[Path]:
        """The carried ``model.pt`` (None when the bundle was built without it)."""
        rel = self.manifest.get("model_file")
        return self.file(rel) if rel else None

    @property
    def stages(self) -> List[Dict[str, Any]]:
        return self.manifest["stages"]

    @property
    def num_stages(self) -> int:
        return len(self.manifest["stages"])

    @property
    def num_exits(self) -> int:
        return len(self.manifest["exits"]["positions"]) + 1

    @property
    def input_shape(self) -> List[int]:
        """``[C, H, W]`` of one sample (model input, after preprocessing)."""
        return [int(d) for d in self.manifest["input"]["shape"][1:]]

    def __repr__(self) -> str:
        return f"Bundle('{self.path}', stages={self.num_stages})"
