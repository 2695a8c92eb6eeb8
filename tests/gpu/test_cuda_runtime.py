"""The torch-cuda executor + CUDA workspace (+ pipeline) vs the PyTorch model and the numpy exit rule."""

from __future__ import annotations

import numpy as np
import pytest

from jei_edge.exit_rule import exit_levels
from jei_edge.runtime.loop import run_conditional

from .conftest import small_vit

pytestmark = pytest.mark.gpu


def reference(torch, model, x, offsets=None):
    """Exit levels, their margins and exit probs from the full model on the CPU (FP32)."""
    with torch.no_grad():
        logits, gl = model.cpu()(torch.from_numpy(x))
    probs = torch.softmax(logits.float(), dim=-1).numpy()
    g = torch.sigmoid(gl).numpy()
    levels, margin = exit_levels(g, offsets, return_margin=True)
    return levels, margin, probs[np.arange(len(x)), levels], g


def assert_matches(res, ref, atol=2e-4):
    levels, margin, probs, _ = ref
    diff = np.flatnonzero(res.exit_index != levels)
    if diff.size:  # only a gate within float noise of its threshold may decide differently
        close = np.nanmin(np.abs(margin[diff]), axis=1)
        assert (close < 1e-4).all(), f"rows {diff[:10]} exit differently with margins {close[:10]}"
        assert diff.size <= max(1, len(levels) // 100)
    same = res.exit_index == levels
    np.testing.assert_allclose(res.probs[same], probs[same], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def model(torch_cuda):
    return small_vit(torch_cuda)


def _backend(torch, model, max_batch=64, **opts):
    import copy

    from jei_edge.backends.torch_cuda import from_model

    return from_model(copy.deepcopy(model), max_batch=max_batch, **opts)


@pytest.mark.parametrize("opts", [{}, {"graphs": False}, {"mapped_io": True}, {"graph_max_batch": 16}])
def test_runtime_matches_model(torch_cuda, model, opts):
    ex, ws = _backend(torch_cuda, model, **opts)
    rng = np.random.default_rng(0)
    exits_seen = set()
    launches = 0
    for B in (1, 2, 17, 64, 64, 33):
        x = rng.normal(size=(B, 1, 16, 16)).astype(np.float32)
        res = run_conditional(ex, ws, x, "exit")
        ref = reference(torch_cuda, model, x)
        assert_matches(res, ref)
        exits_seen.update(res.exit_index.tolist())
        launches += len(res.reach)
        assert ws.kernel_launches == ws.boundaries == launches
        np.testing.assert_array_equal(ws.last_classes, res.probs.argmax(1))
        full = run_conditional(ex, ws, x, "full")
        launches += len(full.reach)
        assert full.reach == [B] * ex.num_stages and (full.exit_index == ex.num_stages - 1).all()
        with torch_cuda.no_grad():
            p_full = torch_cuda.softmax(model.cpu()(torch_cuda.from_numpy(x))[0][:, -1], -1).numpy()
        np.testing.assert_allclose(full.probs, p_full, atol=2e-4, rtol=0)
    assert len(exits_seen) >= 3, f"test model should use several exits, saw {exits_seen}"
    if opts.get("graphs", True):
        assert ex.graph_replays > 0


def test_offsets_no_survivors_all_survivors_batch_one(torch_cuda, model):
    ex, ws = _backend(torch_cuda, model)
    x = np.random.default_rng(1).normal(size=(40, 1, 16, 16)).astype(np.float32)
    res = run_conditional(ex, ws, x, "exit", offsets=[-2.0, 0.0, 0.0])
    assert res.reach == [40] and (res.exit_index == 0).all() and ws.kernel_launches == 1
    res = run_conditional(ex, ws, x, "exit", offsets=[2.0, 2.0, 2.0])
    assert res.reach == [40] * 4 and (res.exit_index == 3).all()
    for offsets in ([-0.05, 0.0, 0.1], [0.1, -0.1, 0.0]):
        assert_matches(run_conditional(ex, ws, x, "exit", offsets), reference(torch_cuda, model, x, offsets))
    one = run_conditional(ex, ws, x[:1], "exit")
    assert_matches(one, reference(torch_cuda, model, x[:1]))


def test_one_stage_model(torch_cuda):
    m = small_vit(torch_cuda, exits=(), depth=2, seed=3)
    ex, ws = _backend(torch_cuda, m)
    assert ex.num_stages == 1
    x = np.random.default_rng(2).normal(size=(9, 1, 16, 16)).astype(np.float32)
    res = run_conditional(ex, ws, x, "exit")
    assert res.reach == [9] and (res.exit_index == 0).all() and ws.kernel_launches == 1
    with torch_cuda.no_grad():
        p = torch_cuda.softmax(m.cpu()(torch_cuda.from_numpy(x))[0][:, -1], -1).numpy()
    np.testing.assert_allclose(res.probs, p, atol=2e-4, rtol=0)


@pytest.mark.parametrize("graphs", [True, False])
def test_no_allocation_in_steady_state(torch_cuda, model, graphs):
    from jei_edge.runtime.cuda.memory import ALLOCATIONS

    torch = torch_cuda
    ex, ws = _backend(torch, model, graphs=graphs)
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(B, 1, 16, 16)).astype(np.float32) for B in range(1, 65)]
    for x in xs:  # warm-up: every size once, both modes
        run_conditional(ex, ws, x, "exit")
        run_conditional(ex, ws, x, "full")
    torch.cuda.synchronize()
    drv = ws.driver

    def snapshot():
        stats = torch.cuda.memory_stats()
        free = drv.cu.cuMemGetInfo()[1]
        return ALLOCATIONS.total, stats.get("segment.all.allocated", 0), stats.get("num_alloc_retries", 0), free

    before = snapshot()
    for i in range(300):
        run_conditional(ex, ws, xs[int(rng.integers(0, 64))], ("exit", "full")[i % 3 == 0])
    torch.cuda.synchronize()
    assert snapshot() == before


