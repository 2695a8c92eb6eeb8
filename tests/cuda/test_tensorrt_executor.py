"""The TensorRT executor's host logic on the CUDA core, without a GPU or TensorRT.

``FakeDriver`` (host memory, numpy exit-kernel emulation) and ``FakeTensorRT`` (recorded engines
that compute a ``MockExecutor``'s stages at the addresses they are given) are test doubles: these
tests check what the executor asks of TensorRT (shapes, addresses, streams, order, errors) and
that the results through the whole CUDA path equal the reference; they are **not** hardware or
TensorRT validation (docs/tensorrt.md says what has run where).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jei_edge.runtime.cuda.backend as cuda_backend_module
from jei_edge.backends.tensorrt import from_engines
from jei_edge.errors import BundleError
from jei_edge.runtime.cuda.driver import CudaError
from jei_edge.runtime.loop import run_conditional

from .conftest import FakeDriver, MergedMockExecutor, MockExecutor, fake_kernel, specs_for
from .fake_tensorrt import FakeTensorRT, record_engine

ROOT = Path(__file__).resolve().parents[2]


def _setup(hidden_dtype="float32", max_batch=32, pipeline=False, profile=(1, 8, 64), engines=None, graphs=False,
           options=None, invalidate_capture=False, **kw):
    """A recorded-engine executor on the fake driver (``graphs``: CUDA graphs per (stage, bucket);
    ``invalidate_capture``: every stream capture ends invalidated)."""
    model = MockExecutor(seed=5, hidden_dtype=hidden_dtype)
    stages = specs_for(model)
    drv = FakeDriver()
    drv.invalidate_capture = invalidate_capture
    trt = FakeTensorRT(model, driver=drv, **kw)
    cuda_backend_module._KERNELS[(id(drv), None)] = fake_kernel(drv)
    engines = engines or [record_engine(s, profile) for s in stages]
    return model, trt, drv, from_engines(trt, engines, stages, model.num_classes, max_batch, driver=drv,
                                         pipeline=pipeline, graphs=graphs, **(options or {}))


@pytest.mark.parametrize("hidden_dtype", ["float32", "float16"])
def test_engines_through_the_cuda_core_match_the_reference(hidden_dtype):
    model, trt, drv, (ex, ws) = _setup(hidden_dtype)
    x = np.random.default_rng(0).normal(size=(29, 3, 5)).astype(np.float32)
    res = run_conditional(ex, ws, x, "exit")
    levels, probs, _ = model.reference(x)
    np.testing.assert_array_equal(res.exit_index, levels)
    np.testing.assert_array_equal(res.probs, probs)
    # per stage: the input shape set to the live rows, then one enqueue on the workspace's stream
    calls = [c for c in trt.log if c[0] in ("shape", "enqueue")]
    ran = [k for k in range(model.num_stages) if res.reach[k]]
    expect = []
    for k in ran:
        n = res.reach[k]
        expect += [("shape", k, "x" if k == 0 else "hidden_in", (n, 3, 5)), ("enqueue", k, n, ws.stream)]
    assert calls == expect and ex.enqueues == len(ran)
    full = run_conditional(ex, ws, x, "full")
    assert (full.exit_index == model.num_stages - 1).all()
    ws.close()
    ex.close()


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("spans", [[(0, 1), (2, 3)], [(0, 0), (1, 3)], [(0, 3)]])
def test_engines_of_merged_stages(spans, graphs):
    """A ``--plan`` bundle's engines (merged stages: probs [n, E, C], gate [n, G]) on the CUDA core:
    decisions equal the unmerged model's, one enqueue and one exit-kernel launch per stage run."""
    model = MergedMockExecutor(MockExecutor(seed=5), spans)
    stages = model.specs()
    drv = FakeDriver()
    trt = FakeTensorRT(model, driver=drv)
    cuda_backend_module._KERNELS[(id(drv), None)] = fake_kernel(drv)
    ex, ws = from_engines(trt, [record_engine(s) for s in stages], stages, model.num_classes, 32, driver=drv,
                          graphs=graphs)
    x = np.random.default_rng(7).normal(size=(31, 3, 5)).astype(np.float32)
    for offsets in ([0.0] * 3, [0.2, -0.1, 0.1]):
        per_stage = [tuple(offsets[g] for g in s.gates) if s.merged else offsets[s.gates[0]]
                     for s in stages if s.gates]
        res = run_conditional(ex, ws, x, "exit", per_stage)
        levels, probs, _ = model.mock.reference(x, offsets)
        np.testing.assert_array_equal(res.exit_index, levels)
        np.testing.assert_array_equal(res.probs, probs)
    shapes = [c for c in trt.log if c[0] == "shape"]
    assert all(c[3][1:] == (3, 5) for c in shapes)
    assert ws.kernel_launches == ex.enqueues + ex.graph_replays and (ex.graph_replays > 0) == graphs
    ws.close()
    ex.close()


