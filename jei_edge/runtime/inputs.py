"""Inference inputs from files, folders or a stream, mapped to model inputs with the bundle's
preprocessing (shared by ``jei-edge run`` and ``jei-edge-run``; numpy + Pillow only).

Accepted inputs (policy, also in docs/runtime.md):

- ``.npy``: ``[N, C, H, W]``, one sample ``[C, H, W]``, or ``[N, H, W]`` / ``[H, W]`` for a
  one-channel model. Float arrays are **raw** values in ``[0, 1]`` (``--preprocessed``: already
  model inputs); ``uint8`` arrays are pixels ``0..255`` (divided by 255). Never unpickled.
- ``.npz``: array ``x`` (or its only array), optional labels ``y``.
- image files (png, jpg, ...): converted to gray/RGB, resized to the model's input, /255.
- a folder: one sub-folder per class (labels from folder names), or plain files inside it.
- a stream (``-``): ``.npy`` arrays one after another on stdin (``jei-edge-run`` only).

Hostile or broken files are refused with one ``InputError`` naming them, before anything large
is allocated: a ``.npy`` header (or ``.npz`` member header) is read first and the array it claims
must fit in the bytes that follow in the file (or zip member) and in ``max_array_bytes()`` (2 GiB,
``$JEI_EDGE_MAX_ARRAY_BYTES`` to change; on a stream it is the only bound); object (pickled)
arrays are never loaded; an array without samples (``N = 0``), from files or the stream, is
refused; inputs must be regular files or folders (a FIFO or device would block); images go
through ``jei_edge.data.sources.read_image`` (pixel bound before decoding, decoder failures as
errors).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from jei_edge._io import shorten
from jei_edge.errors import InputError, JeiEdgeError

RAW_SLACK = 1e-3  # raw values may exceed [0, 1] by this much (rounding) before we call them not raw
MAX_ARRAY_BYTES = 2 << 30  # one array from a file, an .npz member or the stream: 2 GiB of data
MAX_ARRAY_BYTES_ENV = "JEI_EDGE_MAX_ARRAY_BYTES"
_MAX_RANK = 32
_CHUNK = 1 << 24  # bytes per read of an array's data
_NPY_HINT = "write it with numpy.save (a float32 or uint8 array)"


@dataclass
class InputBatch:
    sources: List[str]  # one name per row, e.g. "a.npy[3]" or "img/cat/1.png"
    x: np.ndarray  # float32 [N, C, H, W] model input
    y: Optional[np.ndarray] = None  # int64 labels when the input carries them


def _sample_shape(shape: Sequence[int], input_shape: Sequence[int], what: str) -> Tuple[int, int, int, int]:
    """The ``[N, C, H, W]`` an array of ``shape`` is read as (see the module policy), or InputError."""
    c, h, w = (int(d) for d in input_shape)
    shape = tuple(int(d) for d in shape)
    if len(shape) == 4:
        out = shape
    elif len(shape) == 3 and shape == (c, h, w):
        out = (1,) + shape
    elif len(shape) == 3 and c == 1 and shape[1:] == (h, w):
        out = (shape[0], 1, h, w)
    elif len(shape) == 2 and c == 1 and shape == (h, w):
        out = (1, 1, h, w)
    else:
        raise InputError(f"{what} has shape {list(shape)}; expected [N, {c}, {h}, {w}] or one sample [{c}, {h}, {w}]")
    if out[1:] != (c, h, w):
        raise InputError(f"{what} has shape {list(out)}; the bundle expects [N, {c}, {h}, {w}]",
                         hint="resize the arrays to the model's input size, or pass image files (resized automatically)")
    return out


def _as_samples(arr: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
    return arr.reshape(_sample_shape(arr.shape, shape, what))


def _check_dtype(dtype: np.dtype, what: str, preprocessed: bool) -> None:
    """The input dtype policy (the module docstring): float, or uint8 pixels when raw."""
    if dtype.hasobject:
        raise InputError(f"{what} holds Python objects (dtype {dtype}); inputs are never unpickled",
                         hint="save a numeric array: float32 raw values in [0, 1] or uint8 pixels")
    if dtype.kind == "f" and not dtype.fields:
        return
    if dtype == np.uint8 and not preprocessed:
        return
    if preprocessed:
        raise InputError(f"{what} has dtype {dtype}; --preprocessed inputs must be float model inputs")
    raise InputError(f"{what} has dtype {dtype}; expected float (raw values in [0, 1]) or uint8 pixels")


def to_model_input(arr: np.ndarray, preprocessing: Dict, what: str, preprocessed: bool = False) -> np.ndarray:
    """An array from a file -> float32 model input ``[N, C, H, W]`` (see the module policy)."""
    from jei_edge.data.transforms import raw_to_model
    from jei_edge.runtime.validate import to_float32

    shape = [int(d) for d in preprocessing["input_shape"]]
    arr = np.asarray(arr)
    _check_dtype(arr.dtype, what, preprocessed)
    arr = _as_samples(arr, shape, what)
    if arr.dtype == np.uint8 and not preprocessed:
        arr = arr.astype(np.float32) / 255.0
    arr = to_float32(arr, what)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))
        raise InputError(f"{what} has NaN or infinite values in {bad.size} sample(s) (first: {int(bad[0])})")
    if preprocessed:
        return np.ascontiguousarray(arr)
    if arr.size and (arr.min() < -RAW_SLACK or arr.max() > 1 + RAW_SLACK):
        raise InputError(f"{what} holds values in [{arr.min():.3g}, {arr.max():.3g}], outside the raw range [0, 1]",
                         hint="pass --preprocessed if these are already model inputs (normalised)")
    return raw_to_model(arr, preprocessing)


# -- .npy / .npz, read header first -------------------------------------------------------------

def max_array_bytes() -> int:
    """The largest array (bytes of data) read from one file, ``.npz`` member or stream array."""
    text = os.environ.get(MAX_ARRAY_BYTES_ENV, "").strip()
    if not text:
        return MAX_ARRAY_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"${MAX_ARRAY_BYTES_ENV} is {text!r}; expected a positive number of bytes",
                         hint=f"e.g. {MAX_ARRAY_BYTES_ENV}={MAX_ARRAY_BYTES}, or unset it for the default (2 GiB)")
    return value


def _reason(exc: BaseException) -> str:
    """A library error in words: its first sentence(s), none of its advice to load unsafely."""
    text = " ".join(str(exc).split())
    keep = [t for t in text.replace(". ", ".\n").split("\n") if "pickle" not in t.lower()]
    return shorten(" ".join(keep)) or type(exc).__name__


def _size(n: int) -> str:
    """``n`` bytes in words: ``"200 bytes"``, ``"2 GiB"``, ``"3.55e+06 EiB"``."""
    if n < 1024:
        return f"{n} bytes"
    value, unit = float(n), "bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024.0
        if value < 1024:
            break
    return f"{value:.3g} {unit}"


class _Reader:
    """A binary stream that counts the bytes read and always returns whole reads (pipes give parts)."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.pos = stream, 0

    def read(self, n: int = -1) -> bytes:
        b = _read_exact(self.stream, n) if n is not None and n >= 0 else self.stream.read()
        self.pos += len(b)
        return b

    def read_into(self, buf: memoryview) -> int:
        """Fill ``buf`` as far as the stream goes; returns the bytes read."""
        readinto = getattr(self.stream, "readinto", None)
        got, n = 0, len(buf)
        while got < n:
            want = min(_CHUNK, n - got)
            if readinto is not None:
                k = readinto(buf[got:got + want]) or 0
            else:
                b = self.stream.read(want)
                k = len(b)
                buf[got:got + k] = b
            if not k:
                break
            got += k
        self.pos += got
        return got


