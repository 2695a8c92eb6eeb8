"""The fused exit kernel on a real GPU vs the numpy exit rule, every output element checked."""

from __future__ import annotations

import numpy as np
import pytest

from jei_edge.exit_rule import exit_mask

from .conftest import POISON

pytestmark = pytest.mark.gpu


def _case(rng, n, C, row_bytes, slots=None, gate_kind="uniform"):
    slots = slots or n + int(rng.integers(0, 50))
    idx = rng.permutation(slots)[:n].astype(np.int32)
    s = rng.uniform(0, 0.99, n) * (rng.random(n) < 0.7)  # many rows with S = 0 as at the first gate
    if gate_kind == "uniform":
        g = rng.random(n).astype(np.float32)
    elif gate_kind == "all_exit":
        g = np.ones(n, np.float32)
    else:
        g = np.zeros(n, np.float32)
        s = np.zeros(n)
    z = rng.normal(0, 3, (n, C))
    probs = np.exp(z - z.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    hidden = rng.integers(0, 256, (n, row_bytes), dtype=np.uint8) if row_bytes else None
    return dict(gate=g, s=s, idx=idx, probs=probs, hidden=hidden, slots=slots)


def _check(out, case, mode, delta, exit_index):
    g, s, idx, probs, hidden, slots = (case[k] for k in ("gate", "s", "idx", "probs", "hidden", "slots"))
    n, C = probs.shape
    if mode == 0:
        leave = exit_mask(g, s, delta)
    else:
        leave = np.full(n, mode == 2)
    keep = ~leave
    m = int(keep.sum())
    assert out["count"] == m
    # exited rows: their original slots hold probs, class, confidence, exit index
    sl = idx[leave]
    np.testing.assert_array_equal(out["out_probs"][sl], probs[leave])
    np.testing.assert_array_equal(out["out_class"][sl], probs[leave].argmax(1))
    np.testing.assert_array_equal(out["out_conf"][sl], probs[leave].max(1))
    np.testing.assert_array_equal(out["out_exit"][sl], exit_index)
    # every other slot is untouched
    untouched = np.ones(slots, bool)
    untouched[sl] = False
    assert (out["out_probs_raw"][untouched] == 0xFF).all()
    assert (out["out_conf_raw"][untouched] == 0xFF).all()
    assert (out["out_class"][untouched] == -1).all() and (out["out_exit"][untouched] == -1).all()
    # survivors: compacted in stable order; nothing written past them
    np.testing.assert_array_equal(out["idx_out"][:m], idx[keep])
    assert (out["idx_out"][m:] == -1).all()
    if mode != 2:
        np.testing.assert_array_equal(out["s_out"][:m], (s + g.astype(np.float64))[keep])
    assert (out["s_out_raw"][m * 8:] == 0xFF).all()
    if hidden is not None:
        rb = hidden.shape[1]
        np.testing.assert_array_equal(out["hidden_out"][: m * rb].reshape(m, rb), hidden[keep])
        assert (out["hidden_out"][m * rb:] == POISON).all()
    return m


SIZES = [1, 2, 3, 31, 32, 33, 100, 255, 256, 257, 1000, 1023, 1024, 1025, 2049, 4096, 16384]


@pytest.mark.parametrize("n", SIZES)
def test_random_inputs_vs_numpy(harness, n):
    rng = np.random.default_rng(n)
    for row_bytes, C, delta in ((4 * 48, 10, 0.0), (4 * 65, 7, -0.1), (2 * 33, 3, 0.15)):
        case = _case(rng, n, C, row_bytes)
        out = harness.run(**case, mode=0, delta=delta, exit_index=n % 5)
        m = _check(out, case, 0, delta, n % 5)
        if n >= 100:
            assert 0 < m < n  # both paths exercised


@pytest.mark.parametrize("row_bytes,offset", [(1040, 0), (1036, 0), (1040, 4), (6, 0), (1, 0), (15, 3)])
def test_row_lengths_and_alignment(harness, row_bytes, offset):
    """16-byte vector path, 4-byte path and byte path, with aligned and misaligned bases."""
    rng = np.random.default_rng(row_bytes + offset)
    case = _case(rng, 300, 5, row_bytes)
    out = harness.run(**case, mode=0, delta=0.0, offset=offset)
    _check(out, case, 0, 0.0, 0)


@pytest.mark.parametrize("max_grid", [1, 3, 7, 64])
def test_several_rows_per_block(cuda_driver, exit_kernel, max_grid):
    from .conftest import KernelHarness

    h = KernelHarness(cuda_driver, exit_kernel, max_rows=600, max_slots=700, max_classes=12, max_row_bytes=64,
                      max_grid=max_grid)
    try:
        rng = np.random.default_rng(max_grid)
        for n in (1, 5, 64, 599):
            case = _case(rng, n, 12, 64)
            out = h.run(**case, mode=0, delta=0.05, exit_index=2)
            _check(out, case, 0, 0.05, 2)
            last = h.launcher.last
            assert last.grid <= max_grid and last.grid * last.rows_per_block >= n
    finally:
        h.close()


def test_many_classes_argmax_ties_and_exact_threshold(harness):
    rng = np.random.default_rng(7)
    n, C = 257, 1000
    case = _case(rng, n, C, 32)
    probs = case["probs"]
    probs[0, :] = 1.0 / C  # all equal -> class 0
    probs[1, [5, 700, 999]] = 2.0  # tie across warps -> the lowest index
    probs[2, 999] = 3.0  # the last class
    case["s"][:4] = 0.5
    case["gate"][:4] = 0.25  # exactly the threshold (1 - 0.5)/2: exits (>=)
    case["gate"][4] = np.nan  # never exits
    out = harness.run(**case, mode=0, delta=0.0)
    _check(out, case, 0, 0.0, 0)
    assert out["out_class"][case["idx"][0]] == 0 and out["out_class"][case["idx"][1]] == 5
    assert out["out_class"][case["idx"][2]] == 999
    assert out["out_exit"][case["idx"][4]] == -1


@pytest.mark.parametrize("n", [1, 64, 4096])
def test_no_survivors_and_all_survivors(harness, n):
    rng = np.random.default_rng(n + 1)
    case = _case(rng, n, 10, 128, gate_kind="all_exit")
    assert _check(harness.run(**case, mode=0), case, 0, 0.0, 0) == 0
    case = _case(rng, n, 10, 128, gate_kind="none_exit")
    assert _check(harness.run(**case, mode=0), case, 0, 0.0, 0) == n


@pytest.mark.parametrize("n", [1, 77, 1024])
def test_full_mode_and_final_head(harness, n):
    rng = np.random.default_rng(n + 2)
    case = _case(rng, n, 10, 64)
    assert _check(harness.run(**case, mode=1, exit_index=1), case, 1, 0.0, 1) == n
    case["hidden"] = None
    assert _check(harness.run(**case, mode=2, exit_index=4), case, 2, 0.0, 4) == 0


def test_launch_counter(harness):
    before = harness.launcher.launches
    rng = np.random.default_rng(3)
    for n in (1, 2, 3):
        harness.run(**_case(rng, n, 4, 16), mode=0)
    assert harness.launcher.launches == before + 3


# -- merged stages: several gates decided in one launch --------------------------------------------

def _merged_reference(g, s, deltas, mode, final_head):
    """Slot taken by each row (-1: survives) and its S after the gates, from the numpy rule."""
    n, G = g.shape
    slot = np.full(n, -1)
    S = s.copy()
    for j in range(G):
        if mode == 0:
            fire = (slot < 0) & exit_mask(g[:, j], S, deltas[j])
            slot[fire] = j
        S = np.where(slot < 0, S + g[:, j].astype(np.float64), S)
    if final_head:
        slot[slot < 0] = G
    return slot, S


@pytest.mark.parametrize("n", [1, 33, 257, 4096])
@pytest.mark.parametrize("G,final_head", [(2, False), (3, True), (11, False), (31, True)])
def test_merged_stage_vs_numpy(cuda_driver, exit_kernel, n, G, final_head):
    from .conftest import KernelHarness

    E, C, rb = G + int(final_head), 10, 96
    h = KernelHarness(cuda_driver, exit_kernel, max_rows=4096, max_slots=4200, max_classes=C, max_row_bytes=rb,
                      max_exits=E)
    try:
        rng = np.random.default_rng(n * 100 + G)
        base = _case(rng, n, C, rb)
        g = (rng.random((n, G)) ** 3).astype(np.float32)
        z = rng.normal(0, 3, (n, E, C))
        probs = np.exp(z - z.max(-1, keepdims=True))
        probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
        deltas = rng.uniform(-0.15, 0.15, G)
        out = h.run(gate=g, s=base["s"], idx=base["idx"], probs=probs, hidden=None if final_head else base["hidden"],
                    slots=base["slots"], mode=0, delta=deltas, exit_index=3, final_head=final_head)
        slot, S = _merged_reference(g, base["s"], deltas, 0, final_head)
        leave, keep = slot >= 0, slot < 0
        m = int(keep.sum())
        assert out["count"] == m
        sl = base["idx"][leave]
        chosen = probs[np.flatnonzero(leave), slot[leave]]
        np.testing.assert_array_equal(out["out_probs"][sl], chosen)
        np.testing.assert_array_equal(out["out_class"][sl], chosen.argmax(1))
        np.testing.assert_array_equal(out["out_exit"][sl], 3 + slot[leave])
        np.testing.assert_array_equal(out["idx_out"][:m], base["idx"][keep])
        np.testing.assert_array_equal(out["s_out"][:m], S[keep])
        if not final_head:
            np.testing.assert_array_equal(out["hidden_out"][: m * rb].reshape(m, rb), base["hidden"][keep])
        else:
            assert m == 0
        if n >= 257:
            assert len(set(slot.tolist())) >= 3
    finally:
        h.close()


def test_driver_stream_capture_replays_a_launch(cuda_driver, exit_kernel):
    """The driver's CUDA-graph calls (what the TensorRT executor captures engine enqueues with):
    a launch captured on a stream does nothing until the instantiated graph is replayed, and the
    replay produces exactly the direct launch's outputs (arguments frozen at capture)."""
    from .conftest import KernelHarness

    d = cuda_driver
    h = KernelHarness(d, exit_kernel, max_rows=512, max_slots=600, max_classes=10, max_row_bytes=64)
    direct = h.launcher.launch
    replays = []

    def captured(stream, **kw):
        d.stream_begin_capture(stream)
        direct(stream, **kw)
        graph = d.stream_end_capture(stream)
        exe = d.graph_instantiate(graph)
        d.graph_destroy(graph)
        d.stream_synchronize(stream)
        replays.append(int(h.count.array[0]))  # still the harness's marker: nothing ran yet
        d.graph_launch(exe, stream)
        d.stream_synchronize(stream)
        d.graph_exec_destroy(exe)

    try:
        rng = np.random.default_rng(12)
        h.launcher.launch = captured
        for n in (1, 100, 500):
            case = _case(rng, n, 10, 64)
            _check(h.run(**case, mode=0, delta=0.02, exit_index=1), case, 0, 0.02, 1)
        assert replays == [-7, -7, -7]
    finally:
        h.close()