def test_addresses_are_the_workspace_buffers_and_set_once():
    model, trt, drv, (ex, ws) = _setup()
    bound = ex.bound_addresses(ws)
    for k, s in enumerate(specs_for(model)):
        assert bound[k][s.input.name] == ws.stage_input(k).device_ptr
        for t in s.outputs:  # outputs written where the next exit-kernel launch reads them
            assert bound[k][t.name] == ws.stage_outputs(k)[t.name].ptr
    assert bound[1]["hidden_in"] != bound[0]["hidden_out"]  # the kernel compacts between them
    n_addr = sum(c[0] == "address" for c in trt.log)
    x = np.random.default_rng(1).normal(size=(20, 3, 5)).astype(np.float32)
    for _ in range(3):
        run_conditional(ex, ws, x, "exit")
    assert sum(c[0] == "address" for c in trt.log) == n_addr  # never re-bound in the steady state
    assert sum(c[0] == "context" for c in trt.log) == model.num_stages  # one context per stage


def test_pipeline_lanes_get_their_own_contexts():
    model, trt, drv, pipe = _setup(pipeline=True, max_batch=16)
    x = np.random.default_rng(2).normal(size=(50, 3, 5)).astype(np.float32)
    res = pipe.run(x, "exit", micro_batch=16)
    levels, probs, _ = model.reference(x)
    np.testing.assert_array_equal(res.exit_index, levels)
    np.testing.assert_array_equal(res.probs, probs)
    assert sum(c[0] == "context" for c in trt.log) == 2 * model.num_stages  # two lanes
    streams = {c[3] for c in trt.log if c[0] == "enqueue"}
    assert len(streams) == 2
    pipe.close()


def test_error_paths_are_clear():
    model = MockExecutor(seed=5)
    stages = specs_for(model)
    good = [record_engine(s) for s in stages]
    with pytest.raises(BundleError, match="could not deserialize stage 1's engine"):
        _setup(engines=[good[0], b"corrupt", *good[2:]])
    wrong = json.loads(good[1])
    wrong["io"][0][2] = "float16"  # an engine built from another graph
    with pytest.raises(BundleError, match=r"stage 1's engine tensor 'hidden_in' is float16.*manifest's float32"):
        _setup(engines=[good[0], json.dumps(wrong).encode(), *good[2:]])
    renamed = json.loads(good[0])
    renamed["io"][1][0] = "features"
    with pytest.raises(BundleError, match="stage 0's engine has tensors"):
        _setup(engines=[json.dumps(renamed).encode(), *good[1:]])
    with pytest.raises(BundleError, match="batch profile ends at 16.*max_batch <= 16"):
        _setup(max_batch=32, profile=(1, 8, 16))
    with pytest.raises(BundleError, match="2 engines for 4 stages"):
        _setup(engines=good[:2])
    _, trt, _, (ex, ws) = _setup(fail_at=2)
    x = np.random.default_rng(3).normal(size=(30, 3, 5)).astype(np.float32)
    with pytest.raises(CudaError, match="stage 2: execute_async_v3 failed"):
        run_conditional(ex, ws, x, "full")