NpyCheck = Callable[[Tuple[int, ...], np.dtype], None]
_MAX_HEADER = 10_000  # bytes of a .npy header dict (numpy's own default max_header_size)
_HEADERS: Dict[Tuple[Tuple[int, int], bytes], Tuple[Tuple[int, ...], bool, np.dtype]] = {}  # parsed, by bytes


def _read_header(r: _Reader, version: Tuple[int, int], what: str) -> Tuple[Tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the header after the magic: its length is bounded
    before it is read, and a header seen before (a stream of same-shaped arrays) is not re-parsed."""
    import struct

    from numpy.lib import format as npformat

    if version not in ((1, 0), (2, 0)):
        raise InputError(f"{what} has .npy format version {version[0]}.{version[1]}; "
                         "inputs must be version 1.0 or 2.0", hint=_NPY_HINT)
    fmt = "<H" if version == (1, 0) else "<I"
    size = r.read(struct.calcsize(fmt))
    if len(size) < struct.calcsize(fmt):
        raise InputError(f"{what} is truncated: it ends inside its .npy header", hint=_NPY_HINT)
    length = struct.unpack(fmt, size)[0]
    if length > _MAX_HEADER:
        raise InputError(f"{what} has a .npy header of {length:,} bytes; at most {_MAX_HEADER:,} are accepted",
                         hint=_NPY_HINT)
    header = r.read(length)
    if len(header) < length:
        raise InputError(f"{what} is truncated: it ends inside its .npy header", hint=_NPY_HINT)
    parsed = _HEADERS.get((version, header))
    if parsed is not None:
        return parsed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's note on Python-2 headers
            read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
            shape, fortran, dtype = read(io.BytesIO(size + header))
    except Exception as exc:  # a malformed header, whatever numpy raises for it
        raise InputError(f"{what} has a malformed .npy header ({_reason(exc)})", hint=_NPY_HINT) from None
    if len(_HEADERS) >= 64:
        _HEADERS.clear()
    _HEADERS[(version, header)] = parsed = (tuple(int(d) for d in shape), bool(fortran), dtype)
    return parsed


def _read_npy(r: _Reader, what: str, total: Optional[int], limit: int, check: Optional[NpyCheck] = None,
              magic: Optional[bytes] = None) -> np.ndarray:
    """One ``.npy`` array from ``r``: header first, then ``check(shape, dtype)`` and the size bounds
    (``total``: the size of the file or zip member, None on a stream; the data the header claims
    must fit in what follows the header, and in ``limit``), then the data.

    Never unpickles; ``magic``: the first 6 bytes when the caller has read them already.
    """
    from numpy.lib import format as npformat

    head = (magic or b"") + r.read(8 - len(magic or b""))
    if head[:6] != npformat.MAGIC_PREFIX:
        raise InputError(f"{what} is not in .npy format (bad magic bytes)", hint=_NPY_HINT)
    if len(head) < 8:
        raise InputError(f"{what} is truncated: it ends inside its .npy header", hint=_NPY_HINT)
    shape, fortran, dtype = _read_header(r, (head[6], head[7]), what)
    if dtype.hasobject:
        raise InputError(f"{what} holds Python objects (dtype {dtype}); inputs are never unpickled",
                         hint="save a numeric array: float32 raw values in [0, 1] or uint8 pixels")
    if len(shape) > _MAX_RANK or any(d < 0 for d in shape):
        raise InputError(f"{what} claims an invalid shape {shorten(str(list(shape)), 80)}", hint=_NPY_HINT)
    if check is not None:
        check(shape, dtype)
    nbytes = math.prod(shape) * dtype.itemsize

    def claim() -> str:
        return f"shape {list(shape)} of {dtype} ({_size(nbytes)})"

    available = None if total is None else max(total - r.pos, 0)
    if available is not None and nbytes > available:
        raise InputError(f"{what} is truncated or its header is wrong: it claims {claim()} but holds "
                         f"{_size(available)} of data", hint="write the file again with numpy.save")
    if nbytes > limit:
        raise InputError(f"{what} is too large: {claim()}, above the limit of {_size(limit)} per array",
                         hint=f"split it into smaller arrays, or raise the limit with ${MAX_ARRAY_BYTES_ENV}=BYTES")
    try:
        buf = np.empty(nbytes, dtype=np.uint8)  # pages are only committed as the data arrives
    except MemoryError:
        raise InputError(f"{what} does not fit in memory: {claim()}", hint="split it into smaller arrays") from None
    got = r.read_into(memoryview(buf))
    if got < nbytes:
        raise InputError(f"{what} is truncated: it claims {claim()} but only {_size(got)} of data follow",
                         hint="the writer stopped early; send whole arrays (numpy.save)")
    arr = buf.view(dtype)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def _open_input(path: Path, what: str):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read {what} ({exc.strerror or _reason(exc)})",
                         hint="check that it is a readable file") from None


def _x_check(prep: Dict, what: str, preprocessed: bool) -> NpyCheck:
    def check(shape, dtype):
        _check_dtype(dtype, what, preprocessed)
        _sample_shape(shape, prep["input_shape"], what)
    return check


def _y_check(where: str) -> NpyCheck:
    def check(shape, dtype):
        if dtype.kind not in "iu" or dtype.fields:
            raise InputError(f"{where}: labels y must be integers, got dtype {dtype}")
    return check


def _load_npy(path: Path, prep: Dict, preprocessed: bool) -> InputBatch:
    what = f"'{path}'"
    with _open_input(path, what) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise InputError(f"{what} is an empty file (0 bytes), not a .npy array", hint=_NPY_HINT)
            arr = _read_npy(_Reader(f), what, size, max_array_bytes(), _x_check(prep, what, preprocessed))
        except OSError as exc:
            raise InputError(f"cannot read {what} ({exc.strerror or _reason(exc)})") from None
    x = to_model_input(arr, prep, what, preprocessed)
    return InputBatch([f"{path.name}[{i}]" for i in range(len(x))], x)


_NPZ_HINT = "write it with numpy.savez(path, x=..., y=...)"


@contextlib.contextmanager
def _npz_errors(where: str):
    """Whatever a damaged or hostile archive makes zipfile/zlib raise -> one InputError."""
    import zipfile

    try:
        yield
    except JeiEdgeError:
        raise
    except zipfile.BadZipFile as exc:
        raise InputError(f"{where} is not a .npz archive, or a damaged one ({_reason(exc)})", hint=_NPZ_HINT) from None
    except Exception as exc:
        raise InputError(f"cannot read {where} as a .npz archive ({_reason(exc)})", hint=_NPZ_HINT) from None


class NpzReader:
    """An ``.npz`` archive read member by member, each header first (``np.load`` allocates what a
    member's header claims before reading it): object arrays are refused, a member's data must fit
    in the member and in ``max_bytes`` (default ``max_array_bytes()``). Every failure is an
    InputError naming the file. Use as a context manager::

        with NpzReader(path) as z:
            x = z.read("x")           # keys: z.keys ("x" for member "x.npy")
    """

    def __init__(self, path, max_bytes: Optional[int] = None):
        self.path = Path(path)
        self.where = f"'{self.path}'"
        self.limit = max_array_bytes() if max_bytes is None else int(max_bytes)
        self.keys: List[str] = []
        self._file = self._zip = None

    def __enter__(self) -> "NpzReader":
        import zipfile

        self._file = _open_input(self.path, self.where)
        try:
            with _npz_errors(self.where):
                if os.fstat(self._file.fileno()).st_size == 0:
                    raise InputError(f"{self.where} is an empty file (0 bytes), not a .npz archive", hint=_NPZ_HINT)
                self._zip = zipfile.ZipFile(self._file)
                self._members = {(i.filename[:-4] if i.filename.endswith(".npy") else i.filename): i
                                 for i in self._zip.infolist() if not i.is_dir()}
                self.keys = list(self._members)
        except BaseException:
            self._file.close()
            raise
        return self

    def read(self, key: str, check: Optional[NpyCheck] = None) -> np.ndarray:
        """Member ``key``; ``check(shape, dtype)`` runs on its header, before its data is read."""
        if key not in self._members:
            raise InputError(f"{self.where} lacks array '{key}' (has {shorten(str(self.keys), 120)})", hint=_NPZ_HINT)
        info = self._members[key]
        with _npz_errors(self.where), self._zip.open(info) as m:
            return _read_npy(_Reader(m), f"array '{key}' in {self.where}", info.file_size, self.limit, check)

    def __exit__(self, *exc) -> None:
        if self._zip is not None:
            self._zip.close()
        self._file.close()


def _load_npz(path: Path, prep: Dict, preprocessed: bool) -> InputBatch:
    where = f"'{path}'"
    with NpzReader(path) as z:
        if "x" in z.keys:
            xkey = "x"
        elif len(z.keys) == 1:
            xkey = z.keys[0]
        else:
            raise InputError(f"{where} holds arrays {shorten(str(z.keys), 120)}; expected one named 'x'")
        x_arr = z.read(xkey, _x_check(prep, f"array '{xkey}' in {where}", preprocessed))
        y = z.read("y", _y_check(where)) if "y" in z.keys and xkey != "y" else None
    x = to_model_input(x_arr, prep, where, preprocessed)
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if len(y) != len(x):
            raise InputError(f"{where}: labels y must be {len(x)} integers, got shape {list(y.shape)} dtype {y.dtype}")
        y = y.astype(np.int64)
    return InputBatch([f"{path.name}[{i}]" for i in range(len(x))], x, y)


def _load_images(paths: Sequence[Path], prep: Dict, names: Sequence[str], y=None) -> InputBatch:
    from jei_edge.data.sources import read_images
    from jei_edge.data.transforms import raw_to_model

    raw = read_images(list(paths), prep["input_shape"])
    return InputBatch(list(names), raw_to_model(raw, prep), y)


_INPUT_HINT = "pass .npy/.npz files, images or folders; jei-edge-run reads a stream of arrays from '-' (stdin)"


def path_kind(p: Path, what: str = "input", hint: Optional[str] = _INPUT_HINT) -> str:
    """Whether ``p`` is a "dir" or a "file"; an InputError naming it (as ``what``) when it is
    missing, a broken or looping symlink, or a FIFO, socket or device (reading one would block or fail)."""
    try:
        if p.is_dir():
            return "dir"
        if p.is_file():
            return "file"
        exists, link = p.exists(), p.is_symlink()
    except OSError as exc:  # e.g. a name too long
        raise InputError(f"cannot read {what} '{p}' ({exc.strerror or _reason(exc)})", hint=hint) from None
    if link and not exists:
        raise InputError(f"{what} '{p}' is a broken symbolic link (its target is missing, or the links loop)",
                         hint=hint)
    if not exists:
        raise InputError(f"{what} '{p}' does not exist", hint=hint)
    raise InputError(f"{what} '{p}' is not a regular file or a folder (a FIFO, socket or device)", hint=hint)


def load_path(path, preprocessing: Dict, preprocessed: bool = False, class_names: Optional[List[str]] = None) -> InputBatch:
    """One input path (file or folder) -> an ``InputBatch``."""
    from jei_edge.data.sources import list_images
    from jei_edge.data.transforms import is_image_file

    p = Path(path)
    if path_kind(p) == "dir":
        try:
            entries = sorted(p.iterdir())
            subdirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
            files = [f for f in entries if f.is_file() and not f.name.startswith(".")]
        except OSError as exc:
            raise InputError(f"cannot list folder '{p}' ({exc.strerror or _reason(exc)})",
                             hint="make the folder readable (and searchable) for this user") from None
        if subdirs:
            files, y, folder_classes = list_images(p)
            if class_names and set(folder_classes) <= set(class_names):
                y = np.asarray([class_names.index(folder_classes[i]) for i in y], dtype=np.int64)
            return _load_images(files, preprocessing, [f.relative_to(p).as_posix() for f in files], y)
        batches = [load_path(f, preprocessing, preprocessed) for f in files
                   if f.suffix.lower() in (".npy", ".npz") or is_image_file(f)]
        if not batches:
            raise InputError(f"folder '{p}' holds no .npy/.npz/image files")
        return concat(batches)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _load_npy(p, preprocessing, preprocessed)
    if suffix == ".npz":
        return _load_npz(p, preprocessing, preprocessed)
    if is_image_file(p):
        return _load_images([p], preprocessing, [p.name])
    raise InputError(f"input '{p}' is not a .npy/.npz file, an image or a folder")


def concat(batches: Sequence[InputBatch]) -> InputBatch:
    ys = [b.y for b in batches]
    y = np.concatenate(ys) if all(v is not None for v in ys) and ys else None
    return InputBatch([s for b in batches for s in b.sources], np.concatenate([b.x for b in batches]), y)


_EMPTY_HINT = "pass at least one sample: arrays [N, C, H, W] with N >= 1"


def load_inputs(paths: Sequence, preprocessing: Dict, preprocessed: bool = False,
                class_names: Optional[List[str]] = None) -> InputBatch:
    """All input paths -> one ``InputBatch`` (error if there are no samples)."""
    if not paths:
        raise InputError("no inputs given", hint="pass .npy/.npz files, images or folders")
    batch = concat([load_path(p, preprocessing, preprocessed, class_names) for p in paths])
    if len(batch.x) == 0:
        names = shorten(", ".join(f"'{p}'" for p in paths), 200)
        raise InputError(f"the inputs hold no samples (empty array{'s' if len(paths) > 1 else ''}: {names})",
                         hint=_EMPTY_HINT)
    return batch


def stream_npy(stream: BinaryIO, preprocessing: Dict, preprocessed: bool = False,
               name: str = "stdin", max_bytes: Optional[int] = None) -> Iterator[InputBatch]:
    """``.npy`` arrays one after another on a binary stream -> one ``InputBatch`` per array.

    Each header is read first: object arrays, wrong shapes or dtypes and arrays over ``max_bytes``
    (default ``max_array_bytes()``) are refused before their data is read; an array with no
    samples is refused like an empty input file.
    """
    from numpy.lib import format as npformat

    limit = max_array_bytes() if max_bytes is None else int(max_bytes)
    i = 0
    while True:
        what = f"{name} array {i}"
        try:
            head = _read_exact(stream, 6)
            if not head:
                return
            if head != npformat.MAGIC_PREFIX:
                raise InputError(f"{what} is not in .npy format (bad magic bytes)",
                                 hint="write each array with numpy.save(stream, array)")
            arr = _read_npy(_Reader(stream), what, None, limit, _x_check(preprocessing, what, preprocessed), head)
        except OSError as exc:
            raise InputError(f"cannot read {name} ({exc.strerror or _reason(exc)})") from None
        x = to_model_input(arr, preprocessing, what, preprocessed)
        if len(x) == 0:
            raise InputError(f"the inputs hold no samples (empty array: {what}, shape {list(arr.shape)})",
                             hint=_EMPTY_HINT)
        yield InputBatch([f"{name}[{i}][{j}]" for j in range(len(x))], x)
        i += 1


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        b = stream.read(left)
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)
