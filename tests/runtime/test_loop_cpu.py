"""The CPU runtime (onnxruntime + numpy workspace) against PyTorch + the numpy exit rule."""

import numpy as np
import pytest

from jei_edge.exit_rule import conformal_sets, exit_levels
from jei_edge.model.checkpoint import load_checkpoint
from jei_edge.runtime import Runtime
from jei_edge.runtime.loop import StageExecutor, run_conditional
from jei_edge.bundle.manifest import Stage, TensorSpec
from jei_edge.runtime.workspace import NumpyWorkspace
from tests.runtime.helpers import model_inputs, reference


@pytest.fixture(params=["vit", "resnet"])
def bundle(request, vit_bundle, resnet_bundle):
    return {"vit": vit_bundle, "resnet": resnet_bundle}[request.param]


def _model(bundle):
    return load_checkpoint(bundle / "model.pt")[0]


def test_exit_mode_matches_pytorch(bundle):
    rt = Runtime.load(bundle)
    x = model_inputs(400, seed=1)
    levels, probs, _ = reference(_model(bundle), x)
    res = rt.run(x)
    assert np.array_equal(res.exit_index, levels)
    assert np.abs(res.probs - probs).max() <= 1e-5
    assert sum(np.bincount(levels) > 0) >= 3  # the model really spreads its exits
    # reach: rows entering each stage = rows not yet exited
    expect = [int((levels >= k).sum()) for k in range(len(res.reach))]
    assert res.reach == expect and res.reach[0] == 400


def test_full_mode_is_the_final_head(bundle):
    rt = Runtime.load(bundle)
    x = model_inputs(50, seed=2)
    _, _, allp = reference(_model(bundle), x)
    res = rt.run(x, mode="full")
    assert (res.exit_index == rt.num_exits - 1).all()
    assert res.reach == [50] * rt.bundle.num_stages
    assert np.abs(res.probs - allp[:, -1]).max() <= 1e-5


def test_offsets_batch_one_and_chunking(vit_bundle):
    model = _model(vit_bundle)
    rt = Runtime.load(vit_bundle, max_batch=16)
    x = model_inputs(70, seed=3)
    offs = [-0.15, 0.1, 0.05]
    levels, probs, _ = reference(model, x, offs)
    res = rt.run(x, offsets=offs)  # 70 rows in chunks of 16
    assert np.array_equal(res.exit_index, levels) and np.abs(res.probs - probs).max() <= 1e-5
    assert res.reach[0] == 70
    one = [rt.run(x[i:i + 1], offsets=offs) for i in range(len(x))]
    assert [int(r.exit_index[0]) for r in one] == levels.tolist()
    assert np.abs(np.concatenate([r.probs for r in one]) - probs).max() <= 1e-5
    assert all(r.reach == [1] * (int(levels[i]) + 1) for i, r in enumerate(one))


def test_everyone_exits_at_stage_zero_or_nobody_exits(vit_bundle):
    rt = Runtime.load(vit_bundle)
    x = model_inputs(33, seed=4)
    first = rt.run(x, offsets=[-10.0] * rt.num_gates)
    assert (first.exit_index == 0).all() and first.reach == [33]
    nobody = rt.run(x, offsets=[10.0] * rt.num_gates)
    full = rt.run(x, mode="full")
    assert (nobody.exit_index == rt.num_exits - 1).all() and nobody.reach == [33] * rt.bundle.num_stages
    assert np.array_equal(nobody.probs, full.probs)


def test_conformal_sets_from_the_manifest_table(vit_bundle):
    rt = Runtime.load(vit_bundle)
    res = rt.run(model_inputs(40, seed=5))
    for j, alpha in enumerate(rt.alphas):
        qhat = [row[j] for row in rt.manifest.exits.qhat]
        expect = conformal_sets(res.probs, np.asarray(qhat)[res.exit_index])
        assert np.array_equal(rt.conformal_sets(res, alpha), expect)


def test_results_are_independent_of_previous_batches(vit_bundle):
    rt = Runtime.load(vit_bundle)
    a, b = model_inputs(64, seed=6), model_inputs(5, seed=7)
    ra = rt.run(a)
    rt.run(b)
    again = rt.run(a)
    assert np.array_equal(ra.exit_index, again.exit_index) and np.array_equal(ra.probs, again.probs)
    ra.probs[:] = -1  # results own their arrays
    assert (rt.run(b).probs >= 0).all()


