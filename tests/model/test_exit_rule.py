"""The exit rule and gate features vs an independent product-form implementation and the
reference vectors produced by the JEI-DNN reference code."""

from pathlib import Path

import numpy as np
import pytest
import torch

from jei_edge import exit_rule
from jei_edge.model.exits import exit_levels_torch, gate_features

VECTORS = Path(__file__).parent / "vectors" / "jei_reference_gate_exit.npz"


def product_form_levels(g):
    """Independent implementation of the reference code's rule (the JEI-DNN paper's code, "product form"):
    p_exit_l = max(0, min(g_l, 1 - sum_{j<l} g_j)); c_l = p_exit_l / prod_{j<l}(1 - c_j) clipped
    to [0, 1]; exit at the first l with c_l >= 0.5. Scalar Python on purpose."""
    g = np.asarray(g, dtype=np.float64)
    out = []
    for row in g:
        level, cum, prod = len(row), 0.0, 1.0
        for l, gl in enumerate(row):
            p_exit = max(0.0, min(gl, 1.0 - cum))
            c = 1.0 if prod <= 0 else min(1.0, max(0.0, p_exit / prod))
            if c >= 0.5:
                level = l
                break
            cum += gl
            prod *= 1.0 - c
        out.append(level)
    return np.array(out)


def scalar_offsets_levels(g, offsets):
    out = []
    for row in np.asarray(g, dtype=np.float64):
        S, level = 0.0, len(row)
        for l, gl in enumerate(row):
            if gl >= (1.0 - S) / 2.0 + offsets[l]:
                level = l
                break
            S += gl
        out.append(level)
    return np.array(out)


def _near_tie(g, tol):
    _, margin = exit_rule.exit_levels(g, return_margin=True)
    return np.nanmin(np.abs(margin), axis=1) < tol


@pytest.mark.parametrize("n_gates", [1, 2, 6, 24])
def test_matches_product_form_on_random_gates(n_gates):
    rng = np.random.default_rng(n_gates)
    g = rng.beta(0.5, 2.0, size=(4000, n_gates))  # skewed low, like real gates
    ours = exit_rule.exit_levels(g)
    ref = product_form_levels(g)
    ties = _near_tie(g, 1e-9)
    assert (ours == ref)[~ties].all()
    assert len(np.unique(ours)) > 1 or n_gates == 1


def test_adversarial_inputs():
    g = np.array([
        [0.5, 0.0, 0.0],        # exactly at threshold (1 - 0)/2 -> exits at 0
        [0.4999999, 0.3, 0.9],  # just below, then S = 0.5: 0.3 >= 0.25 -> exit 1
        [0.0, 0.0, 0.0],        # never fires -> final head (3)
        [1.0, 1.0, 1.0],        # fires at 0
        [0.49, 0.25, 0.9],      # S = 0.49: 0.25 >= 0.255? no; S = 0.74: 0.9 >= 0.13 -> 2
        [0.3, 0.34, 0.2],       # S=.3: .34 >= .35 no; S=.64: .2 >= .18 -> 2
        [0.45, 0.45, 0.0499],   # S=.45: .45 >= .275 -> 1
    ])
    np.testing.assert_array_equal(exit_rule.exit_levels(g), [0, 1, 3, 0, 2, 2, 1])
    np.testing.assert_array_equal(product_form_levels(g), [0, 1, 3, 0, 2, 2, 1])


def test_not_exited_always_has_S_below_one():
    rng = np.random.default_rng(0)
    g = rng.uniform(0, 1, size=(5000, 12))
    levels = exit_rule.exit_levels(g)
    for l in range(12):
        live = levels > l
        assert (g[live, : l + 1].sum(1) < 1).all()


def test_S_near_one_many_exits():
    # tiny gates accumulate S close to 1 without firing until the threshold collapses
    g = np.full((3, 60), 0.0166)
    g[1, :] = 0.01
    g[2, 59] = 0.5
    ours = exit_rule.exit_levels(g)
    np.testing.assert_array_equal(ours, product_form_levels(g))


def test_offsets_shift_exits_monotonically():
    rng = np.random.default_rng(3)
    g = rng.uniform(0, 0.6, size=(3000, 5))
    base = exit_rule.exit_levels(g)
    early = exit_rule.exit_levels(g, offsets=[-0.1] * 5)
    late = exit_rule.exit_levels(g, offsets=[0.1] * 5)
    np.testing.assert_array_equal(early, scalar_offsets_levels(g, [-0.1] * 5))
    np.testing.assert_array_equal(late, scalar_offsets_levels(g, [0.1] * 5))
    assert early.mean() < base.mean() < late.mean()
    mixed = [0.05, -0.02, 0.0, 0.3, -0.2]
    np.testing.assert_array_equal(exit_rule.exit_levels(g, offsets=mixed), scalar_offsets_levels(g, mixed))


def test_offsets_validated():
    with pytest.raises(ValueError):
        exit_rule.exit_levels(np.zeros((2, 3)), offsets=[0.0, 0.0])


def test_torch_twin_matches_numpy():
    rng = np.random.default_rng(1)
    g = rng.beta(0.7, 1.5, size=(2000, 7)).astype(np.float32)
    offs = [0.0, 0.01, -0.03, 0.0, 0.2, 0.0, -0.1]
    np.testing.assert_array_equal(exit_levels_torch(torch.from_numpy(g), offs).numpy(),
                                  exit_rule.exit_levels(g.astype(np.float64), offs))


def test_reference_vectors_features_and_levels():
    d = np.load(VECTORS)
    logits, W, b = d["logits"], d["W"], d["b"]
    n, n_exits, _ = logits.shape
    feats_np = exit_rule.gate_features(logits[:, :-1])
    np.testing.assert_allclose(feats_np, d["features"], atol=1e-5, rtol=0)
    feats_t = gate_features(torch.from_numpy(logits[:, :-1])).double().numpy()
    np.testing.assert_allclose(feats_t, d["features"], atol=1e-5, rtol=0)
    # gates from our features + the reference W, b; then our exit rule
    g = exit_rule.sigmoid(np.einsum("ngf,gf->ng", feats_np, W.astype(np.float64)) + b)
    np.testing.assert_allclose(g, d["g"], atol=1e-5)
    levels, margin = exit_rule.exit_levels(d["g"].astype(np.float64), return_margin=True)
    ref = d["exit_level"]
    mismatch = levels != ref
    if mismatch.any():  # only allowed at exact ties
        assert (np.nanmin(np.abs(margin[mismatch]), axis=1) < 1e-6).all()
    assert np.bincount(ref, minlength=n_exits).tolist() == [248, 67, 0, 49, 48, 95, 5]
    assert np.bincount(levels, minlength=n_exits).tolist() == [248, 67, 0, 49, 48, 95, 5]


def test_conformal_sets():
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    sets = exit_rule.conformal_sets(probs, [0.5, 0.7])
    np.testing.assert_array_equal(sets, [[True, False, False], [True, True, False]])
