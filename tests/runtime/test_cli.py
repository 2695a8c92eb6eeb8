"""`jei-edge run`, `jei-edge build`, `jei-edge inspect` and `jei-edge-run`: output and error paths."""

import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jei_edge.cli import main as cli_main
from jei_edge.runtime import Runtime
from jei_edge.runtime.cli import main as run_main
from tests.runtime.helpers import PREP_1CH, model_inputs, save_spread


def _raw(n, seed=0):
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def _cli(capsys, argv):
    rc = cli_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_run_table_and_json(vit_bundle, tmp_path, capsys):
    raw = _raw(30)
    np.save(tmp_path / "a.npy", raw)
    rc, out, err = _cli(capsys, ["run", str(vit_bundle), str(tmp_path / "a.npy"), "--show", "5"])
    assert rc == 0, err
    assert "a.npy[0]" in out and "exit histogram" in out and "25 more" in out and "conformal" in out
    rc, out, _ = _cli(capsys, ["run", str(vit_bundle), str(tmp_path / "a.npy"), "--json", "--alpha", "0.1"])
    doc = json.loads(out)
    rt = Runtime.load(vit_bundle)
    res = rt.run((raw - 0.5) / 0.25)  # the bundle's preprocessing, applied by the CLI
    assert [s["exit"] for s in doc["samples"]] == res.exit_index.tolist()
    assert [s["class"] for s in doc["samples"]] == res.pred.tolist()
    assert doc["summary"]["exit_histogram"] == res.exit_histogram(rt.num_exits)
    assert all(set(s) >= {"source", "label", "confidence", "set"} for s in doc["samples"])


def test_run_preprocessed_npz_offsets_full(vit_bundle, tmp_path, capsys):
    x = model_inputs(20, seed=3)
    y = np.arange(20) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    rc, out, _ = _cli(capsys, ["run", str(vit_bundle), str(tmp_path / "d.npz"), "--preprocessed", "--json",
                              "--offsets", "-10"])
    doc = json.loads(out)
    assert rc == 0 and all(s["exit"] == 0 for s in doc["samples"]) and "accuracy" in doc["summary"]
    rc, out, _ = _cli(capsys, ["run", str(vit_bundle), str(tmp_path / "d.npz"), "--preprocessed", "--json",
                              "--mode", "full"])
    doc = json.loads(out)
    assert {s["exit"] for s in doc["samples"]} == {3} and doc["summary"]["reach"] == [20] * 4


