"""Backend choice (the device follows the bundle), the registry, settings and Runtime's lifetime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jei_edge import backends
from jei_edge.bundle import MANIFEST, Bundle
from jei_edge.errors import BundleError, InputError, JeiEdgeError
from jei_edge.runtime import Capability, Runtime
from tests.runtime.helpers import has_cuda_driver, model_inputs, rehash, spinning_entries

ROOT = Path(__file__).resolve().parents[2]


def _with_target(src: Path, dst: Path, **target) -> Path:
    """A copy of bundle ``src`` whose manifest names another target (re-hashed)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    m["target"].update(target)
    (dst / MANIFEST).write_text(json.dumps(m))
    rehash(dst)
    return dst


def test_the_bundle_target_picks_the_backend(vit_bundle):
    with Runtime.load(vit_bundle) as rt:
        assert rt.backend == "onnxruntime" and rt.device == "cpu" and rt.settings.allow_spinning is True
        assert rt.settings.spin_after_run is False
        assert Capability.MERGED_STAGES in rt.executor.capabilities and rt.workspace.capacity == rt.max_batch
        rt.run(model_inputs(3))
    with pytest.raises(JeiEdgeError, match="closed"):
        rt.run(model_inputs(3))
    rt.close()  # idempotent


def test_choice_rules(vit_bundle):
    m = Bundle.open(vit_bundle).manifest
    assert backends.choose(m) == "onnxruntime"
    assert backends.choose(m, device="cpu") == "onnxruntime"
    assert backends.choose(m, device="cuda") == "torch-cuda"  # the stage graphs' model.pt on the GPU
    assert backends.choose(m, backend="torch-cuda") == "torch-cuda"
    with pytest.raises(InputError, match="runs on cuda, not on cpu"):
        backends.choose(m, device="cpu", backend="torch-cuda")
    with pytest.raises(InputError, match="unknown backend 'nope'"):
        backends.choose(m, backend="nope")
    with pytest.raises(InputError, match="device must be one of"):
        backends.choose(m, device="tpu")


def test_a_bundle_for_an_engine_target_says_how_to_run_it(vit_bundle, tmp_path):
    b = _with_target(vit_bundle, tmp_path / "rtx.jei", name="rtx-ada", backend="tensorrt_rtx", device="cuda",
                     backend_options={})
    with pytest.raises(BundleError, match="cannot run on the tensorrt_rtx backend: it holds no tensorrt_rtx engines"):
        Runtime.load(b)
    x = model_inputs(20, seed=3)
    with Runtime.load(b, device="cpu") as rt, Runtime.load(vit_bundle) as ref:  # its stage graphs on the CPU
        np.testing.assert_array_equal(rt.run(x).exit_index, ref.run(x).exit_index)
    weird = _with_target(vit_bundle, tmp_path / "weird.jei", backend="fpga")
    with pytest.raises(BundleError, match="names backend 'fpga'.*--device cpu"):
        Runtime.load(weird)


def test_a_bundle_keeps_its_targets_spinning_setting(vit_bundle, tmp_path):
    """A bundle built when the CPU target turned spinning off still runs with it off (its target
    table), unless the caller turns it on."""
    old = _with_target(vit_bundle, tmp_path / "old.jei", backend_options={"allow_spinning": False})

    def entries(rt):
        return spinning_entries(rt.executor.sessions[0].get_session_options())

    with Runtime.load(old) as rt:
        assert rt.settings.allow_spinning is False and entries(rt) == ("0", "0")
    with Runtime.load(old, allow_spinning=True) as rt:
        assert entries(rt) == ("1", "1")


def test_target_settings_are_validated_at_load(vit_bundle, tmp_path):
    b = _with_target(vit_bundle, tmp_path / "bad.jei", backend_options={"intra_op_thread": 2})
    with pytest.raises(InputError, match=r"unknown onnxruntime option\(s\) \['intra_op_thread'\]"):
        Runtime.load(b)
    with Runtime.load(vit_bundle, intra_op_threads=1) as rt:  # keywords override the target's table
        assert rt.settings.intra_op_threads == 1 and rt.settings.io_binding is True


def test_registry_imports_backends_lazily():
    code = ("import sys, jei_edge.backends as b; assert b.device_of('torch-cuda') == 'cuda'; "
            "bad = [m for m in ('onnxruntime', 'torch', 'jei_edge.backends.onnxruntime') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(has_cuda_driver(), reason="a CUDA driver is present")
@pytest.mark.parametrize("entry", ["jei-edge", "jei-edge-run"])
def test_device_cuda_without_a_driver_is_one_line(vit_bundle, tmp_path, entry):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32))
    args = (["run"] if entry == "jei-edge" else []) + [str(vit_bundle), str(tmp_path / "x.npy"), "--device", "cuda"]
    exe = Path(sys.executable).parent / entry
    r = subprocess.run([str(exe)] + args, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    assert "no CUDA driver" in r.stderr or "could not be imported" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) <= 2  # the error and its hint


def test_iobinding_cache_per_row_count(vit_bundle, monkeypatch):
    """One IOBinding per (stage, live-row count), reused when a row count comes back; results equal
    the plain `session.run` path on new data every call. Stage 0: a batch over ``COPY_INPUT_BYTES``
    is read where the caller keeps it, bound on every call and not held (the batch is freed once
    the caller drops it); a smaller one is copied into the workspace's own buffer, whose binding is
    kept. The same row count switches between the two and back without a stale binding."""
    import gc
    import weakref

    from jei_edge.runtime import workspace

    caller, own_buffer = 0, 1 << 30  # COPY_INPUT_BYTES values: every batch read in place / copied
    plan = [(64, caller), (7, own_buffer), (64, own_buffer), (1, caller), (7, caller), (33, own_buffer),
            (7, own_buffer), (64, caller), (7, caller)]
    with Runtime.load(vit_bundle, max_batch=64) as rt, Runtime.load(vit_bundle, max_batch=64, io_binding=False) as ref:
        own = rt.workspace.stage_input(0)
        cache = rt.executor._paths[0]["bindings"]
        for i, (b, copy_bytes) in enumerate(plan):  # row counts repeat: cached bindings are reused
            monkeypatch.setattr(workspace, "COPY_INPUT_BYTES", copy_bytes)
            batch = model_inputs(b, seed=10 + i)  # new data (and a new array) every call
            gone = weakref.ref(batch)
            got, want = rt.run(batch), ref.run(batch)
            np.testing.assert_array_equal(got.exit_index, want.exit_index)
            np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
            assert cache[(0, b)][1] is (own if copy_bytes else None)
            del batch, got
            gc.collect()
            assert gone() is None  # nothing the runtime keeps holds the caller's batch
        assert len(cache) > rt.bundle.num_stages  # several row counts per stage
        assert all(entry[1] is rt.workspace.stage_input(k) for (k, _), entry in cache.items() if k > 0)