def test_pipeline_lanes_match_single_lane(torch_cuda, model):
    import copy

    from jei_edge.backends.torch_cuda import from_model

    pipe = from_model(copy.deepcopy(model), max_batch=32, lanes=3, pipeline=True)
    x = np.random.default_rng(5).normal(size=(200, 1, 16, 16)).astype(np.float32)
    res = pipe.run(x, "exit")
    assert_matches(res, reference(torch_cuda, model, x))
    assert res.reach[0] == 200 and pipe.kernel_launches == pipe.boundaries
    assert all(ws.kernel_launches > 0 for ws in pipe.lanes)
    again = pipe.run(x, "exit", micro_batch=7)
    np.testing.assert_array_equal(again.exit_index, res.exit_index)
    pipe.close()


def test_device_tensor_input(torch_cuda, model):
    ex, ws = _backend(torch_cuda, model)
    x = np.random.default_rng(6).normal(size=(20, 1, 16, 16)).astype(np.float32)
    xt = torch_cuda.from_numpy(x).cuda()
    res = run_conditional(ex, ws, xt, "exit")
    assert_matches(res, reference(torch_cuda, model, x))


@pytest.mark.parametrize("spans", [[(0, 1), (2, 2), (3, 3)], [(0, 0), (1, 3)], [(0, 3)]])
@pytest.mark.parametrize("graphs", [True, False])
def test_merged_stages_match_the_unmerged_model(torch_cuda, model, spans, graphs):
    """A --plan bundle's merged stages on the GPU: one kernel launch decides every gate of a stage
    in order; decisions and probabilities equal the unmerged model's (the numpy rule on its gates)."""
    ex, ws = _backend(torch_cuda, model, spans=spans, graphs=graphs)
    assert ex.num_stages == len(spans)
    rng = np.random.default_rng(4)
    seen = set()
    for B in (1, 7, 64):
        x = rng.normal(size=(B, 1, 16, 16)).astype(np.float32)
        for offsets in (None, [0.05, -0.1, 0.1]):
            per_stage = None
            if offsets is not None:
                per_stage = [tuple(offsets[e] for e in range(a, min(b, 2) + 1)) if b > a else offsets[a]
                             for a, b in spans if a <= 2]
            res = run_conditional(ex, ws, x, "exit", per_stage)
            assert_matches(res, reference(torch_cuda, model, x, offsets))
            seen.update(res.exit_index.tolist())
        full = run_conditional(ex, ws, x, "full")
        assert (full.exit_index == 3).all() and full.reach == [B] * len(spans)
    assert len(seen) >= 3
    assert ws.kernel_launches == ws.boundaries
