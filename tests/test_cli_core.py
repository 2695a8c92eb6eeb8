"""CLI skeleton: --version, --help, inspect of a checkpoint, one-line errors without traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch

from jei_edge import __version__
from jei_edge.model import build_model, save_checkpoint

ENV = dict(os.environ, PYTHONPATH=os.getcwd())


def jei(*args, **kw):
    return subprocess.run([sys.executable, "-m", "jei_edge.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=120, **kw)


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory):
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("m") / "model.pt"
    save_checkpoint(p, build_model({"backbone": "resnet", "backbone_kwargs": {"img_size": 8, "widths": [8, 16], "blocks_per_stage": [1, 1]}}))
    return p


def test_version_and_help():
    r = jei("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = jei("--help")
    assert r.returncode == 0
    for cmd in ("train", "eval", "build", "run", "inspect"):
        assert cmd in r.stdout


def test_help_does_not_import_torch():
    code = "import sys; from jei_edge.cli import main; main(['--help']); assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr


def test_inspect_checkpoint_text_and_json(model_pt):
    r = jei("inspect", str(model_pt))
    assert r.returncode == 0, r.stderr
    assert "resnet" in r.stdout and "final head" in r.stdout
    r = jei("inspect", str(model_pt), "--json")
    info = json.loads(r.stdout)
    assert info["backbone"] == "resnet" and info["blocks"] == 2
    assert [e["kind"] for e in info["exits"]] == ["im+gate", "final head"]
    assert info["exits"][-1]["cost"] == 1.0
    assert 0 < info["exits"][0]["cost"] < 1


def test_bad_checkpoint_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04garbage")
    r = jei("inspect", str(bad))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: checkpoint") and str(bad) in r.stderr


def test_plugin_flag_trusts_a_backbone(tmp_path):
    from jei_edge.cli import PLUGIN_ENV as CLI_ENV
    from jei_edge.model.backbone import PLUGIN_ENV

    assert CLI_ENV == PLUGIN_ENV
    spec = "tests.model.plugin_backbone:tiny_mlp"
    code = ("import os, torch; os.environ['JEI_EDGE_PLUGINS'] = %r; from jei_edge.model import build_model, save_checkpoint; "
            "save_checkpoint(%r, build_model({'backbone': %r, 'backbone_kwargs': {'depth': 3}}))") % (spec, str(tmp_path / "p.pt"), spec)
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=120)
    env = {k: v for k, v in ENV.items() if k != "JEI_EDGE_PLUGINS"}
    r = subprocess.run([sys.executable, "-m", "jei_edge.cli", "inspect", str(tmp_path / "p.pt")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "not trusted" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "jei_edge.cli", "--plugin", spec, "inspect", str(tmp_path / "p.pt"), "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["family"] == "mlp"
