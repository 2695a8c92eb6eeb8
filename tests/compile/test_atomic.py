"""A failing or killed build leaves no bundle; the next build cleans up what a killed one left."""

import copy
import os
import signal
import subprocess
import sys
import time

import pytest

from jei_edge.compile import BuildOptions, build_bundle
from jei_edge.compile import export as export_mod
from jei_edge.errors import BuildError
from tests.runtime.helpers import save_spread

FAST = dict(parity_samples=300, stage_samples=64)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_parity_failure_names_stage_and_tensor_and_leaves_nothing(tmp_path, monkeypatch):
    ckpt = save_spread(tmp_path / "m.pt", "vit")
    orig = export_mod.export_stages

    def perturbed(model, plans, out_dir, example, opset, **kw):
        bad = copy.deepcopy(model)
        bad.gates[1].linear.bias.data += 0.5  # stage 1's exported gate no longer matches PyTorch
        return orig(bad, plans, out_dir, example, opset, **kw)

    monkeypatch.setattr(export_mod, "export_stages", perturbed)
    out = tmp_path / "m.jei"
    with pytest.raises(BuildError, match=r"stage 1 tensor 'gate'"):
        build_bundle(ckpt, out, BuildOptions(**FAST))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_tolerance_injection_fails_the_build(tmp_path):
    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    with pytest.raises(BuildError, match="parity failed: stage 0 tensor"):
        build_bundle(ckpt, tmp_path / "m.jei", BuildOptions(tolerance=0.0, **FAST))
    assert not (tmp_path / "m.jei").exists() and _leftovers(tmp_path) == []


def test_sigkill_mid_build_leaves_no_bundle_and_next_build_cleans_up(tmp_path):
    ckpt = save_spread(tmp_path / "m.pt", "vit")
    out = tmp_path / "m.jei"
    code = ("import sys; from jei_edge.compile import BuildOptions, build_bundle; "
            f"build_bundle({str(ckpt)!r}, {str(out)!r}, BuildOptions(parity_samples=150_000, stage_samples=64))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the staging dir holds exported stages (mid-build)
            staging = [p for p in tmp_path.iterdir() if p.name.startswith(".m.jei.building-")]
            if staging and (staging[0] / "plain.onnx").exists():
                break
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the build never exported its graphs")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert len(_leftovers(tmp_path)) == 1  # the dead build's staging dir (hidden), never the bundle
    build_bundle(ckpt, out, BuildOptions(**FAST))
    assert (out / "manifest.json").is_file() and _leftovers(tmp_path) == []
