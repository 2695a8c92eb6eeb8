"""Data sources -> raw datasets (values in [0, 1] at the requested input shape).

``--data SOURCE`` is one of:

- ``digits``: scikit-learn's bundled handwritten digits (8x8, 0..16 scaled to [0, 1]), resized
  to the input shape (default ``(1, 16, 16)``, the built-in backbones' default);
- ``synthetic[:key=value,...]``: see ``jei_edge.data.synthetic`` (default shape ``(C, size, size)``);
- ``FILE.npz`` with ``x`` (``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]``; uint8 0..255 or
  floats in [0, 1]), ``y`` (integer labels) and optionally ``class_names`` (default: native shape);
- an image folder with one sub-folder per class (default shape ``(C, 32, 32)``, C = 1 when the
  first image is grayscale, else 3).

Image files (here and in the runtime's input loader, ``jei_edge.runtime.inputs``) are read with
``read_image``: only the formats in ``IMAGE_FORMATS`` (no format that runs an external program),
at most ``MAX_IMAGE_PIXELS`` pixels (checked from the header, before anything is decoded), and
any failure of the decoder becomes one ``InputError`` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from jei_edge._io import shorten
from jei_edge.errors import InputError, JeiEdgeError
from jei_edge.data import transforms

SOURCE_HINT = "use 'digits', 'synthetic[:key=value,...]', a .npz file (x, y) or an image folder"
DIGITS_SHAPE = (1, 16, 16)
FOLDER_SIZE = 32

# Images larger than this (width x height, read from the header) are refused before decoding:
# 2**26 = 67,108,864 pixels (8192 x 8192), below Pillow's own decompression-bomb warning (~89 M).
MAX_IMAGE_PIXELS = 1 << 26
# The Pillow formats an image file may be in, whatever its extension says (a .jpg holding a PNG is
# fine). Formats that hand the file to an external program (EPS -> Ghostscript) are left out.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # JPEG includes its MPO variant
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # image modes read as one channel


@dataclass
class RawData:
    """A whole dataset before splitting: raw ``x`` in [0, 1], labels, class names."""

    x: np.ndarray  # float32 [N, C, H, W]
    y: np.ndarray  # int64 [N]
    class_names: List[str]
    source: str


def _shape(input_shape: Optional[Sequence[int]]) -> Optional[Tuple[int, int, int]]:
    if input_shape is None:
        return None
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"input shape {input_shape} must be (C, H, W) with positive sizes")
    return shape


def _digits(input_shape) -> RawData:
    from jei_edge._deps import require

    datasets = require("sklearn.datasets", purpose="the bundled 'digits' data set")
    d = datasets.load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    shape = input_shape or DIGITS_SHAPE
    return RawData(transforms.to_input_shape(x, shape), d.target.astype(np.int64),
                   [str(k) for k in d.target_names], "digits")


def _synthetic(source: str, input_shape) -> RawData:
    from jei_edge.data.synthetic import make_synthetic, parse_synthetic

    spec = parse_synthetic(source.partition(":")[2])
    x, y, _ = make_synthetic(spec)
    if input_shape is not None:
        x = transforms.to_input_shape(x, input_shape)
    return RawData(x, y, [f"class{k}" for k in range(spec.classes)], source)


def _npz_images(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
        if last and not first:
            x = x.transpose(0, 3, 1, 2)
        elif not first:
            raise InputError(f"'{path}': x has shape {x.shape}; channels (1 or 3) must be axis 1 or 3")
    else:
        raise InputError(f"'{path}': x has shape {x.shape}", hint="x must be [N, H, W], [N, C, H, W] or [N, H, W, C]")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise InputError(f"'{path}': x has dtype {x.dtype}, expected uint8 or float")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise InputError(f"'{path}': x contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(f"'{path}': float x ranges over [{lo:g}, {hi:g}], raw inputs must be in [0, 1]",
                         hint="store uint8 pixels (0..255) or floats scaled to [0, 1]")
    return x


def _npz(path: Path, input_shape) -> RawData:
    if not path.is_file():
        raise InputError(f"data file '{path}' does not exist", hint=SOURCE_HINT)
    from jei_edge.runtime.inputs import NpzReader

    with NpzReader(path) as f:  # header-first and bounded, never unpickling; InputError naming the file
        arrays = {k: f.read(k) for k in f.keys}
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise InputError(f"'{path}' lacks array(s) {missing} (has {sorted(arrays)})",
                         hint="save inputs as 'x' and integer labels as 'y': numpy.savez(path, x=..., y=...)")
    x = _npz_images(arrays["x"], path)
    y = np.asarray(arrays["y"]).reshape(-1)
    if len(y) != len(x):
        raise InputError(f"'{path}': x has {len(x)} samples but y has {len(y)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"'{path}': y has dtype {y.dtype}, expected integer class labels")
    if "class_names" in arrays:
        names = [str(s) for s in np.asarray(arrays["class_names"]).reshape(-1)]
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise InputError(f"'{path}': labels must lie in 0..{len(names) - 1} (one per class_names entry)")
    else:
        values = np.unique(y)
        names = [str(int(v)) for v in values]
        y = np.searchsorted(values, y)
    if len(names) < 2:
        raise InputError(f"'{path}' has {len(names)} class(es), needs at least 2")
    if input_shape is not None:
        x = transforms.to_input_shape(x, input_shape)
    return RawData(np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64), names, str(path))


# -- image files ----------------------------------------------------------------------------

def _decoder_reason(exc: BaseException, path) -> str:
    """What went wrong in Pillow, in words, without repeating the file name."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image in a supported format (corrupt, or not what its extension says)"
    text = shorten(str(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :")) or type(exc).__name__
    return text if isinstance(exc, OSError) else f"corrupt or unsupported image data ({text})"


def _image_file(path) -> Path:
    """``path`` if it is a regular file (not a folder, FIFO or device, which would block or fail)."""
    p = Path(path)
    try:
        regular = p.is_file()
        exists = regular or p.exists()
    except OSError as exc:  # e.g. a path component is not a directory, a name too long
        raise InputError(f"cannot read image '{p}' ({exc.strerror or exc})") from None
    if not regular:
        what = "does not exist" if not exists else "is not a regular file"
        raise InputError(f"image '{p}' {what}", hint="pass image files (png, jpg, ...), .npy/.npz files or folders")
    return p


def _with_image(path, use, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open image ``path`` lazily (header only), bound its size, then ``use(im)``; every decoder
    failure (corrupt, truncated, not an image, a decompression bomb) becomes one InputError."""
    from jei_edge._deps import require

    require("PIL", purpose="reading image files")  # a missing Pillow names the [images] extra
    from PIL import Image

    p = _image_file(path)
    Image.init()  # registers the format plugins; a Pillow built without one (WEBP) just lacks it
    formats = [f for f in IMAGE_FORMATS if f in Image.OPEN]
    try:
        with open(p, "rb") as f:
            tiff = f.read(4) in _TIFF_MAGIC
        # libtiff (TIFF files only) writes its complaints to file descriptor 2 itself, around
        # Pillow's exceptions: hold them and put them into the one error line
        with warnings.catch_warnings(), (_libtiff_messages() if tiff else contextlib.nullcontext(None)) as said:
            # Pillow's DecompressionBombWarning (and palette-conversion notes): our own bound below
            # decides, with one error instead of a warning on stderr
            warnings.simplefilter("ignore")
            try:
                with Image.open(p, formats=formats) as im:
                    w, h = im.size
                    if w * h > max_pixels:
                        raise _too_large(p, f"{w} x {h} = {w * h:,} pixels", max_pixels)
                    if w < 1 or h < 1:
                        raise InputError(f"image '{p}' has no pixels ({w} x {h})", hint="replace or remove that file")
                    return use(im, Image)
            except (JeiEdgeError, Image.DecompressionBombError, PermissionError):
                raise
            except Exception as exc:
                note = shorten(said()) if said else ""
                raise InputError(f"cannot read image '{p}': {_decoder_reason(exc, p)}"
                                 + (f" (libtiff: {note})" if note else ""),
                                 hint="replace or remove that file (is it a valid image?)") from None
    except JeiEdgeError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, hit while reading the header
        m = re.search(r"\((\d+) pixels\)", str(exc))
        limit = 2 * (Image.MAX_IMAGE_PIXELS or max_pixels)
        size = f"{int(m.group(1)):,} pixels" if m else f"more than {limit:,} pixels"
        raise _too_large(p, size, max_pixels) from None
    except PermissionError:
        raise InputError(f"cannot read image '{p}' (permission denied)",
                         hint="make the file readable for this user") from None
    except Exception as exc:  # any decoder failure on a hostile or broken file
        raise InputError(f"cannot read image '{p}': {_decoder_reason(exc, p)}",
                         hint="replace or remove that file (is it a valid image?)") from None


@contextlib.contextmanager
def _libtiff_messages():
    """Hold what C code writes to file descriptor 2 while decoding (libtiff prints its errors and
    warnings there); yields a function returning that text. Without a usable fd 2: a no-op."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield lambda: ""
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            def said() -> str:
                tmp.seek(0)
                return tmp.read(4096).decode("utf-8", "replace")
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _too_large(p: Path, size: str, max_pixels: int) -> InputError:
    return InputError(f"image '{p}' is too large: its header claims {size}; the limit is {max_pixels:,} pixels",
                      hint="downscale it first (the model takes small inputs), or remove it if it is not a real photo")


def read_image_channels(path) -> int:
    """1 for a grayscale image file, else 3 (InputError naming the file if it cannot be read)."""
    return _with_image(path, lambda im, Image: 1 if im.mode in _GRAY_MODES else 3)


def read_image(path, input_shape: Sequence[int], max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """One image file -> raw ``[C, H, W]`` float32 in [0, 1] at ``input_shape``.

    Converted to gray (``L``) or ``RGB`` for C = 1 / 3, resized bilinearly to (H, W), divided by
    255. Images over ``max_pixels`` are refused
    from their header, before decoding; any decoder failure is an InputError naming the file.
    """
    c, h, w = (int(v) for v in input_shape)
    if c not in (1, 3):
        raise InputError(f"image inputs need 1 or 3 channels, the model expects {c}")

    def use(im, Image):
        im = im.convert("L" if c == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), getattr(Image, "Resampling", Image).BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0

    arr = _with_image(path, use, max_pixels)
    return arr[None] if c == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def read_images(paths: Sequence[Path], input_shape: Sequence[int], max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Several image files -> raw ``[N, C, H, W]`` (the first unreadable file is the error)."""
    c, h, w = (int(v) for v in input_shape)
    out = np.empty((len(paths), c, h, w), dtype=np.float32)
    for i, p in enumerate(paths):
        out[i] = read_image(p, input_shape, max_pixels)
    return out


def list_images(folder) -> Tuple[List[Path], np.ndarray, List[str]]:
    """``transforms.list_image_folder`` with unreadable folders as an InputError naming them."""
    try:
        return transforms.list_image_folder(folder)
    except OSError as exc:
        where = exc.filename or folder
        raise InputError(f"cannot list image folder '{where}' ({exc.strerror or exc})",
                         hint="make the folder readable (and searchable) for this user") from None


def _folder(path: Path, input_shape) -> RawData:
    paths, labels, names = list_images(path)
    if input_shape is None:
        input_shape = (read_image_channels(paths[0]), FOLDER_SIZE, FOLDER_SIZE)
    return RawData(read_images(paths, input_shape), labels, names, str(path))


def default_input_shape(source: str) -> Tuple[int, int, int]:
    """The input shape ``load_raw(source)`` gives when none is requested."""
    source = (source or "").strip()
    if source == "digits":
        return DIGITS_SHAPE
    if source == "synthetic" or source.startswith("synthetic:"):
        from jei_edge.data.synthetic import parse_synthetic

        spec = parse_synthetic(source.partition(":")[2])
        return (spec.channels, spec.size, spec.size)
    path = Path(source).expanduser()
    if path.is_dir():
        paths, _, _ = list_images(path)
        return (read_image_channels(paths[0]), FOLDER_SIZE, FOLDER_SIZE)
    return tuple(int(v) for v in load_raw(source).x.shape[1:])


def load_raw(source: str, input_shape: Optional[Sequence[int]] = None) -> RawData:
    """Load a data source (see the module docstring) as raw [0, 1] arrays at ``input_shape``."""
    if not isinstance(source, str) or not source.strip():
        raise InputError("no data source given", hint=SOURCE_HINT)
    source = source.strip()
    shape = _shape(input_shape)
    if source == "digits":
        raw = _digits(shape)
    elif source == "synthetic" or source.startswith("synthetic:"):
        raw = _synthetic(source, shape)
    else:
        path = Path(source).expanduser()
        if path.suffix.lower() == ".npz":
            raw = _npz(path, shape)
        elif path.is_dir():
            raw = _folder(path, shape)
        elif path.exists():
            raise InputError(f"data source '{source}' is a file but not a .npz", hint=SOURCE_HINT)
        else:
            raise InputError(f"unknown data source '{source}' (no such file or folder)", hint=SOURCE_HINT)
    if len(raw.x) == 0:
        raise InputError(f"data source '{source}' holds no samples")
    return raw
