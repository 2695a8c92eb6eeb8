"""Verify: stored references, the torch-free `jei-edge verify`, failures on altered bundles, the
tie-band rule, the rate bound and the auto sizing of the check."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jei_edge.compile import BuildOptions, ParityError, build_bundle, verify_bundle
from jei_edge.compile.parity import AUTO_MAX, AUTO_MIN, size_check
from jei_edge.compile.progress import Progress
from jei_edge.compile.references import REFERENCE_FILE, ReferenceSet
from jei_edge.compile.verify import HELD_OUT, MIN_HELD_OUT, RULES, Rule, check_decisions, rate_upper_bound
from jei_edge.errors import BundleError
from tests.runtime.helpers import rehash, save_spread

# torch and onnx made unimportable before anything else runs
NO_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
            "from jei_edge.cli import main; rc = main(sys.argv[1:]); "
            "assert sys.modules.get('torch') is None and sys.modules.get('onnx') is None; sys.exit(rc)")


def _verify_cli(*args):
    return subprocess.run([sys.executable, "-c", NO_TORCH, "verify", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small ViT bundle (and its checkpoint) with stored references."""
    tmp = tmp_path_factory.mktemp("verify")
    ckpt = save_spread(tmp / "m.pt", "vit")
    report = build_bundle(ckpt, tmp / "m.jei", BuildOptions(parity_samples=400, stage_samples=64))
    return tmp / "m.jei", report


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "copy.jei"
    shutil.copytree(built[0], dst)
    return dst


def test_references_are_stored_and_recorded(built):
    bundle, report = built
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["references"] == {"file": REFERENCE_FILE, "samples": 400, "kinds": {"uniform_noise": 200, "smooth_noise": 200}}
    refs = ReferenceSet.load(bundle / REFERENCE_FILE, num_gates=3, num_classes=5, input_shape=(1, 8, 8))
    assert len(refs) == 400 and refs.kinds == m["references"]["kinds"]
    assert np.bincount(refs.exit_index, minlength=4).tolist() == report["decisions"]["exit_histogram_pytorch"]
    assert np.allclose(refs.probs.sum(1), 1, atol=1e-5) and np.allclose(refs.full_probs.sum(1), 1, atol=1e-5)
    assert report["decisions"]["samples"] == 400 and report["check"]["mode"] == "explicit"


def test_stored_references_match_the_torch_model(built):
    from jei_edge.model.checkpoint import load_checkpoint
    from jei_edge.model.jei import exit_decisions
    from tests.runtime.helpers import reference

    bundle, _ = built
    model, _ = load_checkpoint(bundle / "model.pt")
    refs = ReferenceSet.load(bundle / REFERENCE_FILE, 3, 5, (1, 8, 8))
    levels, probs_at_exit, probs = reference(model, refs.x)
    d = exit_decisions(model, refs.x, batch=64, probs=True)
    assert np.array_equal(d.levels, levels) and np.array_equal(refs.exit_index, levels)
    assert np.allclose(d.probs, probs_at_exit, atol=1e-6) and np.allclose(d.full_probs, probs[:, -1], atol=1e-6)
    assert np.allclose(refs.probs, probs_at_exit, atol=1e-6)
    assert d.reach(4)[0] == 1.0 and np.all(np.diff(d.reach(4)) <= 0)


