"""Confidence-thresholding baselines for JEI-DNN (numpy only).

A baseline is a confidence score on a set of IMs: ``p_max`` (max softmax probability) or
``max_logit`` (the largest raw logit, what the JEI-DNN reference's thresholding helper uses), on
the JEI model's own jointly trained IMs or on its IMs as they were after the warm-up phase (kept
in the checkpoint as ``warmup_ims``). ``BASELINES`` names the four combinations compared.

Protocol (as in the JEI-DNN reference's comparison, after MSDNet's budgeted evaluation): for a
budget ``q``, the fraction of samples that should leave at exit ``k`` is ``q^k / sum_j q^j`` over
the K exits. Thresholds are fitted on the validation split one exit at a time: among the samples
still present, the ones with the highest confidence at exit k leave until exit k has its share;
the final head takes the rest. Applying the thresholds to the test split gives one (cost,
accuracy) point; sweeping ``q`` gives the curve, compared with JEI at matched mean cost.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

from jei_edge.exit_rule import softmax

SCORES = ("p_max", "max_logit")
# name -> (which IMs, score); letters as in docs/training.md. "a" is the strongest version of the
# baseline (it shares JEI's IMs, so it isolates the gate); "d" is the reference helper's.
BASELINES: Dict[str, Tuple[str, str]] = {
    "a": ("jei", "p_max"),
    "b": ("jei", "max_logit"),
    "c": ("warmup", "p_max"),
    "d": ("warmup", "max_logit"),
}
BASELINE_LABELS = {k: f"{score} on {'JEI' if ims == 'jei' else 'warm-up-only'} IMs"
                   for k, (ims, score) in BASELINES.items()}

# q < 1 favours early exits, q > 1 late ones; log-spaced so the curve covers the whole cost range
DEFAULT_BUDGETS = tuple(float(v) for v in np.round(np.logspace(-2, np.log10(50.0), 41), 5))


def geometric_fractions(q: float, num_exits: int) -> np.ndarray:
    """Exit fractions ``q^k / sum_j q^j`` for ``k = 0..K-1``."""
    w = np.power(float(q), np.arange(num_exits, dtype=np.float64))
    return w / w.sum()


def confidence(logits: np.ndarray, score: str = "p_max") -> np.ndarray:
    """Per-exit confidence ``[N, K]`` of ``logits [N, K, C]`` under ``score`` (one of ``SCORES``)."""
    if score == "p_max":
        return softmax(logits).max(-1)
    if score == "max_logit":
        return np.asarray(logits, dtype=np.float64).max(-1)
    raise ValueError(f"unknown confidence score {score!r}; expected one of {SCORES}")


def fit_thresholds(pmax: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Per-exit confidence thresholds ``[K-1]`` giving ``fractions`` on the set ``pmax [N, K]``.

    A sample leaves at the first exit k < K-1 with ``pmax[:, k] >= thr[k]``. ``+inf`` means "no
    one leaves here".
    """
    n, k = pmax.shape
    targets = np.round(np.cumsum(fractions)[:-1] * n).astype(int)
    remaining = np.ones(n, dtype=bool)
    thr = np.full(k - 1, np.inf)
    taken = 0
    for j in range(k - 1):
        want = max(0, targets[j] - taken)
        live = np.flatnonzero(remaining)
        if want == 0 or len(live) == 0:
            continue
        conf = np.sort(pmax[live, j])[::-1]
        thr[j] = conf[min(want, len(conf)) - 1]
        leave = live[pmax[live, j] >= thr[j]]
        remaining[leave] = False
        taken += len(leave)
    return thr


def apply_thresholds(pmax: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Exit index per row: first k with ``pmax[:, k] >= thr[k]``, else the final exit."""
    n, k = pmax.shape
    hit = pmax[:, :-1] >= thr[None, :]
    return np.where(hit.any(1), hit.argmax(1), k - 1).astype(np.int64)


def baseline_curve(val_logits: np.ndarray, test_logits: np.ndarray, test_y: np.ndarray, costs: Dict,
                   budgets: Sequence[float] = DEFAULT_BUDGETS, score: str = "p_max") -> List[Dict]:
    """One point per budget: ``{q, thresholds, accuracy, mean_cost, mean_cost_vs_plain, exit_idx}``
    sorted by cost; thresholds on ``score`` (``SCORES``) fitted on ``val_logits``."""
    pv = confidence(val_logits, score)
    probs_t = softmax(test_logits)
    pt = confidence(test_logits, score)
    cost = np.asarray(costs["cost"])
    cost_plain = np.asarray(costs["cost_vs_plain"])
    k = val_logits.shape[1]
    points = []
    for q in budgets:
        thr = fit_thresholds(pv, geometric_fractions(q, k))
        idx = apply_thresholds(pt, thr)
        pred = probs_t[np.arange(len(idx)), idx].argmax(1)
        points.append({"q": float(q), "thresholds": thr.tolist(), "accuracy": float((pred == test_y).mean()),
                       "mean_cost": float(cost[idx].mean()), "mean_cost_vs_plain": float(cost_plain[idx].mean()),
                       "exit_idx": idx})
    points.sort(key=lambda p: (p["mean_cost"], p["q"]))
    return points


def accuracy_at_cost(points: Sequence[Dict], cost: float) -> float:
    """Baseline accuracy at ``cost`` by linear interpolation of the curve (clamped at the ends).

    Several points with the same cost are averaged first.
    """
    c = np.array([p["mean_cost"] for p in points])
    a = np.array([p["accuracy"] for p in points])
    uc = np.unique(c)
    ua = np.array([a[c == v].mean() for v in uc])
    return float(np.interp(cost, uc, ua))


def nearest_point(points: Sequence[Dict], cost: float) -> Dict:
    return min(points, key=lambda p: abs(p["mean_cost"] - cost))
