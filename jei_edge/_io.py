"""Small torch-free file helpers shared by the compiler, the checkpoint and the runtime."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path, write) -> None:
    """Write through ``write(fileobj)`` to a temp file beside ``path``, fsync, then rename.

    A crash or an exception at any point leaves either the old file or the new one, never a
    half-written file (the temp file is removed on failure).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- messages ---------------------------------------------------------------------------------------
ELLIPSIS = "..."


def shorten(text, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters, cut at a word boundary with an ellipsis.

    The one way user-facing messages quote long library text: whitespace (newlines included) is
    collapsed, and a cut never falls inside a word (a single word longer than the limit is cut
    after its last ``/``, ``.``, ``,`` or ``:`` that fits, and only then hard).
    """
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    room = max(limit - len(ELLIPSIS), 1)
    head = text[:room + 1]  # one more: a cut right before a space or separator is a boundary too
    cut = head.rfind(" ")
    if cut <= 0:  # one long token (a path, a dotted name): cut right after, or right before, a separator
        sep = max(head.rfind(c) for c in "/.,:;")
        cut = room if sep <= 0 else (sep + 1 if sep + 1 <= room else sep)
    return text[:cut].rstrip(" ,;:") + ELLIPSIS


# -- output paths -----------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_writable_output(path, what: str, *, directory: bool = False, option: str = "-o") -> Path:
    """Refuse an output path that cannot be written, before any work is done.

    Checks that ``path`` is not an existing directory (for a file output) or file (for a
    directory output), that no existing parent is a file, and that the nearest existing parent
    folder accepts new files (by creating and removing a probe file there: permissions, read-only
    file systems and pseudo file systems such as ``/proc`` all show). Missing parent folders are
    not created here (the writer creates them).

    Args:
        path: the output path.
        what: what is written, for the message ("checkpoint", "bundle").
        directory: the output is a directory (a bundle), not a file.
        option: the option that names the path, for the hint.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        JeiEdgeError: naming the path and the reason.
    """
    from jei_edge.errors import JeiEdgeError

    path = Path(path)
    hint = f"choose another {option} path, in a folder you can write to"
    if str(path).strip() == "":
        raise JeiEdgeError(f"the {what} path is empty", hint=f"give {option} PATH")
    if not directory and path.is_dir():
        raise JeiEdgeError(f"cannot write {what} '{path}': it is a folder", hint=f"give {option} a file name")
    if directory and os.path.lexists(path) and not path.is_dir():
        raise JeiEdgeError(f"cannot write {what} '{path}': a file of that name exists",
                           hint=f"{hint}, or remove the file yourself")
    parent = path.absolute().parent
    anchor = _nearest_existing(parent)
    if not anchor.is_dir():
        shown = anchor if path.is_absolute() else os.path.relpath(anchor)
        raise JeiEdgeError(f"cannot write {what} '{path}': '{shown}' is a file, not a folder", hint=hint)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.building-probe-", suffix=".partial", dir=anchor)
    except OSError as exc:
        import errno

        shown = anchor if path.is_absolute() else os.path.relpath(anchor)
        if exc.errno in (errno.EACCES, errno.EPERM):
            reason = f"folder '{shown}' is not writable (permission denied)"
        elif exc.errno == errno.EROFS:
            reason = f"folder '{shown}' is on a read-only file system"
        elif exc.errno == errno.ENAMETOOLONG:
            reason = "the file name is too long"
        else:
            reason = f"folder '{shown}' does not accept new files ({exc.strerror or type(exc).__name__})"
        raise JeiEdgeError(f"cannot write {what} '{path}': {reason}", hint=hint) from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return path
