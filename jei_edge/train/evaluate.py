"""Evaluate a trained checkpoint: JEI accuracy/cost/ECE/conformal and the thresholding baselines.

The baselines (``jei_edge.train.baseline.BASELINES``): (a) p_max and (b) max-logit thresholding on
JEI's own IMs, (c) p_max and (d) max-logit thresholding on the IMs as they were after the warm-up
phase (only when the checkpoint carries ``warmup_ims``). Each is a curve over geometric budgets
with thresholds fitted on the validation split, compared with JEI at JEI's mean test cost.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from jei_edge.data import DataSplits
from jei_edge.train.baseline import (BASELINE_LABELS, BASELINES, DEFAULT_BUDGETS, accuracy_at_cost, apply_thresholds,
                                     baseline_curve, confidence, nearest_point)
from jei_edge.train.metrics import exit_predictions, qhat_table, summarize

# per-split hidden states are cached below this size so the warm-up IMs reuse the backbone pass
EVAL_CACHE_MB = 256


def model_outputs(model, x: np.ndarray, batch_size: int = 512) -> Tuple[np.ndarray, np.ndarray]:
    """Every exit's logits ``[N, G+1, C]`` and gate outputs ``[N, G]`` of ``model`` on ``x``."""
    return split_outputs([model], x, batch_size)[0]


def split_outputs(models: Sequence, x: np.ndarray, batch_size: int = 512):
    """``model_outputs`` of several models that share one frozen backbone (a JEI model and its
    warm-up twin), running the backbone once when the split's hidden states fit ``EVAL_CACHE_MB``."""
    from jei_edge.train.features import FrozenFeatures, exit_outputs, freeze_backbone

    for m in models:
        freeze_backbone(m)
    feats = FrozenFeatures(models[0], x, batch_size, limit_mb=EVAL_CACHE_MB if len(models) > 1 else 0)
    return [exit_outputs(m, feats, batch_size) for m in models]


def _baseline_matched(point: Dict, test_probs_all, test_y, calib_logits, calib_y, costs, alphas,
                      score: str = "p_max") -> Dict:
    """ECE and conformal sets of one baseline operating point (qhat refitted on calibration for it)."""
    from jei_edge.exit_rule import softmax

    idx = point["exit_idx"]
    probs = test_probs_all[np.arange(len(idx)), idx]
    calib_probs_all = softmax(calib_logits)
    calib_idx = apply_thresholds(confidence(calib_logits, score), np.asarray(point["thresholds"]))
    table = qhat_table(calib_probs_all, calib_idx, calib_y, alphas)
    s = summarize(probs, idx, test_y, costs, table, alphas)
    s["q"] = point["q"]
    return s


def baseline_at_cost(name: str, logits: Dict[str, np.ndarray], data: DataSplits, costs: Dict, alphas,
                     cost: float, budgets: Sequence[float] = DEFAULT_BUDGETS) -> Dict:
    """Baseline ``name`` (a-d): its curve on the test split and its point at mean cost ``cost``.

    ``logits``: ``{"val", "test", "calib"}`` -> ``[N, K, C]`` of the IMs the baseline uses."""
    from jei_edge.exit_rule import softmax

    ims, score = BASELINES[name]
    curve = baseline_curve(logits["val"], logits["test"], data.test.y, costs, budgets, score)
    at = _baseline_matched(nearest_point(curve, cost), softmax(logits["test"]), data.test.y, logits["calib"],
                           data.calib.y, costs, alphas, score)
    at["interpolated_accuracy"] = accuracy_at_cost(curve, cost)
    return {"label": BASELINE_LABELS[name], "ims": ims, "score": score,
            "curve": [{k: v for k, v in p.items() if k != "exit_idx"} for p in curve], "at_jei_cost": at}


def evaluate_checkpoint(ckpt: Dict, data: DataSplits, budgets: Sequence[float] = DEFAULT_BUDGETS,
                        offsets: Optional[Sequence[float]] = None, batch_size: int = 512) -> Dict:
    """JEI metrics on the test split plus the thresholding baselines (a)-(d) at JEI's cost.

    Args:
        ckpt: a calibrated checkpoint dict (``read_checkpoint`` / ``train_jei``).
        data: splits normalised with the checkpoint's preprocessing.
        budgets: geometric budgets ``q`` swept for the baseline curves.
        offsets: per-gate threshold offsets for the JEI rule (default: the trained model; the qhat
            table is then recomputed on the calibration split, as JEI-DNN requires).

    Returns:
        ``{"jei": summary, "baseline": baselines["a"], "baselines": {"a".."d": {label, ims, score,
        curve, at_jei_cost}}, "warmup_ims": bool, "per_exit_accuracy": [...], ...}``; (c) and (d)
        only when the checkpoint carries warm-up IMs.
    """
    from jei_edge.model.checkpoint import model_from_checkpoint, warmup_model

    model = model_from_checkpoint(ckpt)
    warm = warmup_model(ckpt, model)
    models = [model] + ([warm] if warm is not None else [])
    costs = ckpt["costs"]
    calib = ckpt["calibration"]
    alphas = calib.get("alphas") or []
    outs = {k: split_outputs(models, data.split(k).x, batch_size) for k in ("test", "val", "calib")}
    test_logits, test_gates = outs["test"][0]
    calib_logits, calib_gates = outs["calib"][0]
    y = data.test.y

    table = calib.get("qhat")
    if offsets is not None and any(float(o) != 0.0 for o in offsets) and alphas:
        cidx, _, cprobs_all = exit_predictions(calib_logits, calib_gates, offsets)
        table = qhat_table(cprobs_all, cidx, data.calib.y, alphas)
    idx, probs, probs_all = exit_predictions(test_logits, test_gates, offsets)
    jei = summarize(probs, idx, y, costs, table if alphas else None, alphas)

    baselines = {}
    for name, (ims, _) in BASELINES.items():
        which = 0 if ims == "jei" else 1
        if which < len(models):
            logits = {k: outs[k][which][0] for k in outs}
            baselines[name] = baseline_at_cost(name, logits, data, costs, alphas, jei["mean_cost"], budgets)
    result = {
        "n_test": int(len(y)),
        "per_exit_accuracy": (probs_all.argmax(-1) == y[:, None]).mean(0).tolist(),
        "costs": {"cost": list(costs["cost"]), "cost_vs_plain": list(costs["cost_vs_plain"])},
        "jei": jei,
        "baseline": baselines["a"],
        "baselines": baselines,
        "warmup_ims": warm is not None,
    }
    if warm is not None:
        result["per_exit_accuracy_warmup"] = (outs["test"][1][0].argmax(-1) == y[:, None]).mean(0).tolist()
    return result
