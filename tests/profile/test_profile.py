"""`jei-edge profile` and ``jei_edge.profile``: every figure present, consistent with the runtime, clear errors.

Numbers are not held to goals here (benchmarks/ does that); the tests check the figures'
definitions: reach counts equal the runtime's, the theoretical speedup follows from the exit
histogram and the MAC costs, throughput from the time per sample.
"""

import json

import numpy as np
import pytest

from jei_edge.cli import main as cli_main
from jei_edge.errors import InputError
from jei_edge.profile import Passes, format_profile, profile_bundle
from jei_edge.runtime import Runtime
from tests.runtime.helpers import model_inputs


def test_profile_figures_follow_their_definitions(bundle):
    rt = Runtime.load(bundle, max_batch=8)
    x = model_inputs(40, seed=21)
    y = np.arange(40) % 5
    info = profile_bundle(rt, x, y, batch_sizes=(1, 8), repeats=2)
    ex = info["exits"]
    ref = rt.run(x)
    assert ex["histogram"] == ref.exit_histogram(rt.num_exits) and sum(ex["histogram"]) == 40
    cost = np.asarray(ex["cost"])
    assert ex["mean_cost"] == pytest.approx(cost[ref.exit_index].mean())
    assert ex["theoretical_speedup"] == pytest.approx(1 / ex["mean_cost"])
    assert info["accuracy"]["exit"] == pytest.approx(np.mean(ref.pred == y))
    for bsz in (1, 8):
        b = info["batches"][str(bsz)]
        # reach counts are the runtime's own, batch by batch
        want = np.zeros(rt.bundle.num_stages, int)
        for i in range(0, 40, bsz):
            r = rt.run(x[i:i + bsz]).reach
            want[:len(r)] += r
        assert b["reach_total"] == want.tolist() and b["samples"] == 40
        assert len(b["stage_ms"]) == rt.bundle.num_stages and all(t > 0 for t in b["stage_ms"])
        assert b["throughput_exit"] == pytest.approx(1e3 / b["exit_ms_per_sample"])
        assert b["latency_ms_per_call"]["p50"] <= b["latency_ms_per_call"]["p99"] <= b["latency_ms_per_call"]["max"]
        for f in ("realized_speedup", "efficiency", "speedup_vs_plain"):
            assert 0.05 < b[f] < 20, (bsz, f, b[f])
            ci = b[f + "_ci"]  # the interval holds the median it qualifies
            assert ci["low"] <= b[f] <= ci["high"] and ci["median"] == pytest.approx(b[f])
    text = format_profile(info)
    assert "theoretical speedup" in text and "efficiency" in text and "reach@8" in text
    assert "confidence intervals of the medians" in text


def test_passes_refuse_too_few_samples(bundle):
    with pytest.raises(InputError, match="fewer than one batch of 64"):
        Passes.batches(model_inputs(10), 64)
    rt = Runtime.load(bundle, max_batch=4)
    with pytest.raises(InputError, match="no samples"):
        profile_bundle(rt, np.zeros((0, 1, 8, 8), np.float32))


