"""CUDA backend assembly without a GPU: clear errors, settings, lazy imports, buckets, pipeline
lanes, the torch-free core with a non-torch executor, FP16 hidden states. The driver is
``FakeDriver`` and the kernel its numpy emulation (test doubles, not hardware validation)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jei_edge.backends.torch_cuda import TorchCudaSettings
from jei_edge.errors import BundleError, InputError, JeiEdgeError
from jei_edge.runtime.cuda.graphs import Buckets, default_buckets
from jei_edge.runtime.cuda.pipeline import CudaPipeline
from jei_edge.runtime.cuda.workspace import CudaWorkspace
from jei_edge.runtime.loop import run_conditional

from tests.runtime.helpers import has_cuda_driver

from .conftest import FakeDriver, MergedMockExecutor, MockExecutor, fake_kernel, own_outputs, specs_for, stage

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_cuda_packages_is_light():
    code = ("import sys, jei_edge.runtime, jei_edge.runtime.cuda, jei_edge.runtime.cuda.backend, "
            "jei_edge.runtime.cuda.workspace, jei_edge.runtime.cuda.pipeline, jei_edge.runtime.cuda.graphs, "
            "jei_edge.backends, jei_edge.backends.torch_cuda, jei_edge.backends.torch_cuda.executor; "
            "bad = [m for m in ('torch', 'tensorrt', 'onnx', 'cuda.bindings.driver') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(has_cuda_driver(), reason="a CUDA driver is present")
def test_no_driver_is_a_clear_error():
    from jei_edge.runtime.cuda.driver import CudaDriver, CudaUnavailableError

    with pytest.raises(CudaUnavailableError, match="no CUDA driver") as info:
        CudaDriver(0)
    assert isinstance(info.value, JeiEdgeError) and "--device cpu" in str(info.value)


@pytest.mark.skipif(has_cuda_driver(), reason="a CUDA driver is present")
def test_torch_cuda_backend_without_driver_fails_before_loading_torch():
    """With torch blocked, creating the torch-cuda backend still fails with the driver error: the
    driver is checked before model.pt (and torch) is touched."""
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        from types import SimpleNamespace
        from jei_edge.backends import get_backend
        from jei_edge.runtime.cuda.driver import CudaUnavailableError
        be = get_backend("torch-cuda")
        bundle = SimpleNamespace(path="b.jei", model_path=None, manifest=SimpleNamespace(model_file="model.pt"))
        try:
            be.create(bundle, 4, be.settings_class())
        except CudaUnavailableError as exc:
            print("driver error:", exc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "driver error: no CUDA driver" in r.stdout, r.stdout + r.stderr


def test_settings_validation():
    assert TorchCudaSettings.from_options({"graphs": False, "buckets": [4, 2]}).buckets == (4, 2)
    with pytest.raises(InputError, match="unknown torch-cuda option.*'graph'"):
        TorchCudaSettings.from_options({"graph": True})
    with pytest.raises(InputError, match="lanes"):
        TorchCudaSettings.from_options({"lanes": 0})
    with pytest.raises(InputError, match="graphs must be true/false"):
        TorchCudaSettings.from_options({"graphs": 1})
    with pytest.raises(InputError, match="buckets must list integers >= 1"):
        TorchCudaSettings.from_options({"buckets": [0, 4]})


@pytest.mark.parametrize("max_batch", [1, 7, 64, 256, 1000])
def test_default_buckets(max_batch):
    b = default_buckets(max_batch)
    assert b[-1] == max_batch and list(b) == sorted(set(b)) and b[0] == 1
    for lo, hi in zip(b, b[1:]):
        assert hi <= max(2 * lo, lo + 8) and (hi <= 16 or hi <= 1.25 * lo + 8)


def test_bucket_choice():
    b = Buckets(True, graph_max_batch=64)
    assert b.sizes(32)[-1] == 32 and b.bucket_for(3, 32) == 4 and b.bucket_for(33, 32) is None
    assert b.bucket_for(100, 256) is None  # above graph_max_batch: eager
    assert Buckets(False).bucket_for(1, 32) is None
    assert Buckets(True, 256, explicit=[8, 2]).sizes(16) == (2, 8) and Buckets(True, 256, [8, 2]).bucket_for(5, 16) == 8


def test_model_check_catches_a_foreign_model():
    from jei_edge.backends.torch_cuda.executor import check_model_matches

    model = [stage(0, (3, 8, 8), (5, 16), 4, False), stage(1, (5, 16), None, 4, True)]
    good = SimpleNamespace(num_classes=4, stages=model)
    check_model_matches(good, model, 4, "b")
    with pytest.raises(BundleError, match="1 stages"):
        check_model_matches(SimpleNamespace(num_classes=4, stages=model[:1]), model, 4, "b")
    other = [stage(0, (3, 8, 8), (5, 8), 4, False), model[1]]
    with pytest.raises(BundleError, match="row shape"):
        check_model_matches(SimpleNamespace(num_classes=4, stages=other), model, 4, "b")
    with pytest.raises(BundleError, match="num_classes"):
        check_model_matches(good, model, 5, "b")
    for dtype in ("uint8", "float16"):  # INT8 quantized edges / FP16 engines: not what model.pt computes
        lowered = [stage(0, (3, 8, 8), (5, 16), 4, False, hidden_dtype=dtype),
                   stage(1, (5, 16), None, 4, True, in_dtype=dtype)]
        with pytest.raises(BundleError, match=rf"stage 0 hidden is {dtype} in the manifest.*--device cpu"):
            check_model_matches(SimpleNamespace(num_classes=4, stages=lowered), model, 4, "b")


def test_a_stage_with_more_gates_than_the_kernel_holds_is_refused():
    from jei_edge.runtime.cuda.backend import cuda_backend
    from jei_edge.runtime.cuda.kernel import MAX_GATES

    ex = MergedMockExecutor(MockExecutor(num_stages=MAX_GATES + 2), [(0, MAX_GATES), (MAX_GATES + 1, MAX_GATES + 1)])
    with pytest.raises(BundleError, match=rf"stage\(s\) \[0\] hold more than {MAX_GATES} gates.*--plan"):
        cuda_backend(ex, ex.specs(), ex.num_classes, 8, driver=FakeDriver())


def test_core_runs_a_non_torch_executor_with_torch_blocked():
    """The CUDA runtime core (driver -> kernel -> workspace -> loop) with a numpy executor and the
    fake driver, in a process where importing torch fails."""
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        from jei_edge.runtime.cuda.backend import cuda_backend
        from jei_edge.runtime.cuda.options import CudaOptions
        from jei_edge.runtime.loop import run_conditional
        import tests.cuda.conftest as c
        for binds, dtype in ((False, "float32"), (True, "float16")):
            ex = c.MockExecutor(seed=3, binds=binds, hidden_dtype=dtype)
            drv = c.FakeDriver()
            c.ExitKernel.__init__  # the real launcher; the fake driver emulates the kernel
            import jei_edge.runtime.cuda.backend as b
            b._KERNELS[(id(drv), None)] = c.fake_kernel(drv)
            ex, ws = cuda_backend(ex, c.specs_for(ex), ex.num_classes, 32, CudaOptions(), driver=drv)
            x = np.random.default_rng(0).normal(size=(29, 3, 5)).astype(np.float32)
            res = run_conditional(ex, ws, x, "exit")
            levels, probs, _ = ex.reference(x)
            assert (res.exit_index == levels).all() and (res.probs == probs).all()
            ws.close()
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def _lanes(ex, n, max_batch=16):
    d = FakeDriver()
    return d, [CudaWorkspace(d, fake_kernel(d), specs_for(ex), ex.num_classes, max_batch,
                             own_outputs=own_outputs(ex)) for _ in range(n)]


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
