"""Atomic bundle writing: build in a hidden temp directory beside the output, fsync, rename.

A build that fails or is killed (even with SIGKILL) never leaves a bundle at the output path:
until the final ``rename`` everything lives in ``.NAME.building-PID-XXXX/``. Such leftovers from
killed builds are removed by the next build of the same output (their PID is no longer alive).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from jei_edge.bundle import MANIFEST, SCHEMA, Manifest, sha256_file
from jei_edge.bundle.bundle import SIGNATURE
from jei_edge.errors import BuildError

_BUILDING = ".building-"
_OLD = ".old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(output: Path) -> list:
    """Remove ``.NAME.building-PID-*`` / ``.NAME.old-PID-*`` dirs beside ``output`` whose PID is gone."""
    removed = []
    parent, name = output.parent, output.name
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        for tag in (_BUILDING, _OLD):
            prefix = f".{name}{tag}"
            if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink():
                pid = p.name[len(prefix):].split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
    return removed


def _is_bundle_dir(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def check_output(output: Path, force: bool) -> None:
    """Refuse an output that cannot be written, before any work: an existing output unless
    ``force`` and it is a bundle (never rmtree anything else), a parent that is a file, a folder
    that does not accept new files (permissions, read-only or pseudo file systems such as
    ``/proc``). Every refusal is one ``BuildError`` naming the path."""
    from jei_edge._io import check_writable_output
    from jei_edge.errors import JeiEdgeError

    output = Path(output)
    if output.exists() or output.is_symlink():
        if not force:
            raise BuildError(f"output '{output}' already exists", hint="pass --force to replace it, or choose -o")
        if output.is_symlink() or not output.is_dir() or not _is_bundle_dir(output):
            raise BuildError(f"output '{output}' exists and is not a jei-edge bundle; refusing to replace it",
                             hint="choose another -o path or remove it yourself")
    try:
        check_writable_output(output, "bundle", directory=True)
    except BuildError:
        raise
    except JeiEdgeError as exc:
        raise BuildError(exc.message, hint=exc.hint) from None


def fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(Path(dirpath) / f)
        fsync_path(Path(dirpath))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def file_table(root: Path) -> Dict[str, Dict[str, Any]]:
    """``{relpath: {"sha256", "size"}}`` of every file under ``root`` except the manifest."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            raise BuildError(f"bundle staging area holds a symlink '{p}'")
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in (MANIFEST, SIGNATURE):
                table[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return table


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Hash every file under ``root`` into ``manifest.files``, check the manifest as a reader would
    (``Manifest.validate``) and write ``root/manifest.json``. Returns the manifest written."""
    manifest = manifest.replace(files=file_table(root))
    manifest.validate()
    (root / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


class StagingDir:
    """``with StagingDir(output, force) as tmp: ...; staging.commit()`` — rename into place on commit,
    remove the temp dir on any exception (or when leaving without commit)."""

    def __init__(self, output: Path, force: bool = False):
        self.output = Path(output)
        self.force = force
        self.tmp: Optional[Path] = None
        self.committed = False

    def __enter__(self) -> "StagingDir":
        check_output(self.output, self.force)  # before creating anything
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.output)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.output.name}{_BUILDING}{os.getpid()}-",
                                             dir=self.output.parent))
        except OSError as exc:  # a race with the checks above (the folder changed under us)
            raise BuildError(f"cannot write bundle '{self.output}': {exc.strerror or type(exc).__name__}",
                             hint="choose another -o path, in a folder you can write to") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; a bundle is an ordinary directory
        return self

    def commit(self) -> Path:
        assert self.tmp is not None
        fsync_tree(self.tmp)
        check_output(self.output, self.force)
        old = None
        if self.output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.output.name}{_OLD}{os.getpid()}-", dir=self.output.parent))
            os.rename(self.output, old / "bundle")
        os.rename(self.tmp, self.output)
        self.committed = True
        fsync_path(self.output.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.output

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def copy_bundle(bundle, root: Path, skip=()) -> None:
    """Copy an opened (verified) ``bundle``'s files and manifest into ``root`` (a staging
    directory), except the relative paths in ``skip``: the first step of rewriting a bundle
    atomically (``jei-edge lower``, ``jei-edge tune``)."""
    for rel in bundle.manifest.files:
        if rel not in skip:
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.file(rel), dst)
    shutil.copyfile(Path(bundle.path) / MANIFEST, root / MANIFEST)
