import math

import numpy as np
import pytest

from jei_edge.train.config import ALPHAS
from jei_edge.train.metrics import (conformal_quantile, conformal_stats, cross_entropy, ece, gate_targets,
                                    oracle_exits, pos_weights, qhat_table)


def test_alpha_grid():
    assert ALPHAS == (0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05)


def test_cross_entropy_matches_definition():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3, 4)) * 3
    y = rng.integers(0, 4, size=5)
    ce = cross_entropy(z, y)
    ref = np.array([[-(z[i, k, y[i]] - math.log(np.exp(z[i, k]).sum())) for k in range(3)] for i in range(5)])
    np.testing.assert_allclose(ce, ref, rtol=1e-10)


def test_oracle_targets_and_pos_weights_by_hand():
    ce = np.array([[0.1, 0.05, 0.0],    # cheap exit 0 wins: 0.1 + 0.5*0.2 = 0.2 < 0.05 + 0.3 < 0 + 0.5
                   [2.0, 0.1, 0.0],     # exit 1: 0.1 + 0.3 = 0.4 < 0.5
                   [2.0, 2.0, 0.0]])    # final
    costs = [0.2, 0.6, 1.0]
    o = oracle_exits(ce, costs, lam=0.5)
    assert o.tolist() == [0, 1, 2]
    assert oracle_exits(ce, costs, lam=0.0).tolist() == [2, 2, 2]
    t = gate_targets(o, 2)
    assert t.tolist() == [[1, 1], [0, 1], [0, 0]]
    # n = [1, 1] of N = 3 -> (3 - 1) / 1 = 2 per gate
    assert pos_weights(o, 2) == [2.0, 2.0]
    # no sample at gate 0 -> (N - 0) / 0.1 capped at 5; all at gate 1 -> 0
    assert pos_weights(np.array([1, 1, 1]), 2) == [5.0, 0.0]
    assert pos_weights(np.array([1, 1, 1]), 2, cap=50.0) == [30.0, 0.0]


def test_ece_by_hand_and_merged_bins():
    conf = np.array([0.9, 0.9, 0.9, 0.9])
    ok = np.array([1, 1, 1, 0])
    # all edges coincide -> one bin: |0.75 - 0.9|
    assert ece(conf, ok) == pytest.approx(15.0)
    # two groups of equal mass, each perfectly calibrated -> 0
    conf = np.array([0.5] * 10 + [1.0] * 10)
    ok = np.array([1, 0] * 5 + [1] * 10)
    assert ece(conf, ok, bins=2) == pytest.approx(0.0)
    # independent implementation: sort, cut into equal-mass chunks (no ties here)
    rng = np.random.default_rng(0)
    conf = rng.random(300)
    ok = rng.random(300) < conf ** 2
    order = np.argsort(conf)
    chunks = np.array_split(order, 15)
    ref = sum(len(c) / 300 * abs(ok[c].mean() - conf[c].mean()) for c in chunks) * 100
    assert ece(conf, ok) == pytest.approx(ref, rel=1e-9)


def test_conformal_quantile_is_the_higher_quantile_at_the_corrected_level():
    """JEI-DNN: the min(1, ceil((n+1)(1-alpha))/n) quantile with numpy's 'higher' method, i.e. the
    sorted score at index ceil(level * (n - 1)) (at least the usual finite-sample order statistic)."""
    rng = np.random.default_rng(1)
    s = rng.random(50)
    srt = np.sort(s)
    for a in (0.01, 0.05, 0.2):
        level = min(1.0, math.ceil((50 + 1) * (1 - a)) / 50)
        assert conformal_quantile(s, a) == srt[math.ceil(level * 49 - 1e-9)]
        assert conformal_quantile(s, a) >= srt[min(math.ceil(51 * (1 - a)), 50) - 1]
    assert conformal_quantile(np.array([]), 0.05) == pytest.approx(0.95)
    assert conformal_quantile(np.array([0.3]), 0.05) == 0.3  # level capped at 1


def test_qhat_table_falls_back_to_all_scores_when_few_exited():
    rng = np.random.default_rng(2)
    n, k, c = 200, 3, 4
    probs = rng.dirichlet(np.ones(c), size=(n, k))
    y = rng.integers(0, c, size=n)
    idx = np.array([0] * 150 + [1] * 20 + [2] * 30)
    table = qhat_table(probs, idx, y, alphas=[0.1])
    s0 = 1 - probs[np.arange(n), 0, y]
    s1 = 1 - probs[np.arange(n), 1, y]
    s2 = 1 - probs[np.arange(n), 2, y]
    assert table[0][0] == conformal_quantile(s0[idx == 0], 0.1)
    assert table[1][0] == conformal_quantile(s1, 0.1)  # 20 exited -> fallback (20 or fewer)
    assert table[2][0] == conformal_quantile(s2[idx == 2], 0.1)


def test_conformal_coverage_holds_on_exchangeable_data():
    rng = np.random.default_rng(3)
    n, c = 4000, 5
    logits = rng.normal(size=(n, c)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in p])  # labels drawn from the model: calibrated
    probs = p[:, None, :]
    idx = np.zeros(n, dtype=int)
    table = qhat_table(probs[:2000], idx[:2000], y[:2000], alphas=[0.05, 0.2])
    stats = conformal_stats(p[2000:], idx[2000:], y[2000:], table, alphas=[0.05, 0.2])
    assert stats[0]["coverage"] >= 0.93 and stats[1]["coverage"] >= 0.77
    assert stats[0]["mean_set_size"] > stats[1]["mean_set_size"]


def test_pos_weight_rules():
    # oracle exits of 10 samples over 3 gates + final: gate l's positives are the samples with l* <= l
    o = np.array([0, 0, 1, 1, 1, 1, 2, 3, 3, 3])
    # reference: n_l = samples whose oracle exit IS l: 2, 4, 1 -> 8/2, 6/4, 9/1 capped at 5
    assert pos_weights(o, 3) == [4.0, 1.5, 5.0]
    assert pos_weights(o, 3, rule="reference") == pos_weights(o, 3)
    # balanced: positives 2, 6, 7 of 10 -> negatives/positives 8/2, 4/6, 3/7, never capped
    np.testing.assert_allclose(pos_weights(o, 3, cap=5.0, rule="balanced"), [4.0, 4 / 6, 3 / 7])
    assert pos_weights(np.array([3, 3, 3, 3, 3, 3, 3, 0]), 3, rule="balanced") == [7.0, 7.0, 7.0]
    # a gate whose targets are all one class gets 1 (nothing to balance), not 0 or a division by 0
    assert pos_weights(np.array([1, 1, 1]), 2, rule="balanced") == [1.0, 1.0]
    assert pos_weights(o, 3, rule="none") == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="balanced"):
        pos_weights(o, 3, rule="inverse")
