"""Datasets for training and evaluation: built-in, synthetic, ``.npz`` and image folders.

Torch-free (numpy, scikit-learn for ``digits``, Pillow for image folders), so the runtime can use
``raw_to_model`` and the image loaders in ``jei_edge.data.transforms``.

Example::

    from jei_edge.data import load_data
    data = load_data("digits", input_shape=(1, 16, 16), seed=0)
    data.train.x.shape  # (N, 1, 16, 16), normalised with data.preprocessing
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from jei_edge.data.transforms import compute_preprocessing, raw_to_model
from jei_edge.errors import InputError

# train / validation / calibration / test fractions (validation: early stopping + gate pos_weights;
# calibration: conformal qhat only, as JEI-DNN asks)
SPLIT_FRACTIONS = (0.55, 0.15, 0.15, 0.15)
SPLIT_NAMES = ("train", "val", "calib", "test")


@dataclass
class Split:
    x: np.ndarray  # float32 [N, C, H, W], already normalised ((raw01 - mean) / std)
    y: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataSplits:
    train: Split
    val: Split
    calib: Split
    test: Split
    class_names: List[str]
    preprocessing: Dict  # {"input_shape": [C, H, W], "mean": [...], "std": [...]}
    source: str = ""
    seed: int = 0
    raw_test: Optional[np.ndarray] = field(default=None, repr=False)  # raw [0, 1] test inputs

    @property
    def input_shape(self):
        return tuple(self.preprocessing["input_shape"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise InputError(f"unknown split '{name}'", hint=f"use one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)


def split_indices(y: np.ndarray, seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS) -> List[np.ndarray]:
    """Deterministic stratified split of ``range(len(y))`` into ``len(fractions)`` index arrays.

    Each class is shuffled with ``seed`` and cut at the cumulative fractions, so every split has
    every class in about the same proportion. Each returned index array is shuffled too.
    """
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(fractions)[:-1] / float(np.sum(fractions))
    parts: List[List[np.ndarray]] = [[] for _ in fractions]
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        rng.shuffle(idx)
        bounds = np.round(cuts * len(idx)).astype(int)
        for j, piece in enumerate(np.split(idx, bounds)):
            parts[j].append(piece)
    out = []
    for pieces in parts:
        idx = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        rng.shuffle(idx)
        out.append(idx.astype(np.int64))
    return out


def load_data(source: str, input_shape: Optional[tuple] = None, seed: int = 0,
              preprocessing: Optional[Dict] = None) -> DataSplits:
    """Load ``source`` and split it into train / validation / calibration / test.

    Args:
        source: ``digits``, ``synthetic[:key=value,...]``, a ``.npz`` file or an image folder.
        input_shape: ``(C, H, W)`` to convert/resize to (default: the source's own, see
            ``jei_edge.data.sources``).
        seed: split seed (the same seed always gives the same splits).
        preprocessing: normalise with this dict (a trained model's) instead of the train
            split's own mean/std.

    Returns:
        ``DataSplits`` with normalised float32 inputs.
    """
    from jei_edge.data.sources import load_raw

    if preprocessing is not None and input_shape is None:
        input_shape = tuple(preprocessing["input_shape"])
    raw = load_raw(source, input_shape)
    idx = split_indices(raw.y, seed)
    small = [n for n, i in zip(SPLIT_NAMES, idx) if len(i) == 0]
    if small:
        raise InputError(f"data source '{source}' has {len(raw.y)} samples: too few for a "
                         f"train/val/calib/test split (empty: {', '.join(small)})",
                         hint="provide at least a few samples per class (>= 10 per class is a bare minimum)")
    prep = preprocessing if preprocessing is not None else compute_preprocessing(raw.x[idx[0]])
    splits = [Split(raw_to_model(raw.x[i], prep), raw.y[i]) for i in idx]
    return DataSplits(*splits, class_names=list(raw.class_names), preprocessing=prep, source=source,
                      seed=int(seed), raw_test=raw.x[idx[3]])


__all__ = ["DataSplits", "SPLIT_FRACTIONS", "Split", "load_data", "raw_to_model", "split_indices"]
