"""`jei-edge selftest`: what runs here (onnxruntime, Polygraphy's comparator), what it says it could
not run (engines without a GPU), and its exit codes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.helpers import cli_blocked, rehash

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("polygraphy", reason="polygraphy is not installed (pip install 'jei-edge[dev]')")


def _cli(*args, block=("torch",)):
    return cli_blocked(*args, block=block)


def test_cpu_bundle_passes_every_check_that_runs_here(vit_bundle, tmp_path):
    out = tmp_path / "selftest.json"
    r = _cli("selftest", str(vit_bundle), "--repeats", "2", "--samples", "128", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "PASSED on onnxruntime" in r.stdout and "Traceback" not in r.stderr
    report = json.loads(out.read_text())
    ort = report["backends"]["onnxruntime"]
    assert ort["ran"] and ort["passed"] and ort["decisions"]["samples"] > 0
    assert set(ort["speed"]) == {"1", "64"}  # batch 1 and the opt batch
    assert all(s["realized_speedup"] > 0 for s in ort["speed"].values())
    cmp = report["stage_comparison"]["onnxruntime"]
    assert cmp["ran"] and cmp["passed"] and len(cmp["stages"]) == 4
    assert report["facts"]["python"] and "onnxruntime" in report["facts"]["toolchains"]


def test_a_bundle_that_no_longer_matches_its_references_fails(vit_bundle, tmp_path):
    bad = tmp_path / "bad.jei"
    shutil.copytree(vit_bundle, bad)
    ref = bad / "reference" / "verify.npz"
    with np.load(ref) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["exit_index"] = (arrays["exit_index"] + 1) % 4  # PyTorch "decided" otherwise everywhere
    np.savez(ref, **arrays)
    rehash(bad)
    r = _cli("selftest", str(bad), "--repeats", "1", "--samples", "64", "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["failed"] == ["onnxruntime"] and "parity failed" in report["backends"]["onnxruntime"]["decisions"]["error"]


def test_engines_it_cannot_run_here_are_named_not_hidden(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")
    from tests.runtime.helpers import has_cuda_driver, save_spread

    if has_cuda_driver():
        pytest.skip("a CUDA driver is present")
    from jei_edge.compile import BuildOptions, build_bundle

    os.environ.setdefault("JEI_EDGE_ENGINE_CACHE", str(tmp_path / "cache"))
    ckpt = save_spread(tmp_path / "resnet.pt", "resnet")
    path = tmp_path / "rtx.jei"
    build_bundle(ckpt, path, BuildOptions(target="rtx-ada", parity_samples=300, stage_samples=64))
    r = _cli("selftest", str(path), "--repeats", "1", "--samples", "64")
    assert r.returncode == 0, r.stderr
    assert "tensorrt_rtx NOT RUN" in r.stdout and "compute capability 8.9" in r.stdout
    assert "NOT RUN here: tensorrt_rtx" in r.stdout and "PASSED on onnxruntime" in r.stdout


def test_unwritable_report_path_is_one_line(vit_bundle, tmp_path):
    r = _cli("selftest", str(vit_bundle), "--repeats", "1", "--samples", "32", "-o", str(tmp_path / "no" / "x.json"))
    assert r.returncode == 2 and "cannot write the report" in r.stderr and "Traceback" not in r.stderr


def test_settings_comparison_finds_the_faster_value(vit_bundle):
    """The board-side settings check (mapped_io / graphs on CUDA) measured with onnxruntime here: a
    runtime made 2 ms per stage slower for one value must be named the slower one, whatever the
    machine's noise; the advice says to change a target setting only when it is the slower one."""
    import time

    from jei_edge.profile.selftest import compare_settings
    from jei_edge.runtime import Runtime

    def load(io_binding):
        rt = Runtime.load(vit_bundle, io_binding=io_binding)
        if not io_binding:  # the slow value, by construction
            inner = rt.executor.execute

            def slow(k, n, ws):
                time.sleep(0.002)
                inner(k, n, ws)

            rt.executor.execute = slow
        return rt

    from tests.runtime.helpers import model_inputs

    x = model_inputs(64, seed=0)
    got = compare_settings(load, "io_binding", (True, False), x, (1, 16), repeats=2, current=False)
    assert got["faster"] is True and got["values"] == [True, False] and got["current"] is False
    assert set(got["batches"]) == {1, 16}
    for e in got["batches"].values():
        assert e["ratio"] > 1.03 and e["ms_per_sample"]["False"] > e["ms_per_sample"]["True"] > 0
    assert "io_binding = true is faster here than the target's false" in got["advice"]
    same = compare_settings(load, "io_binding", (True, False), x, (16,), repeats=2, current=True)
    assert same["faster"] is True and "(the target's setting) is the faster one" in same["advice"]
