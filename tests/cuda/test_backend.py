"""Backend assembly without a GPU: clear errors, options, lazy imports, buckets, pipeline lanes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from jei_edge.errors import InputError, JeiEdgeError
from jei_edge.runtime.cuda.options import CudaOptions
from jei_edge.runtime.cuda.pipeline import CudaPipeline, merge_results
from jei_edge.runtime.cuda.torch_executor import default_buckets
from jei_edge.runtime.cuda.workspace import CudaWorkspace
from jei_edge.runtime.loop import Results, run_conditional

from .conftest import FakeDriver, MockExecutor, fake_kernel, specs_for


def _has_driver() -> bool:
    try:
        from cuda.bindings import driver as cu

        return cu.cuInit(0)[0] == cu.CUresult.CUDA_SUCCESS
    except Exception:
        return False


def test_importing_the_cuda_package_is_light():
    code = ("import sys, jei_edge.runtime, jei_edge.runtime.cuda, jei_edge.runtime.cuda.backend, "
            "jei_edge.runtime.cuda.workspace, jei_edge.runtime.cuda.pipeline, jei_edge.runtime.cuda.torch_executor; "
            "bad = [m for m in ('torch', 'tensorrt', 'onnx', 'cuda.bindings.driver') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(_has_driver(), reason="a CUDA driver is present")
def test_no_driver_is_a_clear_error():
    from jei_edge.runtime.cuda.driver import CudaDriver, CudaUnavailableError

    with pytest.raises(CudaUnavailableError, match="no CUDA driver") as info:
        CudaDriver(0)
    assert isinstance(info.value, JeiEdgeError) and "--device cpu" in str(info.value)


@pytest.mark.skipif(_has_driver(), reason="a CUDA driver is present")
def test_make_backend_without_driver_fails_before_loading_anything():
    from jei_edge.runtime.cuda import make_backend
    from jei_edge.runtime.cuda.driver import CudaUnavailableError

    class Bundle:  # never touched: the driver check comes first
        path, manifest, model_path = "b.jei", {}, None

    with pytest.raises(CudaUnavailableError):
        make_backend(Bundle(), max_batch=4)


def test_cli_style_error_has_no_traceback_from_bindings():
    """The error message is one line that names the problem (the CLI prints str(err))."""
    from jei_edge.runtime.cuda.driver import CudaUnavailableError

    err = CudaUnavailableError("no CUDA driver found on this machine (libcuda.so could not be loaded)",
                               hint="install the NVIDIA driver, or run with --device cpu")
    assert "\n" not in str(err) and err.exit_code != 0


def test_options_validation():
    assert CudaOptions.from_kwargs(graphs=False, buckets=[4, 2]).buckets == (4, 2)
    with pytest.raises(InputError, match="unknown CUDA backend option.*'graph'"):
        CudaOptions.from_kwargs(graph=True)
    with pytest.raises(InputError, match="lanes"):
        CudaOptions.from_kwargs(lanes=0)


def test_unavailable_executor_says_why(monkeypatch):
    from jei_edge.runtime.cuda import backend

    with pytest.raises(InputError, match="GPU-target work"):
        backend._make_executor(None, CudaOptions(executor="tensorrt_rtx"))
    with pytest.raises(InputError, match="unknown CUDA executor"):
        backend._make_executor(None, CudaOptions(executor="nope"))


@pytest.mark.parametrize("max_batch", [1, 7, 64, 256, 1000])
def test_default_buckets(max_batch):
    b = default_buckets(max_batch)
    assert b[-1] == max_batch and list(b) == sorted(set(b)) and b[0] == 1
    for lo, hi in zip(b, b[1:]):
        assert hi <= max(2 * lo, lo + 8) and (hi <= 16 or hi <= 1.25 * lo + 8)


def test_check_manifest_catches_a_foreign_model():
    from jei_edge.errors import BundleError
    from jei_edge.runtime.cuda.backend import check_manifest
    from jei_edge.runtime.cuda.workspace import StageSpec

    class M:
        num_classes = 4

        def stage_ranges(self):
            return [(0, 2), (2, 4)]

    specs = [StageSpec(0, (3, 8, 8), (5, 16), 0), StageSpec(1, (5, 16), None, 1)]
    good = {"num_classes": 4, "stages": [
        {"index": 0, "blocks": [0, 2], "outputs": [{"name": "hidden_out", "shape": ["batch", 5, 16]}]},
        {"index": 1, "blocks": [2, 4], "outputs": [{"name": "probs", "shape": ["batch", 4]}]}]}
    check_manifest(good, specs, M(), "b")
    bad = dict(good, stages=good["stages"][:1])
    with pytest.raises(BundleError, match="1 stages"):
        check_manifest(bad, specs, M(), "b")
    bad = {"num_classes": 4, "stages": [dict(good["stages"][0], outputs=[{"name": "hidden_out", "shape": ["batch", 5, 8]}]),
                                        good["stages"][1]]}
    with pytest.raises(BundleError, match="row shape"):
        check_manifest(bad, specs, M(), "b")
    bad = {"num_classes": 4, "stages": [dict(good["stages"][0], blocks=[0, 3]), good["stages"][1]]}
    with pytest.raises(BundleError, match="covers blocks"):
        check_manifest(bad, specs, M(), "b")
    merged = {"num_classes": 4, "stages": [dict(good["stages"][0], blocks=[0, 4], exits=[0, 1])]}
    with pytest.raises(BundleError, match=r"stage\(s\) \[0\] merge several exits.*--plan every"):
        check_manifest(merged, specs, M(), "b")


def _lanes(ex, n, max_batch=16):
    d = FakeDriver()
    return d, [CudaWorkspace(d, fake_kernel(d), specs_for(ex), ex.num_classes, max_batch,
                             own_outputs=not ex.binds_outputs) for _ in range(n)]


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_pipeline_matches_reference_and_keeps_order(lanes):
    ex = MockExecutor(seed=21, binds=True)
    d, ws = _lanes(ex, lanes)
    pipe = CudaPipeline(ex, ws)
    x = np.random.default_rng(0).normal(size=(75, 3, 5)).astype(np.float32)
    res = pipe.run(x, "exit", micro_batch=16)
    levels, probs, _ = ex.reference(x)
    np.testing.assert_array_equal(res.exit_index, levels)
    np.testing.assert_array_equal(res.probs, probs)
    assert res.reach[0] == 75 and res.reach == [int((levels >= k).sum()) for k in range(len(res.reach))]
    assert pipe.kernel_launches == pipe.boundaries
    used = {w for w in ws if w.kernel_launches}
    assert len(used) == min(lanes, 5)
    if lanes > 1:
        assert len(d.current_threads) >= 2  # every lane thread bound the context
    full = pipe.run(x, "full", micro_batch=16)
    assert (full.exit_index == ex.num_stages - 1).all()
    pipe.close()
    assert not d.mem and not d.host


def test_pipeline_rejects_bad_micro_batch():
    ex = MockExecutor(seed=22)
    _, ws = _lanes(ex, 2, max_batch=8)
    pipe = CudaPipeline(ex, ws)
    with pytest.raises(InputError, match="micro_batch"):
        pipe.run(np.zeros((4, 3, 5), np.float32), micro_batch=9)
    with pytest.raises(InputError, match="no rows"):
        pipe.run(np.zeros((0, 3, 5), np.float32))


def test_merge_results_sums_reach():
    a = Results(np.ones((2, 3), np.float32), np.array([0, 1]), [2, 1])
    b = Results(np.zeros((1, 3), np.float32), np.array([2]), [1, 1, 1])
    m = merge_results([a, b])
    assert m.reach == [3, 2, 1] and m.exit_index.tolist() == [0, 1, 2] and m.probs.shape == (3, 3)


def test_single_workspace_reuse_across_modes_and_sizes():
    ex = MockExecutor(seed=23)
    _, (ws,) = _lanes(ex, 1, max_batch=32)
    rng = np.random.default_rng(1)
    for B in (32, 1, 31, 2):
        x = rng.normal(size=(B, 3, 5)).astype(np.float32)
        for mode in ("full", "exit"):
            res = run_conditional(ex, ws, x, mode)
            expect = ex.reference(x)[0] if mode == "exit" else np.full(B, ex.num_stages - 1)
            np.testing.assert_array_equal(res.exit_index, expect)
