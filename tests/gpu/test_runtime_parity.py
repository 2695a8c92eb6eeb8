"""The whole CUDA runtime (``Runtime.load(bundle, device="cuda")``) vs the CPU runtime on one bundle."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import small_vit

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def bundle(torch_cuda, tmp_path_factory):
    from jei_edge.compile.build import BuildOptions, build_bundle
    from jei_edge.model.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("bundle")
    save_checkpoint(d / "model.pt", small_vit(torch_cuda, seed=11))
    build_bundle(d / "model.pt", d / "model.jei", BuildOptions(parity_samples=300, stage_samples=64))
    return d / "model.jei"


def test_cuda_runtime_matches_cpu_runtime(bundle):
    from jei_edge.runtime import Runtime

    cpu = Runtime.load(bundle, device="cpu", max_batch=128)
    gpu = Runtime.load(bundle, device="cuda", max_batch=128)
    x = np.random.default_rng(0).normal(size=(300, 1, 16, 16)).astype(np.float32)
    seen = set()
    for offsets in (None, [-0.05, 0.02, 0.0]):
        for mode in ("exit", "full"):
            a, b = cpu.run(x, mode, offsets), gpu.run(x, mode, offsets)
            same = a.exit_index == b.exit_index
            assert same.mean() >= 0.99, f"{(~same).sum()} rows exit differently"
            np.testing.assert_array_equal(a.pred[same], b.pred[same])
            np.testing.assert_allclose(a.probs[same], b.probs[same], atol=2e-4, rtol=0)
            assert a.reach[0] == b.reach[0] == len(x)
            seen.update(b.exit_index.tolist())
    assert len(seen) >= 3
    ws = gpu.workspace
    assert ws.kernel_launches == ws.boundaries > 0


def test_cuda_runtime_rejects_bad_options(bundle):
    from jei_edge.errors import InputError
    from jei_edge.runtime import Runtime

    with pytest.raises(InputError, match="unknown torch-cuda option"):
        Runtime.load(bundle, device="cuda", max_batch=8, graph=False)


def test_the_contract_on_the_gpu(bundle):
    """Through the new contract: the device picks torch-cuda, capabilities are declared, close()
    frees the workspace, and a closed runtime refuses to run."""
    from jei_edge.runtime import Capability, Runtime

    with Runtime.load(bundle, device="cuda", max_batch=16) as rt:
        assert rt.backend == "torch-cuda" and Capability.BINDS_OUTPUTS in rt.executor.capabilities
        res = rt.run(np.zeros((3, 1, 16, 16), np.float32))
        assert res.exit_index.shape == (3,)
    assert not rt.workspace._buffers
    with pytest.raises(Exception, match="closed"):
        rt.run(np.zeros((1, 1, 16, 16), np.float32))