def test_profile_command_writes_json_and_png(bundle, tmp_path, capsys):
    np.savez(tmp_path / "t.npz", x=np.random.default_rng(0).random((24, 1, 8, 8), dtype=np.float32),
             y=np.arange(24) % 5)
    out = tmp_path / "prof"
    rc = cli_main(["profile", str(bundle), str(tmp_path / "t.npz"), "-o", str(out), "--repeats", "1",
                   "--batch-sizes", "1,8", "--json"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    info = json.loads(stdout)
    assert set(info["batches"]) == {"1", "8"} and info["samples"] == 24 and "accuracy" in info
    assert json.loads((out / "profile.json").read_text())["exits"] == info["exits"]
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["profile.html", "profile.json", "profile.png"]  # no temp files
    rc = cli_main(["profile", str(bundle), str(tmp_path / "t.npz"), "-o", str(out), "--repeats", "1",
                   "--batch-sizes", "4", "--no-plot"])
    stdout, err = capsys.readouterr()
    assert rc == 0 and "stage latency" in stdout and "realized" in stdout, err


def test_profile_on_a_data_source(bundle, tmp_path, capsys):
    rc = cli_main(["profile", str(bundle), "--data", "synthetic:n=200,size=8", "-o", str(tmp_path / "p"),
                   "--repeats", "1", "--batch-sizes", "2", "--samples", "16", "--no-plot", "--json"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(stdout)["samples"] == 16


def test_profile_compares_settings_side_by_side(bundle, tmp_path, capsys):
    """--compare-settings: each setting's exit pass is timed in every repeat next to the profiled
    one; the JSON has its time, speedup and interval per batch size, the settings it ran with, and
    the fastest pick; the text and HTML say so. Exits do not depend on thread settings."""
    np.savez(tmp_path / "t.npz", x=np.random.default_rng(1).random((32, 1, 8, 8), dtype=np.float32))
    out = tmp_path / "prof"
    rc = cli_main(["profile", str(bundle), str(tmp_path / "t.npz"), "-o", str(out), "--repeats", "3",
                   "--batch-sizes", "1,8", "--no-plot", "--json", "--compare-settings", "row_workers=2",
                   "--compare-settings", "intra_op_threads=1,io_binding=false"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    info = json.loads(stdout)
    labels = ["row_workers=2", "intra_op_threads=1,io_binding=false"]
    assert list(info["compare_settings"]) == labels
    assert info["compare_settings"]["row_workers=2"]["row_workers"] == 2
    assert info["compare_settings"][labels[1]]["io_binding"] is False
    for bsz in ("1", "8"):
        b = info["batches"][bsz]
        for label in labels:
            c = b["compare"][label]
            assert c["same_exits"] is True and c["ms_per_sample"] > 0
            assert c["speedup_ci"]["low"] <= c["speedup"] <= c["speedup_ci"]["high"]
        best = info["best_settings"][bsz]
        assert best["label"] in ["current"] + labels
        if best["label"] != "current":
            assert b["compare"][best["label"]]["speedup_ci"]["low"] > 1
    html = (out / "profile.html").read_text()
    assert 'id="settings-table"' in html and "row_workers=2" in html
    rc = cli_main(["profile", str(bundle), str(tmp_path / "t.npz"), "-o", str(out), "--repeats", "1",
                   "--batch-sizes", "4", "--no-plot", "--compare-settings", "row_workers=2"])
    stdout, err = capsys.readouterr()
    assert rc == 0 and "other settings, timed side by side" in stdout and "fastest: batch 4" in stdout, err


def test_profile_text_names_the_fastest_settings_and_their_flags(bundle):
    """The text report turns the fastest compared settings into the flags that select them, and says
    when none is measurably faster."""
    rt = Runtime.load(bundle, max_batch=4)
    info = profile_bundle(rt, model_inputs(8, seed=3), batch_sizes=(1, 4), repeats=1,
                          compare={"row_workers=2,small_batch_rows=1": Runtime.load(bundle, max_batch=4,
                                                                                    row_workers=2, small_batch_rows=1)})
    ci = {"median": 1.3, "low": 1.2, "high": 1.4, "coverage": 0.96}
    info["batches"]["4"]["compare"]["row_workers=2,small_batch_rows=1"].update(speedup=1.3, speedup_ci=ci)
    info["best_settings"] = {"1": {"label": "current", "speedup": 1.0},
                             "4": {"label": "row_workers=2,small_batch_rows=1", "speedup": 1.3}}
    text = format_profile(info)
    assert "batch 1 current (no other is measurably faster)" in text
    assert "batch 4 row_workers=2,small_batch_rows=1 (1.30x)" in text
    assert "run with row_workers=2,small_batch_rows=1: --backend-opt row_workers=2 --backend-opt small_batch_rows=1" in text


@pytest.mark.parametrize("args,match", [
    ([], "either INPUTS or --data"),
    (["X", "--compare-settings", "threads=2"], "unknown onnxruntime option"),
    (["X", "--compare-settings", "row_workers=2,intra_op_threads=2"], "cannot be combined"),
    (["X", "--compare-settings", ","], "needs KEY=VALUE"),
    (["X", "--data", "digits"], "either INPUTS or --data"),
    (["X", "--batch-sizes", "0"], "batch-sizes must be integers >= 1"),
    (["X", "--batch-sizes", "a,b"], "comma-separated integers"),
    (["X", "--repeats", "0"], "--repeats must be >= 1"),
    (["X", "--batch-sizes", "64"], "fewer than the largest batch size 64"),
])
def test_profile_command_errors(bundle, tmp_path, capsys, args, match):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32))
    args = [str(tmp_path / "a.npy") if a == "X" else a for a in args]
    rc = cli_main(["profile", str(bundle), *args, "-o", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert rc != 0 and match in err, err
    assert not (tmp_path / "out").exists()


def test_profile_of_a_missing_bundle(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.zeros((4, 1, 8, 8), np.float32))
    rc = cli_main(["profile", str(tmp_path / "nope.jei"), str(tmp_path / "a.npy")])
    _, err = capsys.readouterr()
    assert rc != 0 and "nope.jei" in err