# -- the loop + workspace with a scripted executor: exact agreement with the numpy exit rule ---------
class ScriptedExecutor(StageExecutor):
    """Stage k sets gate = G[row, k] and probs = P[row, k], where the row id travels in the hidden state."""

    def __init__(self, G, P):
        self.G, self.P = G, P
        self.num_stages = G.shape[1] + 1
        self.calls = []

    def execute(self, k, n, ws):
        rows = ws.stage_input(k)[:n, 0].astype(np.int64)
        self.calls.append((k, n))
        outs = ws.stage_outputs(k)
        outs["probs"][:n] = self.P[rows, k]
        if k < self.num_stages - 1:
            outs["hidden_out"][:n, 0] = rows
            outs["gate"][:n] = self.G[rows, k]


def _scripted(n=500, gates=4, classes=3, seed=0, max_batch=512):
    rng = np.random.default_rng(seed)
    G = rng.random((n, gates)).astype(np.float32)
    G[::11, 0] = 0.5  # exact ties at the first threshold (S = 0 -> 0.5): g >= threshold exits
    P = rng.random((n, gates + 1, classes)).astype(np.float32)
    P /= P.sum(-1, keepdims=True)
    spec = lambda name: TensorSpec(name, (1,))  # noqa: E731
    stages = [Stage(k, "", (k, k + 1), (k,), (k,), 0, False, (spec("x" if k == 0 else "hidden_in"),),
                    (spec("hidden_out"), TensorSpec("probs", (classes,)), TensorSpec("gate", ())))
              for k in range(gates)]
    stages.append(Stage(gates, "", (gates, gates + 1), (gates,), (), 0, False, (spec("hidden_in"),),
                        (TensorSpec("probs", (classes,)),)))
    return G, P, NumpyWorkspace(stages, classes, max_batch)


@pytest.mark.parametrize("offsets", [None, [0.1, -0.2, 0.0, 0.3], [-1, -1, -1, -1], [1, 1, 1, 1]])
def test_workspace_matches_exit_levels_exactly(offsets):
    G, P, ws = _scripted()
    ex = ScriptedExecutor(G, P)
    x = np.arange(len(G), dtype=np.float32)[:, None]
    res = run_conditional(ex, ws, x, "exit", offsets)
    levels = exit_levels(G, offsets)
    assert np.array_equal(res.exit_index, levels)
    assert np.array_equal(res.probs, P[np.arange(len(G)), levels])
    assert res.reach == [int((levels >= k).sum()) for k in range(len(res.reach))]
    assert [n for _, n in ex.calls] == res.reach  # each stage ran on the live rows only
    full = run_conditional(ScriptedExecutor(G, P), ws, x, "full")
    assert (full.exit_index == G.shape[1]).all() and np.array_equal(full.probs, P[:, -1])


def test_workspace_copies_a_non_contiguous_input():
    G, P, ws = _scripted(n=50, max_batch=64)
    x = np.arange(100, dtype=np.float32)[::2, None] / 2  # a strided view
    res = run_conditional(ScriptedExecutor(G, P), ws, x, "exit")
    assert np.array_equal(res.exit_index, exit_levels(G))


@pytest.mark.parametrize("offsets", [None, [0.1, -0.2, 0.0, 0.3]])
def test_batch_one_path_matches_exit_levels_exactly(offsets):
    """Batch 1 decides on Python floats and keeps S outside the arrays: same levels, ties included."""
    G, P, ws = _scripted(n=200)
    levels = exit_levels(G, offsets)
    x = np.arange(len(G), dtype=np.float32)[:, None]
    for i in range(len(G)):
        ex = ScriptedExecutor(G, P)
        res = run_conditional(ex, ws, x[i:i + 1], "exit", offsets)
        assert res.exit_index.tolist() == [levels[i]] and res.exit_index.dtype == np.int64
        assert np.array_equal(res.probs, P[i:i + 1, levels[i]])
        assert res.reach == [1] * (int(levels[i]) + 1) and ex.calls == [(k, 1) for k in range(levels[i] + 1)]
        full = run_conditional(ScriptedExecutor(G, P), ws, x[i:i + 1], "full")
        assert full.exit_index.tolist() == [G.shape[1]] and np.array_equal(full.probs, P[i:i + 1, -1])
    # a larger batch after batch-1 calls (and back) still agrees
    res = run_conditional(ScriptedExecutor(G, P), ws, x, "exit", offsets)
    assert np.array_equal(res.exit_index, levels)