def test_verify_cli_runs_without_torch_or_onnx(built):
    bundle, _ = built
    proc = _verify_cli(bundle)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line and "400 inputs" in line and "agree on 100.000%" in line, line
    proc = _verify_cli(bundle, "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["decisions"]["samples"] == 400 and rep["decisions"]["disagreements"] == 0
    assert rep["rule"] == {"tolerance": 1e-5, "min_agreement": None, "probs_tolerance": None} and rep["device"] == "cpu"
    assert rep["input_guard"] == "probed at load"
    assert rep["decisions"]["rate_bound"]["upper"] == pytest.approx(1 - 0.05 ** (1 / 400))


def test_altered_references_fail_verification(copy):
    path = copy / REFERENCE_FILE
    with np.load(path) as z:
        arrays = dict(z)
    g = arrays["margin"].shape[1]
    rows = np.flatnonzero(arrays["exit_index"] == g)[:3]  # rows that reach the final head ...
    arrays["exit_index"][rows] = 0  # ... now claimed to exit at gate 0, far from its threshold
    np.savez(path, **arrays)
    rehash(copy)
    with pytest.raises(ParityError, match=r"parity failed: end-to-end exit decisions differ on 3 of 400 inputs beyond "
                                          r"the tie band"):
        verify_bundle(copy)
    proc = _verify_cli(copy)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert "error: parity failed: end-to-end exit decisions differ" in proc.stderr and "hint:" in proc.stderr


def test_a_stage_graph_of_another_model_fails_verification(copy, tmp_path):
    other = save_spread(tmp_path / "other.pt", "vit", seed=1)
    build_bundle(other, tmp_path / "other.jei", BuildOptions(parity_samples=100, stage_samples=32))
    shutil.copyfile(tmp_path / "other.jei" / "stages" / "stage1.onnx", copy / "stages" / "stage1.onnx")
    rehash(copy)
    with pytest.raises(ParityError, match="parity failed"):
        verify_bundle(copy)


def test_verify_refuses_references_that_do_not_fit(copy):
    path = copy / REFERENCE_FILE
    with np.load(path) as z:
        arrays = dict(z)
    arrays["probs"] = arrays["probs"][:, :3]
    np.savez(path, **arrays)
    rehash(copy)
    with pytest.raises(BundleError, match=r"array 'probs' has shape \[400, 3\], the bundle needs \[400, 5\]"):
        verify_bundle(copy)
    path.unlink()
    m = json.loads((copy / "manifest.json").read_text())
    m["references"] = None
    (copy / "manifest.json").write_text(json.dumps(m))
    rehash(copy)
    with pytest.raises(BundleError, match="stores no reference outputs"):
        verify_bundle(copy)


class _FakeRuntime:
    """Returns the references' decisions, with chosen rows sent to another exit."""

    def __init__(self, refs, moved):
        self.refs, self.moved = refs, moved

    def run(self, x, mode="exit", offsets=None):
        from types import SimpleNamespace

        rows = [int(np.flatnonzero((self.refs.x == r).all(axis=(1, 2, 3)))[0]) for r in x]
        exits = self.refs.exit_index[rows].copy()
        for i, r in enumerate(rows):
            exits[i] = self.moved.get(r, exits[i])
        probs = self.refs.full_probs[rows] if mode == "full" else self.refs.probs[rows]
        return SimpleNamespace(probs=probs, exit_index=exits)


def _refs(margins, levels):
    n, g = margins.shape
    p = np.full((n, 3), 1 / 3, np.float32)
    return ReferenceSet(x=np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), exit_index=np.asarray(levels),
                        probs=p, margin=margins, gate=np.zeros((n, g)), full_probs=p, kind=np.zeros(n, np.int8),
                        kind_names=("real",))


def test_tie_band_rule():
    nan = np.nan
    margins = np.array([[-0.3, 0.2], [-4e-6, 0.4], [3e-6, nan], [-0.2, -0.1]])
    refs = _refs(margins, [1, 1, 0, 2])
    quiet = Progress(lambda m: None)
    # row 1 leaves at gate 0 where PyTorch's margin was -4e-6, row 2 does not where it was +3e-6: ties
    rep = check_decisions(_FakeRuntime(refs, {1: 0, 2: 1}), refs, RULES["fp32"], quiet)
    assert rep["disagreements"] == rep["disagreements_within_tie_band"] == 2 and rep["agreement"] == 0.5
    assert rep["rate_bound"]["k"] == 0
    # row 3 leaves at gate 1 with PyTorch's margin -0.1 there: beyond the band
    with pytest.raises(ParityError, match=r"differ on 1 of 4 inputs .*\(input 3: PyTorch exit 2, bundle exit 1"):
        check_decisions(_FakeRuntime(refs, {3: 1}), refs, RULES["fp32"], quiet)
    # int8: only the agreement floor counts
    rep = check_decisions(_FakeRuntime(refs, {3: 1}), refs, Rule(1e-5, min_agreement=0.75), quiet)
    assert rep["agreement"] == 0.75 and rep["rate_bound"]["k"] == 1
    with pytest.raises(ParityError, match=r"INT8 parity failed: exit decisions agree .* on 50.00% of all 4 inputs "
                                          r"\(fewer than 200 real held-out ones\)"):
        check_decisions(_FakeRuntime(refs, {0: 0, 3: 1}), refs, Rule(1e-5, min_agreement=0.75), quiet)


