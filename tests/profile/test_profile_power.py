"""`jei-edge profile --power` end to end with a fake `tegrastats` on PATH (a test double: the
sampler's process handling and the energy arithmetic, not a measurement of any board), and the
HTML page beside the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.profile.test_power import FAKE_TEGRASTATS, ORIN_NANO_LINE, _executable

ROOT = Path(__file__).resolve().parents[2]


def _profile(bundle, tmp_path, env, *extra):
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = "import sys\nsys.modules['jtop'] = None\nfrom jei_edge.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "profile", str(bundle), str(tmp_path / "x.npy"), "--preprocessed",
                           "--batch-sizes", "1,8", "--repeats", "1", "--no-plot", "-o", str(tmp_path / "prof"),
                           "--json", *extra],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300)


def test_power_off_a_jetson_says_so_and_the_profile_still_runs(vit_bundle, tmp_path):
    r = _profile(vit_bundle, tmp_path, {"PATH": "/usr/bin:/bin"}, "--power")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["energy"] == {"available": False, "reason": info["energy"]["reason"]}
    assert "tegrastats" in info["energy"]["reason"]
    html = (tmp_path / "prof" / "profile.html").read_text()
    assert 'id="key-numbers-table"' in html and 'id="energy-table"' not in html  # no energy measured
    assert info["files"]["html"].endswith("profile.html")


def test_power_with_a_fake_tegrastats(vit_bundle, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "tegrastats", FAKE_TEGRASTATS.format(python=sys.executable))
    busy = ORIN_NANO_LINE.replace("VDD_IN 4970mW/4970mW", "VDD_IN 7000mW/5000mW")
    (tmp_path / "lines.txt").write_text("\n".join([ORIN_NANO_LINE, busy]) + "\n")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_TEGRA_LINES": str(tmp_path / "lines.txt"),
           "FAKE_TEGRA_ARGS": str(tmp_path / "args.txt"), "FAKE_TEGRA_MODE": "normal"}
    r = _profile(vit_bundle, tmp_path, env, "--power", "--power-seconds", "0.3")
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout)["energy"]
    assert e["available"] and e["source"] == "tegrastats" and "carrier board" in e["note"]
    for bsz in ("1", "8"):
        for mode in ("exit", "full", "plain"):
            m = e["batches"][bsz][mode]
            assert m["power_samples"] > 0 and 4900 <= m["mean_mw"] <= 7100 and np.isfinite(m["mj_per_inference"])
    assert "--interval 50" in (tmp_path / "args.txt").read_text()
    html = (tmp_path / "prof" / "profile.html").read_text()
    assert 'id="energy-table"' in html and "mJ per inference" in html
