import numpy as np
import pytest

from jei_edge.train.baseline import (accuracy_at_cost, apply_thresholds, baseline_curve, fit_thresholds,
                                     geometric_fractions)


def test_geometric_fractions():
    f = geometric_fractions(0.5, 4)
    assert f.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(f[1:] / f[:-1], 0.5)
    np.testing.assert_allclose(geometric_fractions(1.0, 5), 0.2)


def test_thresholds_reproduce_the_budget_on_the_fitting_set():
    rng = np.random.default_rng(0)
    pmax = rng.random((1000, 4))
    frac = geometric_fractions(0.6, 4)
    thr = fit_thresholds(pmax, frac)
    got = np.bincount(apply_thresholds(pmax, thr), minlength=4) / 1000
    np.testing.assert_allclose(got, frac, atol=2e-3)


def test_extreme_budgets():
    rng = np.random.default_rng(1)
    pmax = rng.random((100, 3))
    assert (apply_thresholds(pmax, fit_thresholds(pmax, [1.0, 0.0, 0.0])) == 0).all()
    thr = fit_thresholds(pmax, [0.0, 0.0, 1.0])
    assert np.isinf(thr).all() and (apply_thresholds(pmax, thr) == 2).all()


def test_curve_and_interpolation():
    rng = np.random.default_rng(2)
    n, k, c = 400, 3, 5
    y = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, k, c))
    for j, strength in enumerate((1.0, 2.0, 4.0)):  # deeper exits are better
        logits[np.arange(n), j, y] += strength
    costs = {"cost": [0.3, 0.6, 1.0], "cost_vs_plain": [0.29, 0.58, 0.97]}
    curve = baseline_curve(logits[:200], logits[200:], y[200:], costs, budgets=[0.01, 1.0, 100.0])
    assert [p["mean_cost"] for p in curve] == sorted(p["mean_cost"] for p in curve)
    assert curve[0]["mean_cost"] < 0.35 and curve[-1]["mean_cost"] > 0.95
    assert curve[-1]["accuracy"] > curve[0]["accuracy"]
    pts = [{"mean_cost": 0.2, "accuracy": 0.5}, {"mean_cost": 0.6, "accuracy": 0.9}]
    assert accuracy_at_cost(pts, 0.4) == pytest.approx(0.7)
    assert accuracy_at_cost(pts, 0.0) == 0.5 and accuracy_at_cost(pts, 1.0) == 0.9


def test_max_logit_and_p_max_rank_differently():
    from jei_edge.train.baseline import BASELINES, SCORES, confidence

    # sample 0: large but close logits (high max-logit, p_max ~0.52); sample 1: small, well separated
    logits = np.array([[[5.0, 4.9], [0.0, 9.0]],
                       [[1.0, -3.0], [0.0, 9.0]]])
    np.testing.assert_allclose(confidence(logits, "max_logit"), [[5.0, 9.0], [1.0, 9.0]])
    np.testing.assert_allclose(confidence(logits, "p_max")[:, 0], [1 / (1 + np.exp(-0.1)), 1 / (1 + np.exp(-4.0))])
    half = [0.5, 0.5]  # one of the two samples leaves at exit 0: the more confident one under each score
    assert apply_thresholds(confidence(logits, "p_max"), fit_thresholds(confidence(logits, "p_max"), half)).tolist() == [1, 0]
    assert apply_thresholds(confidence(logits, "max_logit"),
                            fit_thresholds(confidence(logits, "max_logit"), half)).tolist() == [0, 1]
    with pytest.raises(ValueError, match="p_max"):
        confidence(logits, "entropy")
    assert set(SCORES) == {s for _, s in BASELINES.values()}


def test_curve_with_max_logit_scores():
    rng = np.random.default_rng(3)
    n, k, c = 300, 3, 4
    y = rng.integers(0, c, size=n)
    logits = rng.normal(size=(n, k, c))
    logits[np.arange(n), :, y] += 2.0
    logits[:, 0] *= rng.uniform(0.2, 5.0, size=(n, 1))  # scale changes max-logit order, not the argmax
    costs = {"cost": [0.3, 0.6, 1.0], "cost_vs_plain": [0.3, 0.6, 1.0]}
    pm = baseline_curve(logits[:150], logits[150:], y[150:], costs, budgets=[0.5], score="p_max")[0]
    ml = baseline_curve(logits[:150], logits[150:], y[150:], costs, budgets=[0.5], score="max_logit")[0]
    assert pm["exit_idx"].tolist() != ml["exit_idx"].tolist()
    # thresholds are on the score's own scale: max-logit thresholds exceed 1, p_max ones cannot
    assert max(t for t in ml["thresholds"] if np.isfinite(t)) > 1.0 >= max(t for t in pm["thresholds"] if np.isfinite(t))
    # default score is p_max (what tune and older callers get)
    assert baseline_curve(logits[:150], logits[150:], y[150:], costs, budgets=[0.5])[0]["exit_idx"].tolist() == \
        pm["exit_idx"].tolist()
