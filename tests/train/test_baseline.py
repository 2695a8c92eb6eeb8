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
