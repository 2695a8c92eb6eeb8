"""The example plugin (examples/tiny_cnn_plugin.py) trains, builds and runs from its own folder
with --plugin after the subcommand; contract violations are one clear error naming the part."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from jei_edge.errors import JeiEdgeError
from jei_edge.model import BackboneSpec
from jei_edge.model.backbone import check_contract

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "tiny_cnn_plugin:tiny_cnn"
DATA = "synthetic:size=8,n=400,classes=4"


def _jei(cwd, *args):
    return subprocess.run([sys.executable, "-m", "jei_edge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_example_plugin_trains_builds_and_runs_from_its_folder(tmp_path):
    shutil.copy(ROOT / "examples" / "tiny_cnn_plugin.py", tmp_path)
    r = _jei(tmp_path, "train", "--backbone", PLUGIN, "--data", DATA, "--backbone-epochs", "1", "--im-epochs", "1",
             "--epochs", "1", "--min-steps", "10", "-o", "m.pt", "--plugin", PLUGIN)
    assert r.returncode == 0, r.stderr
    r = _jei(tmp_path, "build", "m.pt", "-o", "m.jei", "--parity-samples", "300", "--plugin", PLUGIN)
    assert r.returncode == 0, r.stderr
    r = _jei(tmp_path, "run", "m.jei", "--data", DATA, "--json")  # the bundle needs no plugin
    assert r.returncode == 0, r.stderr
    r = _jei(tmp_path, "build", "m.pt", "-o", "n.jei")  # untrusted: refused, never imported
    assert r.returncode != 0 and "not trusted" in r.stderr and "Traceback" not in r.stderr


def _spec(**over):
    width, n = 4, 3
    parts = dict(stem=nn.Conv2d(1, width, 3, padding=1), blocks=[nn.Conv2d(width, width, 3, padding=1)
                                                                 for _ in range(3)],
                 head=nn.Sequential(nn.Flatten(), nn.LazyLinear(n)),
                 make_im=lambda i: nn.Sequential(nn.Flatten(), nn.LazyLinear(n)), input_shape=(1, 8, 8),
                 num_classes=n)
    parts.update(over)
    return BackboneSpec(**parts)


class _Pair(nn.Module):
    def forward(self, h):
        return h, h


class _Squash(nn.Module):
    def forward(self, h):
        return h.mean()


def test_contract_violations_name_the_part():
    check_contract(_spec(), "ok")
    cases = [
        (dict(blocks=[nn.Identity(), _Pair(), nn.Identity()]), r"block 1 returned tuple, not one tensor"),
        (dict(blocks=[nn.Identity(), nn.Identity(), _Squash()]), r"block 2 returned shape \[\]"),
        (dict(make_im=lambda i: nn.Sequential(nn.Flatten(), nn.LazyLinear(5))),
         r"the IM after block 0 \(make_im\(0\)\) returned shape \[2, 5\], not logits \[2, 3\]"),
        (dict(head=nn.Identity()), r"the head returned shape \[2, 4, 8, 8\]"),
        (dict(stem=nn.Conv2d(3, 4, 3)), r"the stem failed on a \[2, 1, 8, 8\] input: RuntimeError"),
    ]
    for over, msg in cases:
        with pytest.raises(JeiEdgeError, match=msg):
            check_contract(_spec(**over), "bad")


def test_a_factory_that_raises_is_one_error(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("def factory(**kw):\n    raise RuntimeError('boom')\n")
    r = _jei(tmp_path, "train", "--backbone", "broken_plugin:factory", "--data", DATA, "-o", "m.pt",
             "--plugin", "broken_plugin:factory")
    assert r.returncode != 0 and "raised RuntimeError: boom" in r.stderr and "Traceback" not in r.stderr
