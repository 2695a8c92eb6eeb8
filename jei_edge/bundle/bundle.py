"""The compiled bundle ``NAME.jei/`` on disk: path rules and the integrity check.

The layout and the manifest schema are ``jei_edge.bundle.manifest``.
``Manifest.files`` maps every other file's relative path to its sha256 and size. The check
here detects corruption and accidental edits; it is an **integrity check, not security**: whoever
can edit a file can rewrite the manifest too. Every path (manifest entries, ONNX external data)
must stay inside the bundle: absolute paths, ``..`` and symlinks leading out are refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, List, Optional

from jei_edge.bundle.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest, decode_manifest
from jei_edge.errors import BundleError

SIGNATURE = "manifest.sig"  # the one unlisted file a bundle may hold (jei_edge.bundle.signing)


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
    try:
        root_r = Path(root).resolve()
        target = (root_r / rel).resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop, an unreadable folder on the way
        raise BundleError(f"{what}: '{rel}' cannot be resolved ({type(exc).__name__}: {exc})",
                          hint="a symlink in the bundle loops or is unreadable; copy the bundle again") from None
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
    """A bundle directory and its typed manifest. ``Bundle.open`` parses and verifies it."""

    def __init__(self, path, manifest: Manifest):
        self.path = Path(path)
        self.manifest = manifest

    # -- opening ---------------------------------------------------------------------------
    @staticmethod
    def read_manifest(path) -> Manifest:
        """Parse ``path/manifest.json`` (BundleError naming the field for anything malformed)."""
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
            with open(mpath, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise BundleError(f"bundle '{path}': {MANIFEST} cannot be read ({exc.strerror})") from None
        return decode_manifest(data, f"bundle '{path}'")

    @classmethod
    def open(cls, path, verify: bool = True) -> "Bundle":
        """Read the manifest; with ``verify`` raise a BundleError on the first integrity problem."""
        bundle = cls(path, cls.read_manifest(path))
        if verify:
            bundle.check_integrity()
        return bundle

    def check_integrity(self) -> None:
        """Raise a BundleError naming the first integrity problem (``verify``), if any."""
        problems = self.verify()
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise BundleError(f"bundle '{self.path}' failed its integrity check: {problems[0]}{more}",
                              hint="rebuild it with `jei-edge build`, or copy it again")

    # -- integrity ---------------------------------------------------------------------------
    def verify(self, check_hashes: bool = True) -> List[str]:
        """All integrity problems (empty = ok): unsafe/missing/altered/unlisted files, external data."""
        from jei_edge.bundle.onnx_scan import OnnxScanError, scan_onnx_file

        problems: List[str] = []
        files = self.manifest.files
        if not files:
            return ["manifest lists no files"]
        safe: Dict[str, Path] = {}
        for rel, entry in sorted(files.items()):
            try:
                p = resolve_inside(self.path, rel, "manifest file entry")
            except BundleError as exc:
                problems.append(exc.message)
                continue
            if not p.is_file():
                problems.append(f"file '{rel}' listed in the manifest is missing")
                continue
            if entry.get("size") is not None and p.stat().st_size != entry["size"]:
                problems.append(f"file '{rel}' has size {p.stat().st_size}, manifest says {entry['size']} (altered or truncated)")
                continue
            try:
                digest = sha256_file(p) if check_hashes else None
            except OSError as exc:
                problems.append(f"file '{rel}' cannot be read ({exc.strerror or exc})")
                continue
            if check_hashes and digest != entry["sha256"]:
                problems.append(f"file '{rel}' does not match its sha256 in the manifest (altered or corrupted)")
                continue
            safe[rel] = p
        for rel in _walk_files(self.path):
            if rel not in (MANIFEST, SIGNATURE) and rel not in files:
                problems.append(f"file '{rel}' is in the bundle but not in its manifest")
        for ref in self.manifest.referenced_files():
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
        if relpath not in self.manifest.files:
            raise BundleError(f"bundle '{self.path}': '{relpath}' is not listed in its manifest")
        return resolve_inside(self.path, relpath, f"bundle '{self.path}'")

    @property
    def model_path(self) -> Optional[Path]:
        """The carried ``model.pt`` (None when the bundle was built without it)."""
        rel = self.manifest.model_file
        return self.file(rel) if rel else None

    @property
    def stages(self):
        return self.manifest.stages

    @property
    def num_stages(self) -> int:
        return self.manifest.num_stages

    @property
    def num_exits(self) -> int:
        return self.manifest.num_exits

    @property
    def input_shape(self) -> List[int]:
        """``[C, H, W]`` of one sample (model input, after preprocessing)."""
        return list(self.manifest.input.shape)

    def __repr__(self) -> str:
        return f"Bundle('{self.path}', stages={self.num_stages})"
