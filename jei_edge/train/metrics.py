"""Metrics and calibration of JEI-DNN outputs (numpy only): oracle exits, gate pos_weights,
accuracy/cost, ECE and split-conformal sets (docs/training.md, "Training" and "Evaluation").
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from jei_edge.exit_rule import conformal_sets, exit_levels, softmax
from jei_edge.train.config import ALPHAS, POS_WEIGHT_RULES

ECE_BINS = 15
CONFORMAL_MIN_EXITED = 20  # per-exit qhat falls back to all IM scores at or below this count


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample, per-exit CE: ``logits [N, K, C]``, ``y [N]`` -> ``[N, K]``."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    return lse - np.take_along_axis(z, np.asarray(y)[:, None, None], axis=-1)[..., 0]


def oracle_exits(ce: np.ndarray, costs: Sequence[float], lam: float) -> np.ndarray:
    """``l* = argmin_l [CE_l + lambda * c_l]`` per sample (``ce [N, K]``, ``costs [K]``, final = 1)."""
    return np.argmin(np.asarray(ce) + lam * np.asarray(costs, dtype=np.float64)[None, :], axis=1)


def gate_targets(oracle: np.ndarray, num_gates: int) -> np.ndarray:
    """``t_l = 1`` for ``l >= l*`` else 0, over the gated exits: ``[N, G]`` float32."""
    return (np.arange(num_gates)[None, :] >= np.asarray(oracle)[:, None]).astype(np.float32)


def pos_weights(oracle: np.ndarray, num_gates: int, cap: float = 5.0, rule: str = "reference") -> List[float]:
    """The BCE weight of each gate's positive targets (``t_l = [l >= l*]``), by ``rule``:

    - ``reference`` (the JEI-DNN reference's): ``min((N - n_l) / max(n_l, 0.1), cap)`` with ``n_l``
      the samples whose oracle exit *is* l, although gate l's positives are all samples with
      oracle exit <= l (so it over-weights the positives of later gates);
    - ``balanced``: the true ratio ``negatives / positives`` of gate l's targets, ``#(l* > l) /
      #(l* <= l)``, uncapped; 1 when either count is 0 (one class only: nothing to balance);
    - ``none``: 1 for every gate.
    """
    n = len(oracle)
    counts = np.bincount(np.asarray(oracle, dtype=np.int64), minlength=num_gates + 1)[:num_gates]
    if rule == "reference":
        return [float(min((n - c) / max(c, 0.1), cap)) for c in counts]
    if rule == "balanced":
        positives = np.cumsum(counts)
        return [float((n - p) / p) if 0 < p < n else 1.0 for p in positives]
    if rule == "none":
        return [1.0] * num_gates
    raise ValueError(f"unknown pos_weight rule {rule!r}; expected one of {POS_WEIGHT_RULES}")


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error x100 with ``bins`` equal-mass bins on the confidence.

    Bin edges are quantiles of the confidence over the whole set; coinciding edges are merged
    (so ties never create empty or split bins). Each bin is ``[e_i, e_{i+1})``, the last closed.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return float("nan")
    edges = np.unique(np.quantile(conf, np.linspace(0.0, 1.0, bins + 1)))
    idx = np.searchsorted(edges[1:-1], conf, side="right") if len(edges) > 2 else np.zeros(conf.size, int)
    total = 0.0
    for b in range(max(len(edges) - 1, 1)):
        m = idx == b
        if m.any():
            total += m.sum() / conf.size * abs(ok[m].mean() - conf[m].mean())
    return 100.0 * total


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """Split-conformal ``qhat``: the ``min(1, ceil((n+1)(1-alpha))/n)`` 'higher' quantile; ``1-alpha`` if n = 0."""
    n = len(scores)
    if n == 0:
        return 1.0 - alpha
    level = min(1.0, math.ceil((n + 1) * (1.0 - alpha)) / n)
    return float(np.quantile(np.asarray(scores, dtype=np.float64), level, method="higher"))


def qhat_table(probs_all: np.ndarray, exit_idx: np.ndarray, y: np.ndarray,
               alphas: Sequence[float] = ALPHAS, min_exited: int = CONFORMAL_MIN_EXITED) -> List[List[float]]:
    """Per-exit conformal thresholds ``[K][len(alphas)]`` from a calibration set.

    Args:
        probs_all: ``[N, K, C]`` softmax of every exit's head.
        exit_idx: ``[N]`` the exit each sample takes.
        y: ``[N]`` labels.

    Exit l uses the scores ``1 - p_y`` of the samples that exited there; with ``min_exited`` or
    fewer of them it falls back to the scores of IM l on all samples.
    """
    probs_all = np.asarray(probs_all)
    y = np.asarray(y)
    table = []
    for l in range(probs_all.shape[1]):
        scores = 1.0 - probs_all[np.arange(len(y)), l, y]
        here = exit_idx == l
        use = scores[here] if here.sum() > min_exited else scores
        table.append([conformal_quantile(use, a) for a in alphas])
    return table


def conformal_stats(probs: np.ndarray, exit_idx: np.ndarray, y: np.ndarray, table: Sequence[Sequence[float]],
                    alphas: Sequence[float] = ALPHAS) -> List[Dict]:
    """Mean set size and empirical coverage per alpha for exiting predictions ``probs [N, C]``."""
    out = []
    q = np.asarray(table, dtype=np.float64)  # [K, A]
    for j, a in enumerate(alphas):
        sets = conformal_sets(probs, q[exit_idx, j])
        out.append({"alpha": float(a), "mean_set_size": float(sets.sum(1).mean()),
                    "coverage": float(sets[np.arange(len(y)), y].mean())})
    return out


def exit_predictions(logits: np.ndarray, gates: np.ndarray, offsets: Optional[Sequence[float]] = None):
    """``(exit_idx [N], probs [N, C], probs_all [N, K, C])`` under the JEI exit rule."""
    probs_all = softmax(logits)
    idx = exit_levels(gates, offsets) if gates.shape[1] else np.zeros(len(logits), dtype=np.int64)
    return idx, probs_all[np.arange(len(idx)), idx], probs_all


def summarize(probs: np.ndarray, exit_idx: np.ndarray, y: np.ndarray, costs: Dict,
              table: Optional[Sequence[Sequence[float]]] = None, alphas: Sequence[float] = ALPHAS) -> Dict:
    """Accuracy, mean cost (both normalisations), exit histogram, ECE and conformal stats."""
    k = len(costs["cost"])
    correct = probs.argmax(1) == y
    hist = np.bincount(exit_idx, minlength=k)
    out = {
        "n": int(len(y)),
        "accuracy": float(correct.mean()),
        "mean_cost": float(np.asarray(costs["cost"])[exit_idx].mean()),
        "mean_cost_vs_plain": float(np.asarray(costs["cost_vs_plain"])[exit_idx].mean()),
        "exit_histogram": hist.tolist(),
        "exit_fractions": (hist / max(len(y), 1)).tolist(),
        "ece": ece(probs.max(1), correct),
    }
    if table is not None and len(table) and len(table[0]):
        out["conformal"] = conformal_stats(probs, exit_idx, y, table, alphas)
    return out
