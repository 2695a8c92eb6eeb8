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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Sequence

import numpy as np

from jei_edge.errors import InputError

RAW_SLACK = 1e-3  # raw values may exceed [0, 1] by this much (rounding) before we call them not raw


@dataclass
class InputBatch:
    sources: List[str]  # one name per row, e.g. "a.npy[3]" or "img/cat/1.png"
    x: np.ndarray  # float32 [N, C, H, W] model input
    y: Optional[np.ndarray] = None  # int64 labels when the input carries them


def _as_samples(arr: np.ndarray, shape: Sequence[int], what: str) -> np.ndarray:
    c, h, w = shape
    if arr.ndim == 4:
        out = arr
    elif arr.ndim == 3 and tuple(arr.shape) == (c, h, w):
        out = arr[None]
    elif arr.ndim == 3 and c == 1 and tuple(arr.shape[1:]) == (h, w):
        out = arr[:, None]
    elif arr.ndim == 2 and c == 1 and tuple(arr.shape) == (h, w):
        out = arr[None, None]
    else:
        raise InputError(f"{what} has shape {list(arr.shape)}; expected [N, {c}, {h}, {w}] or one sample [{c}, {h}, {w}]")
    if tuple(out.shape[1:]) != (c, h, w):
        raise InputError(f"{what} has shape {list(out.shape)}; the bundle expects [N, {c}, {h}, {w}]",
                         hint="resize the arrays to the model's input size, or pass image files (resized automatically)")
    return out


def to_model_input(arr: np.ndarray, preprocessing: Dict, what: str, preprocessed: bool = False) -> np.ndarray:
    """An array from a file -> float32 model input ``[N, C, H, W]`` (see the module policy)."""
    from jei_edge.data.transforms import raw_to_model

    shape = [int(d) for d in preprocessing["input_shape"]]
    arr = _as_samples(np.asarray(arr), shape, what)
    if arr.dtype == np.uint8 and not preprocessed:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype.kind != "f":
        raise InputError(f"{what} has dtype {arr.dtype}; expected float (raw values in [0, 1]) or uint8 pixels")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))
        raise InputError(f"{what} has NaN or infinite values in {bad.size} sample(s) (first: {int(bad[0])})")
    if preprocessed:
        return np.ascontiguousarray(arr)
    if arr.size and (arr.min() < -RAW_SLACK or arr.max() > 1 + RAW_SLACK):
        raise InputError(f"{what} holds values in [{arr.min():.3g}, {arr.max():.3g}], outside the raw range [0, 1]",
                         hint="pass --preprocessed if these are already model inputs (normalised)")
    return raw_to_model(arr, preprocessing)


def _load_npy(path: Path, prep: Dict, preprocessed: bool) -> InputBatch:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read '{path}' as a .npy array ({exc})") from exc
    x = to_model_input(arr, prep, f"'{path}'", preprocessed)
    return InputBatch([f"{path.name}[{i}]" for i in range(len(x))], x)


def _load_npz(path: Path, prep: Dict, preprocessed: bool) -> InputBatch:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if "x" in keys:
                arr = z["x"]
            elif len(keys) == 1:
                arr = z[keys[0]]
            else:
                raise InputError(f"'{path}' holds arrays {keys}; expected one named 'x'")
            y = z["y"] if "y" in keys else None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read '{path}' as a .npz archive ({exc})") from exc
    x = to_model_input(arr, prep, f"'{path}'", preprocessed)
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if len(y) != len(x) or y.dtype.kind not in "iu":
            raise InputError(f"'{path}': labels y must be {len(x)} integers, got shape {list(y.shape)} dtype {y.dtype}")
        y = y.astype(np.int64)
    return InputBatch([f"{path.name}[{i}]" for i in range(len(x))], x, y)


def _load_images(paths: Sequence[Path], prep: Dict, names: Sequence[str], y=None) -> InputBatch:
    from jei_edge.data.transforms import load_images, raw_to_model

    raw = load_images(list(paths), prep["input_shape"])
    return InputBatch(list(names), raw_to_model(raw, prep), y)


def load_path(path, preprocessing: Dict, preprocessed: bool = False, class_names: Optional[List[str]] = None) -> InputBatch:
    """One input path (file or folder) -> an ``InputBatch``."""
    from jei_edge.data.transforms import is_image_file, list_image_folder

    p = Path(path)
    if not p.exists():
        raise InputError(f"input '{p}' does not exist")
    if p.is_dir():
        subdirs = [d for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if subdirs:
            files, y, folder_classes = list_image_folder(p)
            if class_names and set(folder_classes) <= set(class_names):
                y = np.asarray([class_names.index(folder_classes[i]) for i in y], dtype=np.int64)
            return _load_images(files, preprocessing, [f.relative_to(p).as_posix() for f in files], y)
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
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


def load_inputs(paths: Sequence, preprocessing: Dict, preprocessed: bool = False,
                class_names: Optional[List[str]] = None) -> InputBatch:
    """All input paths -> one ``InputBatch`` (error if there are no samples)."""
    if not paths:
        raise InputError("no inputs given", hint="pass .npy/.npz files, images or folders")
    batch = concat([load_path(p, preprocessing, preprocessed, class_names) for p in paths])
    if len(batch.x) == 0:
        raise InputError("the inputs hold no samples (empty array)")
    return batch


def stream_npy(stream: BinaryIO, preprocessing: Dict, preprocessed: bool = False,
               name: str = "stdin") -> Iterator[InputBatch]:
    """``.npy`` arrays one after another on a binary stream -> one ``InputBatch`` per array."""
    from numpy.lib import format as npformat

    i = 0
    while True:
        head = stream.read(6)
        if not head:
            return
        if head != npformat.MAGIC_PREFIX:
            raise InputError(f"{name}: array {i} is not in .npy format (bad magic bytes)",
                             hint="write each array with numpy.save(stream, array)")
        try:
            arr = npformat.read_array(_Prefixed(head, stream), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"{name}: cannot read array {i} ({exc})") from exc
        x = to_model_input(arr, preprocessing, f"{name} array {i}", preprocessed)
        yield InputBatch([f"{name}[{i}][{j}]" for j in range(len(x))], x)
        i += 1


class _Prefixed:
    """A read-only stream that first returns ``head`` (already consumed bytes), then ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head, self._stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                out, self._head = self._head + self._stream.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            if len(out) < n:
                out += _read_exact(self._stream, n - len(out))
            return out
        return _read_exact(self._stream, n) if n is not None and n >= 0 else self._stream.read()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        b = stream.read(left)
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)
