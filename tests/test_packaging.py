"""Packaging promises: the wheel installs in a fresh environment with its data files and entry
points; `import jei_edge` stays light."""

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light():
    code = ("import sys, jei_edge, jei_edge.exit_rule, jei_edge.errors; "
            "bad = [m for m in ('torch', 'tensorrt', 'tensorrt_rtx', 'onnx') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("jei_edge-*.whl")
    return whl


def test_wheel_contains_package_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "jei_edge/runtime/cuda/exit_kernel.cu" in names or not (ROOT / "jei_edge/runtime/cuda/exit_kernel.cu").exists()
    for data in list((ROOT / "targets").glob("*.toml")) + list((ROOT / "calibration").glob("*.toml")):
        assert "jei_edge/" + data.relative_to(ROOT).as_posix() in names  # top-level folders, shipped in the package
    assert not any(n.startswith("tests/") for n in names)
    eps = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(eps[0]).decode()
    assert "jei-edge = jei_edge.cli:main" in text and "jei-edge-run = jei_edge.runtime.cli:main" in text


def test_wheel_installs_in_fresh_env(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # install the wheel (not editable) with its minimal runtime requirements
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(env_dir / "bin" / "jei-edge"), "--version"], capture_output=True, text=True,
                       cwd=tmp_path, env=clean, timeout=60)
    assert r.returncode == 0, r.stderr
    from jei_edge import __version__

    assert __version__ in r.stdout
    r = subprocess.run([str(py), "-c", "import jei_edge, pathlib; print(pathlib.Path(jei_edge.__file__).parent)"],
                       capture_output=True, text=True, cwd=tmp_path, env=clean)
    installed = Path(r.stdout.strip())
    assert installed.is_relative_to(env_dir), installed  # not the source tree
    # targets and calibration recipes are found by name in the installed package
    r = subprocess.run([str(py), "-c", "from jei_edge.runtime.targets import load_target; from jei_edge._data import "
                        "data_dir; t = load_target('cpu'); print(t.backend, t.source); "
                        "print(sorted(p.stem for p in data_dir('calibration').glob('*.toml')))"],
                       capture_output=True, text=True, cwd=tmp_path, env=clean)
    assert r.returncode == 0, r.stderr
    backend, source = r.stdout.splitlines()[0].split(" ", 1)
    assert backend == "onnxruntime" and Path(source).is_relative_to(env_dir)
    assert "default" in r.stdout.splitlines()[1]


def _python310():
    import shutil

    cands = sorted(str(p) for p in Path("/root/.pyenv/versions").glob("3.10*/bin/python3.10")) + [shutil.which("python3.10")]
    for c in cands:
        if c and subprocess.run([c, "--version"], capture_output=True).returncode == 0:
            return c
    return None


def test_runtime_sources_compile_on_python310():
    """The on-device runtime must run on Jetson's Python 3.10 (JetPack 6): byte-compile it there."""
    py310 = _python310()
    if py310 is None:
        pytest.skip("no Python 3.10 interpreter on this machine (vermin covers the check)")
    files = [str(p) for d in ("runtime", "bundle", "backends") for p in (ROOT / "jei_edge" / d).rglob("*.py")]
    files += [str(ROOT / "jei_edge" / f) for f in ("__init__.py", "errors.py", "exit_rule.py", "_deps.py", "_io.py")]
    r = subprocess.run([py310, "-m", "py_compile", *files], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_runtime_runs_on_python310(tmp_path):
    """Jetson's Python 3.10: a fresh 3.10 venv with only numpy + onnxruntime runs a bundle through
    `jei-edge-run` (needs a Python 3.10 interpreter and the package index)."""
    import json

    import numpy as np

    from tests.runtime.helpers import build_spread_bundle, model_inputs

    py310 = _python310()
    if py310 is None:
        pytest.skip("no Python 3.10 interpreter on this machine")
    env_dir = tmp_path / "v310"
    subprocess.run([py310, "-m", "venv", str(env_dir)], check=True)
    py = str(env_dir / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "numpy", "onnxruntime"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    bundle = build_spread_bundle(tmp_path, "vit")
    np.save(tmp_path / "x.npy", model_inputs(16))
    code = ("import sys, runpy; sys.argv = ['jei-edge-run'] + sys.argv[1:]; "
            "from jei_edge.runtime.cli import main; rc = main(); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    r = subprocess.run([py, "-c", code, str(bundle), str(tmp_path / "x.npy"), "--preprocessed", "--summary"],
                       capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 17 and lines[-1]["summary"]["samples"] == 16