@pytest.mark.parametrize("offsets", [None, [0.1, -0.2, 0.0, 0.3], [-1, -1, -1, -1]])
def test_small_row_boundaries_match_the_array_path(offsets, monkeypatch):
    """Boundaries on at most ``SMALL_ROWS`` live rows decide and compact with Python floats: with
    every boundary in numpy, every boundary in Python, and a limit of 32 (batches of 33-300 rows
    cross it as rows leave), the results, the reach and the rows each stage ran on equal one
    another and ``exit_levels``, for batch sizes on both sides of the limits."""
    from jei_edge.runtime import workspace

    G, P, _ = _scripted(n=300)
    levels = exit_levels(G, offsets)
    x = np.arange(len(G), dtype=np.float32)[:, None]
    for b in (2, 3, 7, 31, 32, 33, 64, 300):
        got = {}
        for small in (0, 32, 10 ** 6):  # every boundary in numpy / mixed / every boundary in Python
            monkeypatch.setattr(workspace, "SMALL_ROWS", small)
            _, _, ws = _scripted(n=300)
            for s in range(0, len(G), b):
                ex = ScriptedExecutor(G, P)
                res = run_conditional(ex, ws, x[s:s + b], "exit", offsets)
                lv = levels[s:s + b]
                assert np.array_equal(res.exit_index, lv)
                assert np.array_equal(res.probs, P[np.arange(s, s + len(lv)), lv])
                assert [n for _, n in ex.calls] == res.reach == [int((lv >= k).sum()) for k in range(len(res.reach))]
                got.setdefault(small, []).append((res.probs, res.exit_index))
        for other in (32, 10 ** 6):
            for (p0, e0), (p1, e1) in zip(got[0], got[other]):
                assert np.array_equal(p0, p1) and np.array_equal(e0, e1)


def test_small_row_boundary_names_nan_gate_rows(monkeypatch):
    """Stage 0's guarded gate NaN on a few rows: the Python-float boundary names exactly those rows."""
    from jei_edge.runtime import workspace
    from jei_edge.runtime.validate import GuardTripped

    G, P, _ = _scripted(n=40)
    G[[3, 17], 0] = np.nan
    for small in (0, 10 ** 6):
        monkeypatch.setattr(workspace, "SMALL_ROWS", small)
        _, _, ws = _scripted(n=40)
        ws.input_guard = True
        x = np.arange(20, dtype=np.float32)[:, None]
        with pytest.raises(GuardTripped) as e:
            run_conditional(ScriptedExecutor(G, P), ws, x, "exit")
        assert e.value.rows == [3, 17]


def test_small_row_boundary_keeps_float64_with_a_float32_offset():
    """A numpy float32 offset handed to the loop directly (``Runtime.run`` passes Python floats)
    still decides in float64 on the Python-float paths, as on arrays: gates set to the float32
    rounding of their float64 threshold (a tie in float32 arithmetic, not in float64) exit exactly
    as ``exit_levels`` says, for batch 1, a few rows and many rows."""
    G, P, ws = _scripted(n=64, seed=3)
    rng = np.random.default_rng(3)
    G[:, 0] = rng.uniform(0.0, 0.3, len(G)).astype(np.float32)  # nobody exits at gate 0 (offset +1)
    offs = [np.float32(1.0), np.float32(0.01), np.float32(0.0), np.float32(0.0)]
    thr = (1.0 - G[:, 0].astype(np.float64)) * 0.5 + float(offs[1])  # gate 1's threshold in float64
    G[:, 1] = thr.astype(np.float32)
    want = exit_levels(G, [float(o) for o in offs])
    assert 0 < int((want == 1).sum()) < len(G)  # the float32 rounding went both ways
    x = np.arange(len(G), dtype=np.float32)[:, None]
    for b in (1, 5, 64):
        for s in range(0, len(G), b):
            res = run_conditional(ScriptedExecutor(G, P), ws, x[s:s + b], "exit", offs)
            assert np.array_equal(res.exit_index, want[s:s + b])
