"""The JEI-DNN exit rule and gate features: the numpy reference (torch-free).

Every backend (the PyTorch model, onnxruntime stages, the CUDA exit kernel) is tested against the
functions here. See docs/architecture.md, "Definitions".

Exit rule: keep a per-sample running sum ``S`` of gate outputs, starting at 0. At gate ``l``::

    exit at l  if  g_l >= (1 - S) / 2 + delta_l ;   then S <- S + g_l

A sample that no gate takes exits at the final head.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

FEATURE_NAMES = ("p_max", "entropy", "margin", "entropy_sq")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - np.max(z, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically safe softmax over the last axis (float64 math, input dtype kept for float32)."""
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(_log_softmax(z))


def gate_features(logits: np.ndarray) -> np.ndarray:
    """The four gate features of ``p = softmax(logits)`` over the last axis, in float64.

    Order: p_max, entropy ``-sum p log p``, margin ``p_top1 - p_top2``, entropy of
    ``q = p^2 / sum p^2 = softmax(2 z)``. Both entropies come from log-softmax so underflowed
    probabilities never produce ``log(0)``.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[-1] < 2:
        raise ValueError("gate features need at least 2 classes")
    lp = _log_softmax(z)
    p = np.exp(lp)
    lq = _log_softmax(2.0 * z)
    q = np.exp(lq)
    top2 = -np.sort(-p, axis=-1)[..., :2]
    # 0 * log 0 = 0: mask log-probs of zero-probability classes (they may be -inf)
    ent = -np.sum(p * np.where(p > 0, lp, 0.0), axis=-1)
    ent_q = -np.sum(q * np.where(q > 0, lq, 0.0), axis=-1)
    return np.stack([top2[..., 0], ent, top2[..., 0] - top2[..., 1], ent_q], axis=-1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def exit_threshold(S, delta=0.0):
    """The gate value a sample with running sum ``S`` must reach to exit: ``(1 - S)/2 + delta``.

    Works on numpy arrays and on plain Python floats alike (the batch-1 runtime path passes floats
    to stay off numpy's per-call overhead; the arithmetic is float64 either way).
    """
    return (1.0 - S) * 0.5 + delta


def exit_mask(g, S, delta=0.0):
    """Which rows exit at this gate: ``g >= (1 - S)/2 + delta`` (elementwise; a bool for floats)."""
    return g >= exit_threshold(S, delta)


def exit_levels(g: np.ndarray, offsets: Optional[Sequence[float]] = None, return_margin: bool = False):
    """Exit index of every row given all gate outputs.

    Args:
        g: ``[N, G]`` gate outputs (sigmoid) for the G gated exits, in order.
        offsets: per-gate threshold offsets ``delta_l`` (default all 0 = the trained model).
        return_margin: also return ``[N, G]`` of ``g - threshold`` at every gate a row reached
            (NaN where it had already exited); parity checks use it to spot ties.

    Returns:
        ``levels [N]`` int64 in ``0..G`` (``G`` = the final head), and the margins if asked.
    """
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2:
        raise ValueError(f"g must be [N, G], got shape {g.shape}")
    n, n_gates = g.shape
    deltas = np.zeros(n_gates) if offsets is None else np.asarray(offsets, dtype=np.float64)
    if deltas.shape != (n_gates,):
        raise ValueError(f"offsets must have {n_gates} entries, got {deltas.shape}")
    levels = np.full(n, n_gates, dtype=np.int64)
    live = np.ones(n, dtype=bool)
    S = np.zeros(n)
    margin = np.full((n, n_gates), np.nan)
    for l in range(n_gates):
        thr = exit_threshold(S, deltas[l])
        margin[live, l] = g[live, l] - thr[live]
        fire = live & (g[:, l] >= thr)
        levels[fire] = l
        live &= ~fire
        S = S + g[:, l]
    return (levels, margin) if return_margin else levels


def conformal_sets(probs: np.ndarray, qhat) -> np.ndarray:
    """Boolean ``[N, C]`` membership of split-conformal sets ``{k : p_k >= 1 - qhat}``.

    ``qhat``: one value for all rows, or one per row (``[N]``, e.g. the qhat of each row's exit).
    """
    probs = np.asarray(probs)
    q = np.asarray(qhat, dtype=np.float64)
    if q.ndim == 1:
        q = q[:, None]
    return probs >= (1.0 - q)
