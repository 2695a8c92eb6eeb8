"""Evaluate a trained checkpoint: JEI accuracy/cost/ECE/conformal and the thresholding baseline."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from jei_edge.data import DataSplits
from jei_edge.train.baseline import DEFAULT_BUDGETS, accuracy_at_cost, apply_thresholds, baseline_curve, nearest_point
from jei_edge.train.metrics import exit_predictions, qhat_table, summarize


def model_outputs(model, x: np.ndarray, batch_size: int = 512) -> Tuple[np.ndarray, np.ndarray]:
    """Every exit's logits ``[N, G+1, C]`` and gate outputs ``[N, G]`` of ``model`` on ``x``."""
    from jei_edge.train.features import FrozenFeatures, exit_outputs, freeze_backbone

    freeze_backbone(model)
    return exit_outputs(model, FrozenFeatures(model, x, batch_size, limit_mb=0), batch_size)


def _baseline_matched(point: Dict, test_probs_all, test_y, calib_logits, calib_y, costs, alphas) -> Dict:
    """ECE and conformal sets of one baseline operating point (qhat refitted on calibration for it)."""
    from jei_edge.exit_rule import softmax

    idx = point["exit_idx"]
    probs = test_probs_all[np.arange(len(idx)), idx]
    calib_probs_all = softmax(calib_logits)
    calib_idx = apply_thresholds(calib_probs_all.max(-1), np.asarray(point["thresholds"]))
    table = qhat_table(calib_probs_all, calib_idx, calib_y, alphas)
    s = summarize(probs, idx, test_y, costs, table, alphas)
    s["q"] = point["q"]
    return s


def evaluate_checkpoint(ckpt: Dict, data: DataSplits, budgets: Sequence[float] = DEFAULT_BUDGETS,
                        offsets: Optional[Sequence[float]] = None, batch_size: int = 512) -> Dict:
    """JEI metrics on the test split plus the max-softmax thresholding baseline on the same IMs.

    Args:
        ckpt: a calibrated checkpoint dict (``read_checkpoint`` / ``train_jei``).
        data: splits normalised with the checkpoint's preprocessing.
        budgets: geometric budgets ``q`` swept for the baseline curve.
        offsets: per-gate threshold offsets for the JEI rule (default: the trained model; the qhat
            table is then recomputed on the calibration split, as JEI-DNN requires).

    Returns:
        ``{"jei": summary, "baseline": {"curve": [...], "at_jei_cost": {...}}, "per_exit_accuracy": [...]}``.
    """
    from jei_edge.exit_rule import softmax
    from jei_edge.model.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(ckpt)
    costs = ckpt["costs"]
    calib = ckpt["calibration"]
    alphas = calib.get("alphas") or []
    test_logits, test_gates = model_outputs(model, data.test.x, batch_size)
    val_logits, _ = model_outputs(model, data.val.x, batch_size)
    calib_logits, calib_gates = model_outputs(model, data.calib.x, batch_size)
    y = data.test.y

    table = calib.get("qhat")
    if offsets is not None and any(float(o) != 0.0 for o in offsets) and alphas:
        cidx, _, cprobs_all = exit_predictions(calib_logits, calib_gates, offsets)
        table = qhat_table(cprobs_all, cidx, data.calib.y, alphas)
    idx, probs, probs_all = exit_predictions(test_logits, test_gates, offsets)
    jei = summarize(probs, idx, y, costs, table if alphas else None, alphas)

    curve = baseline_curve(val_logits, test_logits, y, costs, budgets)
    at = _baseline_matched(nearest_point(curve, jei["mean_cost"]), probs_all, y, calib_logits, data.calib.y,
                           costs, alphas)
    at["interpolated_accuracy"] = accuracy_at_cost(curve, jei["mean_cost"])
    return {
        "n_test": int(len(y)),
        "per_exit_accuracy": (probs_all.argmax(-1) == y[:, None]).mean(0).tolist(),
        "costs": {"cost": list(costs["cost"]), "cost_vs_plain": list(costs["cost_vs_plain"])},
        "jei": jei,
        "baseline": {"curve": [{k: v for k, v in p.items() if k != "exit_idx"} for p in curve],
                     "at_jei_cost": at},
    }