def test_int8_floor_is_held_on_real_held_out_inputs():
    """With >= MIN_HELD_OUT real held-out rows the INT8 floor is theirs; synthetic rows are reported apart."""
    n_held, n_noise = MIN_HELD_OUT, 100
    n = n_held + n_noise
    margins = np.full((n, 2), 0.3)
    refs = _refs(margins, [0] * n)
    refs = dataclasses.replace(refs, kind=np.repeat(np.array([0, 1], np.int8), [n_held, n_noise]),
                               kind_names=(HELD_OUT, "uniform_noise"))
    quiet = Progress(lambda m: None)
    rule = Rule(1e-5, min_agreement=0.95)
    noise_wrong = {i: 1 for i in range(n_held, n)}  # every synthetic row disagrees: 67% overall
    rep = check_decisions(_FakeRuntime(refs, noise_wrong), refs, rule, quiet)
    assert rep["agreement"] == pytest.approx(n_held / n) and rep["floor_agreement"] == 1.0
    assert rep["synthetic_agreement"] == 0.0 and rep["floor_on"].startswith(f"{n_held} real held-out inputs")
    assert rep["agreement_by_kind"] == {HELD_OUT: 1.0, "uniform_noise": 0.0}
    held_wrong = {i: 1 for i in range(11)}  # 94.5% of the held-out rows agree, every synthetic one does
    with pytest.raises(ParityError, match=r"on 94.50% of 200 real held-out inputs"):
        check_decisions(_FakeRuntime(refs, held_wrong), refs, rule, quiet)


def _binom_cdf(k, n, p):
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("k,n", [(0, 10), (0, 1000), (1, 50), (3, 200), (12, 300), (49, 50)])
def test_rate_upper_bound_is_clopper_pearson(k, n):
    u = rate_upper_bound(k, n)
    assert _binom_cdf(k, n, u) == pytest.approx(0.05, abs=1e-6)
    assert k / n < u < 1
    if k == 0:
        assert u == pytest.approx(3 / n, rel=0.01 + 1.5 / n)  # the rule of three
    assert rate_upper_bound(n, n) == 1.0 and rate_upper_bound(0, 0) == 1.0


def test_stored_subset_keeps_every_kind():
    n = 1000
    refs = _refs(np.zeros((n, 2)), np.zeros(n, np.int64))
    refs = ReferenceSet(**{**refs.__dict__, "kind": np.repeat(np.arange(3, dtype=np.int8), [500, 300, 200]),
                           "kind_names": ("real", "uniform_noise", "smooth_noise")})
    assert refs.stored_subset(max_bytes=10 ** 6) is refs
    sub = refs.stored_subset(max_bytes=2 * 100)  # 100 rows of one float16 value
    assert len(sub) == 100 and sub.kinds == {"real": 50, "uniform_noise": 30, "smooth_noise": 20}


def test_auto_sizing_is_proportionate():
    # a small model: fast checks, the full 10,000
    n, n_stage, rep = size_check("auto", 512, export_seconds=2.0, seconds_per_input=2e-4)
    assert (n, n_stage) == (AUTO_MAX, 512) and rep["mode"] == "auto"
    # a large model: 3 x export would be ~300 inputs; at least 1,000 when that takes <= 2 minutes
    n, n_stage, rep = size_check("auto", 512, export_seconds=10.0, seconds_per_input=0.08)
    assert n == AUTO_MIN and n_stage == 200 and rep["expected_seconds"] <= 120
    # a very slow one: the budget rules (3 x export), never below the floor
    n, n_stage, rep = size_check("auto", 512, export_seconds=60.0, seconds_per_input=1.0)
    assert (n, n_stage) == (150, 48) and rep["budget_seconds"] == 180
    assert size_check(300, 512) == (300, 300, {"mode": "explicit", "samples": 300})
    # the quickstart model: checking costs ~1 ms an input and its export ~1 s: 3 x export would give
    # ~2,500, but the full 10,000 takes ~12 s, cheap enough to always run
    n, _, _ = size_check("auto", 512, export_seconds=1.0, seconds_per_input=1e-3)
    assert n == AUTO_MAX
    n, _, _ = size_check("auto", 512, export_seconds=1.0, seconds_per_input=2e-3)  # 24 s for 10,000: sized
    assert AUTO_MIN <= n < AUTO_MAX


def test_progress_bars_only_when_asked(capsys):
    said = []
    with Progress(said.append, bars=True).bar(10, "references") as update:
        update(10)
    assert "references" in capsys.readouterr().err  # a tqdm bar on stderr
    with Progress(said.append, bars=False).bar(10, "references") as update:
        update(10)
    Progress(said.append)("step")
    assert capsys.readouterr().err == "" and said == ["step"]
    assert Progress(said.append).bars is False  # stderr is not a terminal under pytest
