"""Data sources -> raw datasets (values in [0, 1] at the requested input shape).

``--data SOURCE`` is one of:

- ``digits``: scikit-learn's bundled handwritten digits (8x8, 0..16 scaled to [0, 1]), resized
  to the input shape (default ``(1, 16, 16)``, the built-in backbones' default);
- ``synthetic[:key=value,...]``: see ``jei_edge.data.synthetic`` (default shape ``(C, size, size)``);
- ``FILE.npz`` with ``x`` (``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]``; uint8 0..255 or
  floats in [0, 1]), ``y`` (integer labels) and optionally ``class_names`` (default: native shape);
- an image folder with one sub-folder per class (default shape ``(C, 32, 32)``, C = 1 when the
  first image is grayscale, else 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from jei_edge.errors import InputError
from jei_edge.data import transforms

SOURCE_HINT = "use 'digits', 'synthetic[:key=value,...]', a .npz file (x, y) or an image folder"
DIGITS_SHAPE = (1, 16, 16)
FOLDER_SIZE = 32


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
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read '{path}' as .npz ({exc})", hint="write it with numpy.savez") from exc
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


def _folder(path: Path, input_shape) -> RawData:
    paths, labels, names = transforms.list_image_folder(path)
    if input_shape is None:
        input_shape = (transforms.image_channels(paths[0]), FOLDER_SIZE, FOLDER_SIZE)
    return RawData(transforms.load_images(paths, input_shape), labels, names, str(path))


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
        paths, _, _ = transforms.list_image_folder(path)
        return (transforms.image_channels(paths[0]), FOLDER_SIZE, FOLDER_SIZE)
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
