"""Torch-free transforms shared by training and the on-device runtime.

"Raw" inputs in jei-edge are values in ``[0, 1]`` at the model's input shape (images: pixel/255
after resize and colour conversion). A model's ``preprocessing`` dict
``{"input_shape": [C, H, W], "mean": [per channel], "std": [per channel]}`` maps raw to model
input with ``raw_to_model``. Everything here needs numpy only, so the runtime's input loader can
import it on a device without torch; image files are read by ``jei_edge.data.sources.read_image``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from jei_edge.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def check_preprocessing(preprocessing: Dict) -> Tuple[Tuple[int, int, int], np.ndarray, np.ndarray]:
    """Validate a preprocessing dict; return ``(input_shape, mean [C], std [C])``."""
    try:
        shape = tuple(int(v) for v in preprocessing["input_shape"])
        mean = np.asarray(preprocessing["mean"], dtype=np.float32)
        std = np.asarray(preprocessing["std"], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"preprocessing {preprocessing!r} is malformed ({exc})",
                         hint="it needs input_shape [C, H, W], mean and std per channel") from exc
    if len(shape) != 3 or mean.shape != (shape[0],) or std.shape != (shape[0],):
        raise InputError(f"preprocessing {preprocessing!r}: input_shape must be [C, H, W] and mean/std "
                         f"must have C = {shape[0] if shape else '?'} entries")
    if np.any(std <= 0):
        raise InputError(f"preprocessing std {std.tolist()} must be > 0")
    return shape, mean, std


def raw_to_model(x01: np.ndarray, preprocessing: Dict) -> np.ndarray:
    """Map raw inputs ``[N, C, H, W]`` in [0, 1] to model inputs ``(x01 - mean) / std`` (float32).

    Args:
        x01: raw batch at the model's input shape.
        preprocessing: the checkpoint's / bundle's preprocessing dict.

    Returns:
        float32 ``[N, C, H, W]``.
    """
    shape, mean, std = check_preprocessing(preprocessing)
    x = np.asarray(x01, dtype=np.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
        raise InputError(f"raw input has shape {tuple(x.shape)}, expected [N, {', '.join(map(str, shape))}]",
                         hint="resize/convert with jei_edge.data.transforms.to_input_shape first")
    return ((x - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)


def compute_preprocessing(x01: np.ndarray) -> Dict:
    """Per-channel mean/std of a raw ``[N, C, H, W]`` set (std floored at 1e-3)."""
    x = np.asarray(x01, dtype=np.float64)
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-3)
    return {"input_shape": [int(v) for v in x.shape[1:]], "mean": [float(v) for v in mean],
            "std": [float(v) for v in std]}


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of a triangle (bilinear) filter, widened when shrinking (antialias)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    pos = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(pos[None, :] - centres[:, None]) / support, 0.0, None)
    return w / w.sum(axis=1, keepdims=True)


def resize_array(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize ``[N, C, H, W]`` to ``[N, C, *size]`` with an antialiased bilinear filter (numpy only)."""
    x = np.asarray(x)
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x.astype(np.float32, copy=False)
    rh, rw = _resize_matrix(h, size[0]), _resize_matrix(w, size[1])
    return np.einsum("oh,nchw,pw->ncop", rh, x.astype(np.float64), rw, optimize=True).astype(np.float32)


def convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """``[N, C, H, W]`` with C in {1, 3} to ``channels`` (gray -> repeated RGB, RGB -> luminance)."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if c == 3 and channels == 1:
        return np.einsum("nchw,c->nhw", x.astype(np.float64), _LUMA)[:, None].astype(np.float32)
    raise InputError(f"cannot convert {c}-channel inputs to {channels} channels",
                     hint="use 1 (gray) or 3 (RGB) channels")


def to_input_shape(x01: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """Raw ``[N, C, H, W]`` in [0, 1] -> raw at ``input_shape`` (channel conversion + resize)."""
    c, h, w = (int(v) for v in input_shape)
    x = convert_channels(np.asarray(x01, dtype=np.float32), c)
    return np.clip(resize_array(x, (h, w)), 0.0, 1.0).astype(np.float32)


# -- image files (read by jei_edge.data.sources.read_image: bounded, every failure one error) --

def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_image_folder(folder) -> Tuple[List[Path], np.ndarray, List[str]]:
    """Files of an image-classification folder (one sub-folder per class, sorted by name).

    Returns:
        ``(paths, labels int64, class_names)``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder '{root}' does not exist or is not a directory")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise InputError(f"image folder '{root}' has {len(classes)} class sub-folders, needs at least 2",
                         hint="lay it out as FOLDER/<class name>/<image files>")
    paths, labels = [], []
    for k, cdir in enumerate(classes):
        files = sorted(p for p in cdir.iterdir() if is_image_file(p))
        if not files:
            raise InputError(f"class folder '{cdir}' holds no image files",
                             hint=f"supported extensions: {', '.join(IMAGE_EXTENSIONS)}")
        paths.extend(files)
        labels.extend([k] * len(files))
    return paths, np.asarray(labels, dtype=np.int64), [c.name for c in classes]