def test_the_board_path_needs_neither_torch_nor_onnxruntime():
    """`jei-edge run` on a board imports numpy, cuda-python and the toolchain only: with torch,
    onnx and onnxruntime blocked, the TensorRT backend runs engines (doubles) through the CUDA
    core, and the CLI reaches the GPU check (no driver here) without importing any of them."""
    code = textwrap.dedent("""
        import sys
        for m in ("torch", "onnx", "onnxruntime"):
            sys.modules[m] = None
        import numpy as np
        import jei_edge.cli.run_cmd, jei_edge.runtime, jei_edge.backends.tensorrt.executor
        import jei_edge.backends.tensorrt.validity
        from tests.cuda.test_tensorrt_executor import _setup
        from jei_edge.runtime.loop import run_conditional
        model, trt, drv, (ex, ws) = _setup("float16")
        x = np.random.default_rng(0).normal(size=(17, 3, 5)).astype(np.float32)
        res = run_conditional(ex, ws, x, "exit")
        assert (res.exit_index == model.reference(x)[0]).all()
        loaded = [m for m in ("torch", "onnx", "onnxruntime") if sys.modules.get(m) is not None]
        print("loaded", loaded)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("loaded []"), r.stdout + r.stderr


# -- CUDA graphs per (stage, batch bucket) ---------------------------------------------------------

def _check_runs(model, ex, ws, sizes=(1, 3, 17, 32, 9)):
    rng = np.random.default_rng(11)
    stage_runs = 0
    for B in sizes:
        x = rng.normal(size=(B, 3, 5)).astype(np.float32)
        res = run_conditional(ex, ws, x, "exit")
        levels, probs, _ = model.reference(x)
        np.testing.assert_array_equal(res.exit_index, levels)
        np.testing.assert_array_equal(res.probs, probs)
        stage_runs += sum(1 for r in res.reach if r)
    return stage_runs


def test_captured_graphs_replace_enqueues_in_the_steady_state():
    """TensorRT (no CudaGraphStrategy): one context per (stage, bucket) on a lane-shared scratch
    buffer, a warm-up enqueue at the bucket's shape, then the captured enqueue; runs replay graphs."""
    from jei_edge.runtime.cuda.graphs import default_buckets

    model, trt, drv, (ex, ws) = _setup(graphs=True, max_batch=32)
    assert ex.graph_mode == "capture" and not ex.uncapturable
    buckets = default_buckets(32)
    n = model.num_stages
    assert sorted(ex._lanes[id(ws)].graphs) == sorted((k, b) for k in range(n) for b in buckets)
    user = [c for c in trt.log if c[0] == "context" and getattr(c[2], "name", None) == "USER_MANAGED"]
    assert len(user) == n * len(buckets)
    scratch = {c[2] for c in trt.log if c[0] == "device_memory"}
    assert len(scratch) == 1  # every graph context of the lane shares one scratch buffer
    captures = [c for c in trt.log if c[0] == "capture"]
    assert [(c[1], c[2]) for c in captures] == [(k, b) for k in range(n) for b in buckets]
    assert all(c[3] == ws.stream for c in captures)
    before = len(trt.log)
    stage_runs = _check_runs(model, ex, ws)
    assert not [c for c in trt.log[before:] if c[0] in ("enqueue", "capture", "shape", "context")]
    launches = [e for e in drv.log if e[0] == "graph_launch"]
    assert len(launches) == ex.graph_replays == stage_runs and ex.enqueues == 0
    assert all(e[1] == ws.stream for e in launches)
    (ptr,) = scratch
    assert ptr in drv.mem
    ex.release(ws)
    assert not drv.graph_execs and ptr not in drv.mem  # graphs destroyed, scratch freed
    ws.close()


def test_live_counts_above_graph_max_batch_run_plain_enqueues():
    model, trt, drv, (ex, ws) = _setup(graphs=True, max_batch=32, options={"graph_max_batch": 8})
    assert max(b for _, b in ex._lanes[id(ws)].graphs) == 8
    x = np.random.default_rng(4).normal(size=(30, 3, 5)).astype(np.float32)
    before = len(trt.log)
    res = run_conditional(ex, ws, x, "full")  # 30 rows at every stage: all above 8
    assert (res.exit_index == model.num_stages - 1).all()
    assert [c[3][0] for c in trt.log[before:] if c[0] == "shape"] == [30] * model.num_stages
    assert ex.enqueues == model.num_stages and ex.graph_replays == 0
    _check_runs(model, ex, ws, sizes=(5, 20))


@pytest.mark.parametrize("how", ["enqueue_refused", "capture_invalidated"])
def test_a_stage_that_cannot_be_captured_runs_plain_enqueues(how, caplog):
    with caplog.at_level("WARNING", logger="jei_edge.tensorrt"):
        if how == "enqueue_refused":
            model, trt, drv, (ex, ws) = _setup(graphs=True, capture_fail_at=2)
        else:
            model, trt, drv, (ex, ws) = _setup(graphs=True, invalidate_capture=True)
    if how == "capture_invalidated":
        assert sorted(ex.uncapturable) == list(range(model.num_stages))
        assert "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED" in caplog.text
    else:
        assert sorted(ex.uncapturable) == [2] and "returned False while capturing" in ex.uncapturable[2]
        assert not [key for key in ex._lanes[id(ws)].graphs if key[0] == 2]
    assert not drv.capturing  # every capture was ended
    _check_runs(model, ex, ws)
    if how == "enqueue_refused":
        assert ex.enqueues > 0 and ex.graph_replays > 0  # stage 2 plain, the others from graphs
    ex.release(ws)
    assert not drv.graph_execs


def test_tensorrt_rtx_native_graphs_run_bucket_shapes_warmed_at_load():
    """TensorRT-RTX: contexts with WHOLE_GRAPH_CAPTURE (the runtime captures per shape itself);
    live counts run at their bucket's shape, every bucket warmed when the workspace is prepared."""
    from jei_edge.runtime.cuda.graphs import default_buckets

    model, trt, drv, (ex, ws) = _setup(graphs=True, native_graphs=True, max_batch=32)
    assert ex.graph_mode == "native"
    ctx = [c for c in trt.log if c[0] == "context"]
    assert len(ctx) == model.num_stages and all(c[2].name == "WHOLE_GRAPH_CAPTURE" for c in ctx)
    warm = [(c[1], c[3][0]) for c in trt.log if c[0] == "shape"]
    assert warm == [(k, b) for k in range(model.num_stages) for b in default_buckets(32)]
    before = len(trt.log)
    _check_runs(model, ex, ws)
    shapes = {c[3][0] for c in trt.log[before:] if c[0] == "shape"}
    assert shapes <= set(default_buckets(32)) and not drv.capturing and not drv.graphs
    assert not [c for c in trt.log[before:] if c[0] == "context"]


def test_graphs_off_is_one_plain_enqueue_per_stage_run():
    model, trt, drv, (ex, ws) = _setup(graphs=False, native_graphs=True)
    assert ex.graph_mode == "off" and not [e for e in drv.log if e[0] == "begin_capture"]
    stage_runs = _check_runs(model, ex, ws)
    assert ex.enqueues == stage_runs and ex.graph_replays == 0


def test_pipeline_lanes_capture_their_own_graphs():
    model, trt, drv, pipe = _setup(pipeline=True, max_batch=16, graphs=True)
    x = np.random.default_rng(6).normal(size=(70, 3, 5)).astype(np.float32)
    res = pipe.run(x, "exit", micro_batch=16)
    levels, probs, _ = model.reference(x)
    np.testing.assert_array_equal(res.exit_index, levels)
    np.testing.assert_array_equal(res.probs, probs)
    ex = pipe.executor
    assert len({c[2] for c in trt.log if c[0] == "device_memory"}) == 2  # one scratch buffer per lane
    streams = {e[1] for e in drv.log if e[0] == "graph_launch"}
    assert streams == {ws.stream for ws in pipe.lanes} and ex.enqueues == 0
    pipe.close()
    assert not drv.graph_execs
