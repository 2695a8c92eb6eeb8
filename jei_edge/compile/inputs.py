"""The inputs a build works on: real data (parity, ``--plan auto``, INT8 calibration) and the mix of
real and synthetic inputs the parity checks run on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from jei_edge.errors import BuildError, JeiEdgeError


@dataclass(frozen=True)
class RealData:
    """Real model inputs for a build.

    Attributes:
        x: the test + calibration + validation splits, normalised (None: no data could be loaded).
        source: the data source they came from.
        splits: the loaded ``DataSplits`` (reused for INT8 calibration).
        note: why there are none (for the build report), or "".
    """

    x: Optional[np.ndarray] = None
    source: Optional[str] = None
    splits: object = None
    note: str = ""
    held_out: int = 0  # leading rows of x from the test split: never INT8 calibration samples


def _recorded(ckpt: Dict) -> Dict:
    return (ckpt.get("training") or {}).get("data") or {}


def load_real(ckpt: Dict, data: Optional[str], seed: int) -> RealData:
    """Real inputs from ``data`` or the source recorded in the checkpoint.

    Args:
        ckpt: the checkpoint dict.
        data: ``--data`` (None: the recorded source).
        seed: split seed when the checkpoint records none.

    Returns:
        ``RealData`` (empty, with a note, when no source is known or the recorded one cannot be
        loaded; an explicit ``data`` that cannot be loaded raises).
    """
    rec = _recorded(ckpt)
    source = data or rec.get("source")
    if not source:
        return RealData(note="no data source given or recorded in the checkpoint: parity used synthetic inputs "
                             "only (pass --data SOURCE)")
    from jei_edge.data import load_data

    try:
        d = load_data(source, preprocessing=ckpt["preprocessing"], seed=int(rec.get("split_seed", seed)))
    except JeiEdgeError as exc:
        if data:
            raise
        return RealData(note=f"recorded data source '{source}' could not be loaded ({exc}); synthetic inputs only")
    return RealData(np.concatenate([d.test.x, d.calib.x, d.val.x]), source, d, held_out=len(d.test.x))


def calibration_inputs(ckpt: Dict, recipe, data: Optional[str], seed: int, real: RealData) -> np.ndarray:
    """INT8 calibration inputs: the calibration split (then validation) of the recipe's data, of
    ``data``, or of the data recorded in the checkpoint; at most ``recipe.samples`` rows.

    Args:
        ckpt: the checkpoint dict.
        recipe: the calibration ``Recipe``.
        data: ``--data``.
        seed: split seed when the checkpoint records none.
        real: the build's real inputs (their splits are reused when the source is the same).
    """
    rec = _recorded(ckpt)
    source = recipe.data or data or rec.get("source")
    if not source:
        raise BuildError("INT8 needs calibration data and none is given or recorded in the checkpoint",
                         hint="pass --data SOURCE (e.g. the data the model was trained on) or set data in the recipe")
    d = real.splits if real.source == source else None
    if d is None:
        from jei_edge.data import load_data

        d = load_data(source, preprocessing=ckpt["preprocessing"], seed=int(rec.get("split_seed", seed)))
    x = np.concatenate([d.calib.x, d.val.x])[:recipe.samples]
    if len(x) == 0:
        raise BuildError(f"INT8 calibration set from '{source}' is empty", hint="use a data source with samples")
    return np.ascontiguousarray(x)


def parity_inputs(preprocessing: Dict, real: Optional[np.ndarray], n: int, seed: int = 0,
                  held_out: int = 0) -> Tuple[np.ndarray, Dict[str, int]]:
    """``n`` model inputs, grouped by kind: up to half real, the rest synthetic of several kinds.

    Real rows come first: ``real_held_out`` (the first ``held_out`` rows of ``real``: the test
    split, never an INT8 calibration sample), then ``real`` (calibration and validation splits).

    Synthetic kinds: uniform raw noise, smooth random images (upsampled coarse noise), and when
    real inputs exist, blends of two real inputs and real inputs plus Gaussian noise: together they
    spread gate values over the whole range, ties included.

    Returns:
        ``(x [n, C, H, W] float32, rows of each kind in order)``.
    """
    from jei_edge.data.transforms import raw_to_model

    rng = np.random.default_rng(seed)
    c, h, w = (int(v) for v in preprocessing["input_shape"])
    parts: List[np.ndarray] = []
    counts: Dict[str, int] = {}
    k = min(len(real), n // 2) if real is not None else 0
    if k:
        parts.append(np.asarray(real[:k], dtype=np.float32))
        n_held = min(k, max(0, int(held_out)))
        counts.update({name: m for name, m in (("real_held_out", n_held), ("real", k - n_held)) if m})
    rest = n - k
    kinds = ["uniform_noise", "smooth_noise"] + (["real_blend", "real_plus_noise"] if k else [])
    sizes = [rest // len(kinds) + (1 if i < rest % len(kinds) else 0) for i in range(len(kinds))]
    for kind, m in zip(kinds, sizes):
        if m == 0:
            continue
        if kind == "uniform_noise":
            x = raw_to_model(rng.random((m, c, h, w), dtype=np.float32), preprocessing)
        elif kind == "smooth_noise":
            fh, fw = max(1, h // 4), max(1, w // 4)
            coarse = rng.random((m, c, fh, fw), dtype=np.float32)
            up = np.repeat(np.repeat(coarse, -(-h // fh), axis=2), -(-w // fw), axis=3)[:, :, :h, :w]
            x = raw_to_model(np.ascontiguousarray(up), preprocessing)
        elif kind == "real_blend":
            r = parts[0]
            a, b = rng.integers(0, len(r), m), rng.integers(0, len(r), m)
            t = rng.random(m, dtype=np.float32)[:, None, None, None]
            x = t * r[a] + (1 - t) * r[b] + 0.1 * rng.standard_normal((m, c, h, w), dtype=np.float32)
        else:
            r = parts[0]
            s = rng.random(m, dtype=np.float32)[:, None, None, None]
            x = r[rng.integers(0, len(r), m)] + s * rng.standard_normal((m, c, h, w), dtype=np.float32)
        parts.append(np.asarray(x, dtype=np.float32))
        counts[kind] = m
    return np.ascontiguousarray(np.concatenate(parts)), counts