def test_run_image_folder_gives_labels(vit_bundle, tmp_path, capsys):
    from PIL import Image

    for c in ("c0", "c3"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            arr = (np.random.default_rng(i).random((12, 12)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    rc, out, err = _cli(capsys, ["run", str(vit_bundle), str(tmp_path / "imgs"), "--json"])
    assert rc == 0, err
    doc = json.loads(out)
    assert len(doc["samples"]) == 6 and [s["target"] for s in doc["samples"]] == [0] * 3 + [3] * 3


@pytest.mark.parametrize("arr,match", [
    (np.zeros((4, 1, 9, 9), np.float32), r"expects \[N, 1, 8, 8\]"),
    (np.zeros((4, 3, 8, 8), np.float32), "expect"),
    (np.full((2, 1, 8, 8), np.nan, np.float32), "NaN or infinite"),
    (np.zeros((0, 1, 8, 8), np.float32), "no samples"),
    (np.zeros((2, 1, 8, 8), np.int32), "dtype int32"),
    (np.full((2, 1, 8, 8), 3.0, np.float32), "outside the raw range"),
])
def test_run_bad_inputs_exit_cleanly(vit_bundle, tmp_path, capsys, arr, match):
    np.save(tmp_path / "bad.npy", arr)
    rc, out, err = _cli(capsys, ["run", str(vit_bundle), str(tmp_path / "bad.npy")])
    assert rc == 2 and out == ""
    assert err.startswith("error:") and "Traceback" not in err
    assert re.search(match, err), err


def test_run_bad_bundle_and_options(vit_bundle, tmp_path, capsys):
    np.save(tmp_path / "a.npy", _raw(2))
    broken = tmp_path / "broken.jei"
    shutil.copytree(vit_bundle, broken)
    (broken / "stages" / "stage0.onnx").write_bytes(b"garbage")
    for argv, match in [
        (["run", str(broken), str(tmp_path / "a.npy")], "integrity check"),
        (["run", str(tmp_path / "none.jei"), str(tmp_path / "a.npy")], "does not exist"),
        (["run", str(vit_bundle), str(tmp_path / "a.npy"), "--offsets", "1,2"], "one value per gated exit"),
        (["run", str(vit_bundle), str(tmp_path / "a.npy"), "--offsets", "x"], "comma-separated numbers"),
        (["run", str(vit_bundle), str(tmp_path / "a.npy"), "--alpha", "0.2"], "alpha 0.2 is not in the bundle"),
        (["run", str(vit_bundle), str(tmp_path / "missing.npy")], "does not exist"),
        (["run", str(vit_bundle), str(tmp_path / "a.npy"), "--batch-size", "0"], "batch-size"),
    ]:
        rc, out, err = _cli(capsys, argv)
        assert rc == 2 and match in err and "Traceback" not in err, (argv, err)


def test_inspect_bundle(vit_bundle, tmp_path, capsys):
    rc, out, _ = _cli(capsys, ["inspect", str(vit_bundle)])
    assert rc == 0 and "integrity: ok" in out and "stage" in out and "plain backbone" in out
    assert "stage 0's in-graph guard" in out
    rc, out, _ = _cli(capsys, ["inspect", str(vit_bundle), "--json"])
    info = json.loads(out)
    assert info["kind"] == "bundle" and info["integrity"]["ok"] and len(info["stages"]) == 4
    assert info["input_guard"] and [s["input_guard"] for s in info["stages"]] == [True, False, False, False]
    assert info["precision"] == "fp32" and info["target"]["name"] == "cpu"
    assert info["stages"][1]["inputs"][0]["name"] == "hidden_in" and info["toolchain"]["opset"] >= 17
    bad = tmp_path / "b.jei"
    shutil.copytree(vit_bundle, bad)
    (bad / "report.txt").write_text("changed")
    rc, out, _ = _cli(capsys, ["inspect", str(bad)])
    assert rc == 2 and "integrity: FAILED" in out and "report.txt" in out  # shown, then refused


def test_build_command(tmp_path, capsys):
    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    rc, out, err = _cli(capsys, ["build", str(ckpt), "-o", str(tmp_path / "m.jei"), "--parity-samples", "200"])
    assert rc == 0, err
    assert "built" in out and "parity ok" in out and (tmp_path / "m.jei" / "manifest.json").exists()
    rc, out, err = _cli(capsys, ["build", str(ckpt), "-o", str(tmp_path / "m.jei"), "--parity-samples", "200"])
    assert rc == 2 and "already exists" in err and "--force" in err
    rc, out, err = _cli(capsys, ["build", str(tmp_path / "nope.pt")])
    assert rc == 2 and "does not exist" in err and "Traceback" not in err
    rc, out, err = _cli(capsys, ["build", str(ckpt), "--precision", "fp16", "-o", str(tmp_path / "q.jei")])
    assert rc == 2 and "precision 'fp16'" in err and not (tmp_path / "q.jei").exists()
    rc, out, err = _cli(capsys, ["build", str(ckpt), "--precision", "int8", "-o", str(tmp_path / "q.jei")])
    assert rc == 2 and "INT8 needs calibration data" in err and "--data" in err and not (tmp_path / "q.jei").exists()


# -- jei-edge-run ---------------------------------------------------------------------------------
def test_standalone_files_one_json_line_per_sample(vit_bundle, tmp_path, capsys):
    np.save(tmp_path / "a.npy", _raw(7))
    np.save(tmp_path / "one.npy", _raw(1)[0])  # a single sample [C, H, W]
    rc = run_main([str(vit_bundle), str(tmp_path / "a.npy"), str(tmp_path / "one.npy"), "--alpha", "0.05",
                   "--probs", "--summary"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 9 and lines[-1]["summary"]["samples"] == 8
    assert lines[7]["source"] == "one.npy[0]" and len(lines[0]["probs"]) == 5 and "set" in lines[0]


def test_standalone_stdin_stream(vit_bundle, tmp_path):
    buf = io.BytesIO()
    for n in (3, 1, 4):
        np.save(buf, _raw(n, seed=n))
    proc = subprocess.run([sys.executable, "-m", "jei_edge.runtime.cli", str(vit_bundle), "-"], input=buf.getvalue(),
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["source"] for r in lines][:4] == ["stdin[0][0]", "stdin[0][1]", "stdin[0][2]", "stdin[1][0]"]
    rt = Runtime.load(vit_bundle)
    raw = np.concatenate([_raw(n, seed=n) for n in (3, 1, 4)])
    assert [r["exit"] for r in lines] == rt.run((raw - 0.5) / 0.25).exit_index.tolist()
    bad = subprocess.run([sys.executable, "-m", "jei_edge.runtime.cli", str(vit_bundle)], input=b"not numpy",
                         capture_output=True)
    assert bad.returncode == 2 and b"not in .npy format" in bad.stderr and b"Traceback" not in bad.stderr
    assert PREP_1CH["std"] == [0.25]


def test_backend_options_on_both_run_clis(vit_bundle, tmp_path, capsys):
    raw = _raw(12, seed=9)
    np.save(tmp_path / "a.npy", raw)
    ref = Runtime.load(vit_bundle).run((raw - 0.5) / 0.25)
    rc, out, err = _cli(capsys, ["run", str(vit_bundle), str(tmp_path / "a.npy"), "--json",
                                 "--backend-opt", "small_batch_rows=1", "--backend-opt", "io_binding=false"])
    assert rc == 0, err
    assert [s["exit"] for s in json.loads(out)["samples"]] == ref.exit_index.tolist()
    rc = run_main([str(vit_bundle), str(tmp_path / "a.npy"), "--backend-opt", "intra_op_threads=1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert [json.loads(line)["exit"] for line in out.splitlines()] == ref.exit_index.tolist()
    for bad, match in (("threads=2", "unknown onnxruntime option"), ("io_binding=maybe", "must be true/false"),
                       ("small_batch_rows", "not KEY=VALUE"), ("device=cuda", "not a backend setting")):
        rc = run_main([str(vit_bundle), str(tmp_path / "a.npy"), "--backend-opt", bad])
        out, err = capsys.readouterr()
        assert rc != 0 and match in err and out == "" and "Traceback" not in err, (bad, err)
        rc, out, err = _cli(capsys, ["run", str(vit_bundle), str(tmp_path / "a.npy"), "--backend-opt", bad])
        assert rc != 0 and match in err + out, (bad, err)
