"""The on-device runtime needs numpy + onnxruntime only, and stays Python-3.10 compatible."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCKER = """
import sys
class Blocker:
    BLOCKED = ("torch", "onnx", "tensorrt", "tensorrt_rtx", "onnxscript")
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, Blocker())
"""


def _run(code: str, *args):
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def test_import_runtime_without_torch_or_onnx():
    proc = _run("import jei_edge.runtime, jei_edge.runtime.cli, jei_edge.runtime.inspect, jei_edge.runtime.inputs\n"
                "import jei_edge.bundle, jei_edge.backends, jei_edge.backends.onnxruntime, jei_edge.backends.onnxruntime.executor\n"
                "import jei_edge.backends.torch_cuda, jei_edge.backends.torch_cuda.executor, jei_edge.runtime.cuda.backend\n"
                "import jei_edge.backends.tensorrt.builder, jei_edge.backends.tensorrt.toolchain\n"
                "import jei_edge.profile, jei_edge.profile.report\n"
                "bad = [m for m in sys.modules if m.split('.')[0] in Blocker.BLOCKED]\n"
                "assert not bad, bad\nprint('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_load_run_and_standalone_cli_without_torch_or_onnx(vit_bundle, tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32))
    code = ("import numpy as np\nfrom jei_edge.runtime import Runtime\nfrom jei_edge.runtime.cli import main\n"
            "rt = Runtime.load(sys.argv[1])\nres = rt.run(np.zeros((4, 1, 8, 8), np.float32))\n"
            "assert res.probs.shape == (4, 5)\n"
            "from jei_edge.runtime.inspect import describe_bundle\nassert describe_bundle(sys.argv[1])['integrity']['ok']\n"
            "rc = main([sys.argv[1], sys.argv[2]])\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in Blocker.BLOCKED]\n"
            "assert not bad, bad\nsys.exit(rc)")
    proc = _run(code, vit_bundle, tmp_path / "a.npy")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 5


def test_runtime_is_python_310_compatible():
    vermin = Path(sys.executable).parent / "vermin"
    if not vermin.exists() and shutil.which("vermin") is None:
        pytest.skip("vermin is not installed (pip install vermin)")
    exe = str(vermin) if vermin.exists() else "vermin"
    proc = subprocess.run([exe, "-t=3.10-", "--no-tips", "--violations", "jei_edge/runtime", "jei_edge/profile",
                           "jei_edge/bundle", "jei_edge/backends", "jei_edge/_data.py", "jei_edge/_deps.py"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
