"""`jei-edge tune`: the offsets search, the budget on held-out data, determinism, the deploy
profile written into the bundle and used by default, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jei_edge.bundle import Bundle, parse_manifest
from jei_edge.errors import BundleError, InputError
from jei_edge.profile.tune import Budget, Scorer, parse_budget, pareto, search

ROOT = Path(__file__).resolve().parents[2]
DATA = "synthetic:size=8,n=900,classes=5"  # labelled data of the test bundles' input shape


def _toy(n=600, gates=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.uniform(0, 1, (n, gates)).astype(np.float32)
    probs = rng.dirichlet(np.ones(classes), (n, gates + 1)).astype(np.float32)
    y = rng.integers(0, classes, n)
    # later exits are more often right, so cost buys accuracy
    for e in range(gates + 1):
        right = rng.uniform(size=n) < 0.4 + 0.15 * e
        probs[right, e, y[right]] += 2.0
    probs /= probs.sum(-1, keepdims=True)
    cost = np.linspace(0.25, 1.0, gates + 1)
    return g, probs, y, cost


def test_budget_parsing():
    assert parse_budget("cost=0.5") == Budget("cost", 0.5, 1)
    assert parse_budget("latency-ms=2", batch=8).label == "latency-ms<=2 at batch 8"
    for bad in ("cost", "cost=-1", "speed=3", "cost=nan", "latency-ms=abc"):
        with pytest.raises(InputError, match="--budget must be"):
            parse_budget(bad)


def test_search_meets_the_budget_beats_one_shared_offset_and_is_deterministic():
    g, probs, y, cost = _toy()
    sc = Scorer(g, probs, y, cost)
    best, seen = search(sc, Budget("cost", 0.6), g.shape[1], seed=3)
    assert best.cost <= 0.6
    shared = [s for s in seen if len(set(s.offsets)) == 1 and s.cost <= 0.6]
    assert best.accuracy >= max(s.accuracy for s in shared)
    again, _ = search(Scorer(g, probs, y, cost), Budget("cost", 0.6), g.shape[1], seed=3)
    assert again == best
    front = pareto(seen)
    assert all(a.cost <= b.cost and a.accuracy < b.accuracy for a, b in zip(front, front[1:]))
    with pytest.raises(InputError, match=r"no exit setting meets cost<=0.1: the cheapest achievable is 0.25"):
        search(sc, Budget("cost", 0.1), g.shape[1])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, vit_bundle):
    path = tmp_path_factory.mktemp("tune") / "vit.jei"
    shutil.copytree(vit_bundle, path)
    from jei_edge.profile.tune import tune

    return path, tune(path, DATA, Budget("cost", 0.55), seed=1)


def test_tuned_profile_meets_the_budget_on_held_out_data_and_is_written(tuned):
    path, report = tuned
    assert report["validation"]["cost"] <= 0.55
    assert report["test"]["cost"] <= 0.55 + 0.05  # held-out: within noise of the budget
    assert report["written"] and report["conformal"]["calibration_samples"] > 0
    m = Bundle.open(path).manifest  # integrity re-checked: every file re-hashed
    assert m.deploy.offsets == tuple(report["offsets"]) and m.deploy.budget == "cost<=0.55"
    assert len(m.deploy.qhat) == m.num_exits and len(m.deploy.qhat[0]) == len(m.deploy.alphas)


def test_tuning_twice_gives_the_same_offsets(tuned):
    from jei_edge.profile.tune import tune

    path, report = tuned
    again = tune(path, DATA, Budget("cost", 0.55), seed=1, write=False)
    assert again["offsets"] == report["offsets"] and again["test"] == report["test"]


def test_runs_use_the_deploy_profile_by_default(tuned):
    from jei_edge.data import load_data
    from jei_edge.runtime import Runtime

    path, report = tuned
    with Runtime.load(path) as rt:
        x = load_data(DATA, input_shape=tuple(rt.input_shape), seed=1, preprocessing=rt.preprocessing).test.x
        default = rt.run(x)
        np.testing.assert_array_equal(default.exit_index, rt.run(x, offsets=tuple(report["offsets"])).exit_index)
        assert "deploy profile (cost<=0.55)" in rt.offsets_label()
        assert rt.qhat(rt.alphas[0]) == [r[0] for r in report["conformal"]["qhat"]]
        plain = rt.use_deploy(False).run(x)
        assert rt.offsets_label() == "offsets 0 (no deploy profile)"
        if any(report["offsets"]):
            assert not np.array_equal(plain.exit_index, default.exit_index)
    r = subprocess.run([sys.executable, "-m", "jei_edge.runtime.cli", str(path), "-", "--preprocessed"],
                       input=b"", capture_output=True, cwd=ROOT, timeout=120)
    assert b"deploy profile (cost<=0.55)" in r.stderr


def test_clear_and_errors_through_the_cli(tuned, tmp_path):
    path, _ = tuned
    other = tmp_path / "b.jei"
    shutil.copytree(path, other)
    cli = [sys.executable, "-m", "jei_edge.cli"]
    r = subprocess.run(cli + ["tune", str(other), "--data", DATA, "--budget", "cost=0.01"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "cheapest achievable" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(cli + ["tune", str(other), "--data", "digits", "--budget", "cost=0.5"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    r = subprocess.run(cli + ["tune", str(other), "--clear"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and Bundle.open(other).manifest.deploy is None


def test_deploy_profile_is_validated(tuned):
    path, _ = tuned
    raw = json.loads((path / "manifest.json").read_text())
    bad = json.loads(json.dumps(raw))
    bad["deploy"]["offsets"] = bad["deploy"]["offsets"][:-1]
    with pytest.raises(BundleError, match="deploy.offsets.*one offset per gate"):
        parse_manifest(bad)
    bad = json.loads(json.dumps(raw))
    bad["deploy"]["qhat"] = bad["deploy"]["qhat"][:2]
    with pytest.raises(BundleError, match="deploy.qhat.*one per exit"):
        parse_manifest(bad)
    bad = json.loads(json.dumps(raw))
    bad["deploy"]["offsets"][0] = 7.0
    with pytest.raises(BundleError, match="deploy.offsets"):
        parse_manifest(bad)


def test_verify_still_checks_the_trained_decisions_of_a_tuned_bundle(tuned):
    from jei_edge.compile.verify import verify_bundle

    path, report = tuned
    assert any(report["offsets"])  # the profile moves decisions, yet the references are for offsets 0
    assert verify_bundle(path)["decisions"]["disagreements"] == 0
