"""Host-side orchestration of the CUDA workspace (fake driver, mocked executor, no GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from jei_edge.errors import InputError
from jei_edge.runtime.cuda.driver import CudaError
from jei_edge.runtime.cuda.kernel import MAX_ROWS, grid_for
from jei_edge.runtime.cuda.memory import ALLOCATIONS
from jei_edge.runtime.cuda.workspace import CudaWorkspace
from jei_edge.runtime.loop import run_conditional

from .conftest import FakeDriver, MockExecutor, fake_kernel, own_outputs, specs_for, stage


def make(ex, driver=None, max_batch=64, **kw):
    driver = driver or FakeDriver()
    ws = CudaWorkspace(driver, fake_kernel(driver), specs_for(ex), ex.num_classes, max_batch,
                       own_outputs=own_outputs(ex), **kw)
    return driver, ws


@pytest.mark.parametrize("binds", [False, True])
@pytest.mark.parametrize("mapped", [False, True])
def test_matches_reference_exit_mode(binds, mapped):
    ex = MockExecutor(binds=binds, seed=1)
    _, ws = make(ex, mapped_io=mapped)
    rng = np.random.default_rng(0)
    seen = set()
    for B in (1, 2, 7, 33, 64):
        x = rng.normal(size=(B, 3, 5)).astype(np.float32)
        res = run_conditional(ex, ws, x, "exit")
        levels, probs, _ = ex.reference(x)
        np.testing.assert_array_equal(res.exit_index, levels)
        np.testing.assert_allclose(res.probs, probs, rtol=0, atol=0)
        np.testing.assert_array_equal(ws.last_classes, probs.argmax(1))
        np.testing.assert_array_equal(ws.last_confidence, probs.max(1))
        assert res.reach[0] == B
        assert res.reach == [int((levels >= k).sum()) for k in range(len(res.reach))]
        seen.update(levels.tolist())
    assert len(seen) >= 3, "the mock model should exercise several exits"


def test_full_mode_every_row_reaches_the_last_stage():
    ex = MockExecutor(seed=2)
    _, ws = make(ex)
    x = np.random.default_rng(1).normal(size=(40, 3, 5)).astype(np.float32)
    res = run_conditional(ex, ws, x, "full")
    assert res.reach == [40] * ex.num_stages
    assert (res.exit_index == ex.num_stages - 1).all()
    h = x
    for k in range(ex.num_stages):
        h, p, _ = ex.forward(k, h)
    np.testing.assert_array_equal(res.probs, p)


def test_offsets_change_exits_like_the_reference():
    ex = MockExecutor(seed=3)
    _, ws = make(ex)
    x = np.random.default_rng(2).normal(size=(64, 3, 5)).astype(np.float32)
    for offsets in ([-0.2, -0.1, 0.0], [0.3, 0.3, 0.3], [0.0, 0.5, -0.5]):
        res = run_conditional(ex, ws, x, "exit", offsets)
        np.testing.assert_array_equal(res.exit_index, ex.reference(x, offsets)[0])


def test_launches_equal_boundaries_executed():
    ex = MockExecutor(seed=4)
    d, ws = make(ex)
    rng = np.random.default_rng(3)
    total = 0
    for B in (1, 5, 64, 17):
        res = run_conditional(ex, ws, rng.normal(size=(B, 3, 5)).astype(np.float32), "exit")
        total += len(res.reach)
        assert ws.kernel_launches == ws.boundaries == total
    assert sum(1 for e in d.log if e[0] == "launch") == total


def test_no_survivors_stops_after_first_stage():
    ex = MockExecutor(seed=5)
    _, ws = make(ex)
    x = np.random.default_rng(4).normal(size=(16, 3, 5)).astype(np.float32)
    res = run_conditional(ex, ws, x, "exit", offsets=[-2.0, 0.0, 0.0])  # everyone exits at gate 0
    assert res.reach == [16] and (res.exit_index == 0).all()
    assert ws.kernel_launches == 1 and ex.calls == [(0, 16)]


def test_all_survivors_reach_the_final_head():
    ex = MockExecutor(seed=6)
    _, ws = make(ex)
    x = np.random.default_rng(5).normal(size=(16, 3, 5)).astype(np.float32)
    res = run_conditional(ex, ws, x, "exit", offsets=[2.0, 2.0, 2.0])
    assert res.reach == [16] * 4 and (res.exit_index == 3).all()


def test_one_stage_model():
    ex = MockExecutor(num_stages=1, seed=7)
    _, ws = make(ex)
    x = np.random.default_rng(6).normal(size=(9, 3, 5)).astype(np.float32)
    res = run_conditional(ex, ws, x, "exit")
    assert res.reach == [9] and (res.exit_index == 0).all()
    assert ws.kernel_launches == 1


def test_allocations_stay_flat_in_steady_state():
    ex = MockExecutor(seed=8)
    d, ws = make(ex)
    rng = np.random.default_rng(7)
    run_conditional(ex, ws, rng.normal(size=(64, 3, 5)).astype(np.float32), "exit")
    before = ALLOCATIONS.total, len(d.mem), len(d.host)
    for i in range(200):
        B = int(rng.integers(1, 65))
        run_conditional(ex, ws, rng.normal(size=(B, 3, 5)).astype(np.float32), ("exit", "full")[i % 2])
    assert (ALLOCATIONS.total, len(d.mem), len(d.host)) == before
    assert not any(e[0] in ("mem_alloc", "host_alloc") for e in d.log[-2000:])


def test_buffers_sized_once_for_max_batch():
    ex = MockExecutor(row_shape=(2, 7), num_classes=5, seed=9)
    d, ws = make(ex, max_batch=32)
    assert ws.stage_input(1).shape == (32, 2, 7)
    assert ws.stage_outputs(0)["probs"].shape == (32, 5)
    assert ws.x_host.shape == (32, 2, 7)
    sizes = sorted(n for (_, n) in d.mem.values())
    assert max(sizes) == 32 * 14 * 4


def test_stream_and_event_order_of_one_batch():
    ex = MockExecutor(seed=10)
    d, ws = make(ex)
    d.log.clear()
    x = np.random.default_rng(8).normal(size=(20, 3, 5)).astype(np.float32)
    res = run_conditional(ex, ws, x, "exit")
    ops = [(e[0], e[1]) for e in d.log]
    # copy-in on the copy stream, then the compute stream waits for it
    assert ops[0] == ("htod", ws.copy_stream)
    assert ops[1][0] == "record" and ops[1][1] == ws.copy_stream
    assert ops[2] == ("wait_event", ws.stream)
    launches = [i for i, o in enumerate(ops) if o[0] == "launch"]
    assert len(launches) == len(res.reach)
    assert all(ops[i][1] == ws.stream for i in launches)
    for i in launches[:-1]:  # each exit-mode boundary: launch -> record on the compute stream -> host waits
        assert ops[i + 1] == ("record", ws.stream) and ops[i + 2][0] == "event_sync"
    # copy-out on the copy stream after the compute stream's last launch, then one host wait
    dtoh = [i for i, o in enumerate(ops) if o[0] == "dtoh"]
    assert len(dtoh) == 4 and min(dtoh) > launches[-1]
    assert all(ops[i][1] == ws.copy_stream for i in dtoh)
    assert ops[-1][0] == "event_sync"


def test_kernel_arguments_of_a_boundary():
    ex = MockExecutor(row_shape=(4, 6), seed=11)
    d, ws = make(ex)
    x = np.random.default_rng(9).normal(size=(10, 4, 6)).astype(np.float32)
    ws.begin(x)
    ex.execute(0, 10, ws)
    ws.exit_and_compact(0, 10, 0.125, True)
    a = ws.launcher.args
    assert (a.n, a.mode, a.first_exit, a.num_classes, a.row_bytes) == (10, 0, 0, ex.num_classes, 4 * 6 * 4)
    assert (a.num_gates, a.num_exits, a.final_head, a.deltas[0]) == (1, 1, 0, 0.125)
    assert a.s_in == ws.s_init.ptr and a.idx_in == ws.idx_init.ptr
    assert a.s_out == ws.s_pp[0].ptr and a.hidden_out == ws.stage_input(1).ptr
    assert a.hidden_in == ws.stage_outputs(0)["hidden_out"].ptr and a.gate == ws.stage_outputs(0)["gate"].ptr
    syncs = sum(1 for e in d.log if e[0] == "event_sync")
    assert ws.exit_and_compact(0, 10, 0.0, False) == 10
    assert ws.launcher.args.mode == 1
    assert sum(1 for e in d.log if e[0] == "event_sync") == syncs  # full mode: no host wait


def test_no_mapped_host_memory_reads_the_count_through_a_copy():
    ex = MockExecutor(seed=12)
    d = FakeDriver(can_map_host_memory=False)
    _, ws = make(ex, driver=d)
    x = np.random.default_rng(10).normal(size=(30, 3, 5)).astype(np.float32)
    res = run_conditional(ex, ws, x, "exit")
    np.testing.assert_array_equal(res.exit_index, ex.reference(x)[0])
    with pytest.raises(InputError, match="cannot map host memory"):
        make(ex, driver=FakeDriver(can_map_host_memory=False), mapped_io=True)


def test_bad_inputs_are_clear_errors():
    ex = MockExecutor(seed=13)
    _, ws = make(ex, max_batch=8)
    with pytest.raises(InputError, match=r"expected \[batch, 3, 5\]"):
        ws.begin(np.zeros((2, 5, 3), np.float32))
    with pytest.raises(InputError, match="1..8"):
        ws.begin(np.zeros((9, 3, 5), np.float32))
    with pytest.raises(InputError, match="float"):
        ws.begin(np.zeros((2, 3, 5), np.int64))
    with pytest.raises(InputError, match="max_batch"):
        make(ex, max_batch=MAX_ROWS + 1)


def test_unbound_outputs_fail_loudly():
    ex = MockExecutor(seed=14, binds=True)
    _, ws = make(ex)
    ws.begin(np.zeros((3, 3, 5), np.float32))
    with pytest.raises(CudaError, match="no bound outputs"):
        ws.exit_and_compact(0, 3, 0.0, True)


def test_stage_shape_mismatch_is_rejected():
    d = FakeDriver()
    specs = [stage(0, (3,), (4,), 3, False), stage(1, (5,), None, 3, True)]
    with pytest.raises(CudaError, match="stage 1 expects"):
        CudaWorkspace(d, fake_kernel(d), specs, 3, 8)


def test_device_input_through_cuda_array_interface():
    ex = MockExecutor(seed=15)
    d, ws = make(ex)
    x = np.random.default_rng(11).normal(size=(12, 3, 5)).astype(np.float32)

    class DevArray:  # fake-driver "device" memory is host memory
        __cuda_array_interface__ = {"shape": x.shape, "typestr": "<f4", "data": (x.ctypes.data, False),
                                    "version": 3, "strides": None, "stream": 1}

    res = run_conditional(ex, ws, DevArray(), "exit")
    np.testing.assert_array_equal(res.exit_index, ex.reference(x)[0])
    assert any(e[0] == "dtod" for e in d.log)


@pytest.mark.parametrize("n,max_grid,expect", [(1, 1024, (1, 1)), (256, 1024, (256, 1)), (1024, 1024, (1024, 1)),
                                               (1025, 1024, (513, 2)), (4096, 1024, (1024, 4)), (5, 2, (2, 3))])
def test_grid_for(n, max_grid, expect):
    grid, rows = grid_for(n, max_grid)
    assert (grid, rows) == expect
    assert grid * rows >= n > (grid - 1) * rows


def test_grid_for_limits():
    with pytest.raises(ValueError):
        grid_for(0)
    with pytest.raises(ValueError):
        grid_for(MAX_ROWS + 1)


def test_close_frees_everything():
    ex = MockExecutor(seed=16)
    d, ws = make(ex)
    ws.close()
    assert not d.mem and not d.host
    ws.close()  # idempotent


@pytest.mark.parametrize("binds", [False, True])
@pytest.mark.parametrize("mode", ["exit", "full"])
def test_fp16_hidden_states_flow_through_compaction(binds, mode):
    """An FP16 hidden state (2-byte elements, 30-byte rows: no 16-byte alignment) is compacted as
    bytes by the (emulated) kernel; gates and probabilities stay FP32; results equal the numpy
    reference of the same FP16-storing model exactly."""
    ex = MockExecutor(binds=binds, seed=31, hidden_dtype="float16")
    _, ws = make(ex, max_batch=64)
    assert ws.inputs[1].dtype == np.float16 and ws.stage_input(1).row_bytes == 30
    rng = np.random.default_rng(3)
    for B in (64, 1, 37):
        x = rng.normal(size=(B, 3, 5)).astype(np.float32)
        res = run_conditional(ex, ws, x, mode)
        levels, probs, _ = ex.reference(x)
        if mode == "full":
            levels = np.full(B, ex.num_stages - 1)
            probs = ex.reference(x, offsets=[9.0] * (ex.num_stages - 1))[1]
        np.testing.assert_array_equal(res.exit_index, levels)
        np.testing.assert_array_equal(res.probs, probs)
    # the FP16 model really differs from an FP32 one: the dtype is not silently ignored
    ref32 = MockExecutor(binds=binds, seed=31).reference(x)[1]
    assert not np.array_equal(ref32, probs)


def test_probs_must_be_float32():
    from dataclasses import replace

    from jei_edge.bundle.manifest import TensorSpec

    ex = MockExecutor(seed=32)
    specs = specs_for(ex)
    specs[0] = replace(specs[0], outputs=(specs[0].outputs[0], TensorSpec("probs", (6,), "float16"), specs[0].outputs[2]))
    d = FakeDriver()
    with pytest.raises(CudaError, match="'probs' is float16"):
        CudaWorkspace(d, fake_kernel(d), specs, 6, 8)


# -- merged stages (``--plan``): several gates decided by one kernel launch ------------------------

SPANS = {  # exits of each stage of a 6-exit mock (exits 0..5, 5 = the final head)
    "first_two": [(0, 1), (2, 2), (3, 3), (4, 4), (5, 5)],
    "middle": [(0, 0), (1, 3), (4, 4), (5, 5)],
    "with_final_head": [(0, 0), (1, 1), (2, 5)],
    "everything": [(0, 5)],
    "pairs": [(0, 1), (2, 3), (4, 5)],
}


def make_merged(spans, binds=False, seed=11, hidden_dtype="float32", max_batch=64, **kw):
    from .conftest import MergedMockExecutor

    ex = MergedMockExecutor(MockExecutor(num_stages=6, seed=seed, binds=binds, hidden_dtype=hidden_dtype), spans)
    driver = FakeDriver()
    ws = CudaWorkspace(driver, fake_kernel(driver), ex.specs(), ex.num_classes, max_batch,
                       own_outputs=own_outputs(ex), **kw)
    return ex, driver, ws


def stage_offsets(ex, offsets):
    """Per-gate offsets as the loop takes them: a float per one-gate stage, a tuple per merged one."""
    out, specs = [], ex.specs()
    for s in specs[:-1] if not specs[-1].gates else specs:
        d = tuple(offsets[g] for g in s.gates)
        out.append(d if s.merged else d[0])
    return out


@pytest.mark.parametrize("plan", sorted(SPANS))
@pytest.mark.parametrize("binds", [False, True])
def test_merged_stages_decide_like_the_unmerged_model(plan, binds):
    ex, d, ws = make_merged(SPANS[plan], binds=binds)
    rng = np.random.default_rng(5)
    seen = set()
    for B in (1, 2, 9, 64):
        x = rng.normal(size=(B, 3, 5)).astype(np.float32)
        for offsets in ([0.0] * 5, [0.1, -0.2, 0.0, 0.3, -0.1], [-0.3] * 5):
            res = run_conditional(ex, ws, x, "exit", stage_offsets(ex, offsets))
            levels, probs, _ = ex.mock.reference(x, offsets)
            np.testing.assert_array_equal(res.exit_index, levels)
            np.testing.assert_array_equal(res.probs, probs)
            np.testing.assert_array_equal(ws.last_classes, probs.argmax(1))
            stage_of = {e: i for i, (a, b) in enumerate(SPANS[plan]) for e in range(a, b + 1)}
            assert res.reach == [int((np.vectorize(stage_of.get)(levels) >= i).sum()) for i in range(len(res.reach))]
            seen.update(levels.tolist())
    assert len(seen) >= 4
    # one kernel launch per stage boundary executed, whatever the number of gates inside
    assert ws.kernel_launches == ws.boundaries == sum(1 for e in d.log if e[0] == "launch")


def test_merged_kernel_arguments_carry_every_gate_offset():
    ex, d, ws = make_merged(SPANS["middle"])
    x = np.random.default_rng(0).normal(size=(8, 3, 5)).astype(np.float32)
    ws.begin(x)
    ex.execute(0, 8, ws)
    m = ws.exit_and_compact(0, 8, 0.0, True)
    ex.execute(1, m, ws)
    ws.exit_and_compact(1, m, (0.1, 0.2, 0.3), True)
    a = ws.launcher.args
    assert (a.n, a.first_exit, a.num_gates, a.num_exits, a.final_head) == (m, 1, 3, 3, 0)
    assert list(a.deltas[:3]) == [0.1, 0.2, 0.3]
    assert a.gate == ws.stage_outputs(1)["gate"].ptr and a.probs == ws.stage_outputs(1)["probs"].ptr


def test_merged_full_mode_reaches_the_final_head():
    ex, _, ws = make_merged(SPANS["with_final_head"])
    x = np.random.default_rng(1).normal(size=(20, 3, 5)).astype(np.float32)
    res = run_conditional(ex, ws, x, "full")
    assert (res.exit_index == 5).all() and res.reach == [20, 20, 20]
    h = x
    for k in range(6):
        h, p, _ = ex.mock.forward(k, h)
    np.testing.assert_array_equal(res.probs, p)


@pytest.mark.parametrize("mode", ["exit", "full"])
def test_merged_fp16_hidden_states(mode):
    ex, _, ws = make_merged(SPANS["pairs"], hidden_dtype="float16")
    x = np.random.default_rng(2).normal(size=(33, 3, 5)).astype(np.float32)
    res = run_conditional(ex, ws, x, mode)
    if mode == "exit":
        np.testing.assert_array_equal(res.exit_index, ex.mock.reference(x)[0])
    else:
        assert (res.exit_index == 5).all()


def test_merged_offsets_of_the_wrong_length_are_refused():
    ex, _, ws = make_merged(SPANS["middle"])
    x = np.zeros((4, 3, 5), np.float32)
    with pytest.raises(InputError, match="stage 1 has 3 gate"):
        run_conditional(ex, ws, x, "exit", [0.0, (0.1, 0.2), 0.0])


def test_merged_stage_shapes_must_match_their_exits():
    from dataclasses import replace

    from jei_edge.bundle.manifest import TensorSpec

    ex, driver, _ = make_merged(SPANS["middle"])
    specs = ex.specs()
    bad = replace(specs[1], outputs=tuple(TensorSpec("gate", (2,)) if t.name == "gate" else t for t in specs[1].outputs))
    with pytest.raises(CudaError, match="stage 1 output 'gate' has row shape \\[2\\]"):
        CudaWorkspace(driver, fake_kernel(driver), [specs[0], bad] + specs[2:], ex.num_classes, 8)
