"""The realized-speedup benchmark's measurement keeps working (a tiny bundle, one repeat).

Numbers are not asserted against goals here (that is what the benchmark is for); the test checks
that the torch-free measurement child runs and reports every figure docs/architecture.md defines, with
internally consistent values.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.helpers import model_inputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("variant", ["small_batch_1", "row_workers_2_pool_1"])
def test_measurement_child_reports_every_figure(vit_bundle, tmp_path, variant):
    x = model_inputs(70, seed=11)
    np.savez(tmp_path / "test.npz", x=x, y=np.arange(len(x)) % 5)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "realized_speedup.py"), "--child", str(vit_bundle),
           str(tmp_path / "test.npz"), "--repeats", "2", "--n1", "6", "--n64", "64", "--batches", "1,64",
           "--variant", variant, "--offsets", "null"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["test_samples"] == 70 and sum(r["exit_histogram"]) == 70
    for key, rows in (("batch_1", 6), ("batch_64", 64)):
        b = r[key]
        assert b["samples"] == rows and b["reach_total"][0] == rows
        assert all(b[f] > 0 for f in ("exit_s", "full_s", "plain_s", "ideal_s", "ideal_from_stage_medians_s"))
        for f in ("efficiency", "realized_speedup", "speedup_vs_plain", "efficiency_vs_stage_medians",
                  "back_to_back_vs_stage_medians"):
            assert 0.05 < b[f] < 20, (key, f, b[f])
        # the reach counts shrink stage by stage: rows that exited stopped running
        assert all(a >= c for a, c in zip(b["reach_total"], b["reach_total"][1:]))
        # the hand-written loops ran (they decide exactly as the runtime, or the child fails) and
        # the MAC-theoretical speedup is the timed rows' mean exit cost
        assert 0.05 < b["speedup_vs_hand"] < 20 and b["hand_s"] > 0
        assert len(b["ratios_vs_hand"]) == len(b["ratios_efficiency"]) == 2  # one per repeat
        assert b["speedup_vs_hand"] == float(np.median(b["ratios_vs_hand"]))
        assert sum(b["timed_exit_histogram"]) == rows and b["theoretical_speedup_vs_plain"] > 0.3
        assert b["speedup_vs_plain_over_theory"] == b["speedup_vs_plain"] / b["theoretical_speedup_vs_plain"]


def test_exit_head_cost_benchmark(vit_bundle, tmp_path):
    """benchmarks/exit_head_cost.py cuts every gated stage at hidden_out and times both graphs."""
    np.savez(tmp_path / "t.npz", x=model_inputs(8, seed=14))
    out = tmp_path / "h.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "exit_head_cost.py"), str(vit_bundle), "--inputs",
           str(tmp_path / "t.npz"), "--batches", "1,8", "--repeats", "2", "--inner", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = json.loads(out.read_text())["bundles"][0]["stages"]
    assert [s["stage"] for s in stages] == list(range(len(stages))) and len(stages) >= 2
    for s in stages:
        assert s["head_nodes"] > 5 and s["batch_8"]["stage_us"] > 0 and s["batch_8"]["trunk_us"] > 0


def test_cuda_benchmark_shares_the_cpu_benchmark_models():
    """benchmarks/cuda_speedup.py imports (no GPU needed) and uses the CPU benchmark's data and ViT."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import cuda_speedup, realized_speedup; "
            "assert cuda_speedup.DATA == realized_speedup.DATA; assert 'torch' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_batch1_breakdown_times_every_piece(vit_bundle, tmp_path):
    np.savez(tmp_path / "t.npz", x=model_inputs(8, seed=12))
    out = tmp_path / "b.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "batch1_breakdown.py"), "--bundle", str(vit_bundle),
           "--inputs", str(tmp_path / "t.npz"), "--samples", "8", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["input_guard"] is True and r["count"]["run_total"] == 8 and r["count"]["stage_0"] == 8
    assert {"numpy_finite_check", "begin", "boundary", "collect"} <= set(r["median_us"])
    assert set(r["after_stage_run_us"]["np_empty_3"]) == {"cold", "warm"}


def test_two_bundle_comparison_child(vit_bundle, tmp_path):
    """benchmarks/compare_bundles.py (stage planning, INT8, settings): a bundle against itself agrees
    fully; B runs on A's settings with its own options over them."""
    x = model_inputs(16, seed=13)
    np.savez(tmp_path / "t.npz", x=x, y=np.arange(16) % 5)
    options = [{"allow_spinning": False, "io_binding": False}, {"allow_spinning": True}]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare_bundles.py"), str(vit_bundle), str(vit_bundle),
           str(tmp_path / "t.npz"), "4", "16", "1", "--options", json.dumps(options)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    sa, sb = r["a"]["settings"], r["b"]["settings"]
    assert (sa["allow_spinning"], sa["io_binding"]) == (False, False)
    assert sb == dict(sa, allow_spinning=True)  # A's settings (io_binding off too), B's option over them
    assert r["exit_agreement"] == 1.0 and r["prediction_agreement"] == 1.0 and r["samples"] == 16
    assert r["a"]["exit_histogram"] == r["b"]["exit_histogram"] and "accuracy" in r["a"]
    for mode in ("exit", "full", "plain"):
        assert 0.05 < r[f"b_speedup_over_a_{mode}"] < 20
    assert r["b_speedup_over_a_exit_ratios"] == [r["b_speedup_over_a_exit"]]  # one repeat
    assert r["exit_gain_over_plain_gain_ratios"] == [r["b_speedup_over_a_exit"] / r["b_speedup_over_a_plain"]]
    # the MAC-theoretical speedup: one over the timed rows' mean exit cost (manifest exits)
    from jei_edge.bundle import Bundle

    cost = np.asarray(Bundle.open(vit_bundle).manifest.exits.cost_vs_plain)
    hist = np.asarray(r["a"]["exit_histogram"])
    assert r["a"]["theoretical_speedup_vs_plain"] == pytest.approx(hist.sum() / (hist * cost[:len(hist)]).sum())
    assert r["a"]["speedup_vs_plain_over_theory"] == pytest.approx(
        r["a"]["speedup_vs_plain"] / r["a"]["theoretical_speedup_vs_plain"])


def test_settings_benchmark_sends_both_settings_and_renders(monkeypatch):
    """benchmarks/settings_speedup.py: the measurement process gets A's and B's settings
    (compare_bundles.child -> --options), and its table renders from a results dict."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compare_bundles
    import settings_speedup

    seen = {}

    def fake_run(cmd, **kwargs):  # a recorded child: what it was asked, a minimal answer
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0, stdout='{"ok": 1}\n', stderr="")

    monkeypatch.setattr(compare_bundles.subprocess, "run", fake_run)
    settings = ({"allow_spinning": False}, {"allow_spinning": True})
    assert compare_bundles.child("a.jei", "b.jei", "t.npz", 1, 4, 1, None, settings) == {"ok": 1}
    cmd = seen["cmd"]
    assert json.loads(cmd[cmd.index("--options") + 1]) == [{"allow_spinning": False}, {"allow_spinning": True}]

    side = {"speedup_vs_plain": 1.5, "speedup_vs_plain_over_theory": 0.8, "efficiency": 0.97}
    res = {"machine": {"cpu": "x"}, "command": "python benchmarks/settings_speedup.py", "load_before": [0, 0, 0],
           "load_after": [1, 1, 1], "settings": {"a": "allow_spinning=false", "b": "allow_spinning=true"},
           "families": {"vit": {"batch_1": {"b_speedup_over_a_exit": 1.46, "b_speedup_over_a_full": 1.43,
                                            "b_speedup_over_a_plain": 1.48, "a": side, "b": dict(side, efficiency=0.99),
                                            "b_speedup_over_a_exit_ci": {"median": 1.46, "low": 1.35, "high": 1.54,
                                                                         "coverage": 0.96}}}}}
    lines = settings_speedup.table(res)
    assert "A = `allow_spinning=false`, B = `allow_spinning=true`" in lines[2]
    assert lines[-1] == ("| vit | 1 | 1.46x [1.35-1.54] | 1.43x | 1.48x | 1.50x / 1.50x | 0.80 / 0.80 | "
                         "0.970 / 0.990 |")


def test_int8_benchmark_splits_the_gain_ratio(tmp_path):
    """benchmarks/int8_speedup.py: the gain ratio's parts (INT8's gain on the exit pass, in full
    mode and on the stage runs alone, ideal = efficiency x exit time, each over the plain graph's
    gain), and ``--render`` writing a results file's table again from its JSON."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import int8_speedup as b; "
            "m = {'a': {'efficiency': 0.9, 'exit_ms_per_sample': 2.0, 'full_ms_per_sample': 6.0, 'plain_ms_per_sample': 4.0}, "
            "'b': {'efficiency': 0.8, 'exit_ms_per_sample': 0.5, 'full_ms_per_sample': 2.0, 'plain_ms_per_sample': 1.0}}; "
            "p = b.gain_parts(m); print(round(p['exit'], 6), round(p['full'], 6), round(p['stage_runs'], 6))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(round(4.0 / 4, 6)), str(round(3.0 / 4, 6)), str(round(1.8 / 0.4 / 4, 6))]
    # --render: the table again from a results file alone (its bundles long gone), its build record kept
    side = {"exit_ms_per_sample": 2.0, "full_ms_per_sample": 6.0, "plain_ms_per_sample": 4.0, "efficiency": 0.9,
            "accuracy": 0.5, "exit_histogram": [3, 1], "speedup_vs_plain": 2.0, "theoretical_speedup_vs_plain": 2.5,
            "speedup_vs_plain_over_theory": 0.8}
    fast = dict(side, exit_ms_per_sample=0.5, full_ms_per_sample=2.0, plain_ms_per_sample=1.0, efficiency=0.8)
    batch = {"a": side, "b": fast, "exit_agreement": 1.0, "b_speedup_over_a_exit": 4.0, "b_speedup_over_a_full": 3.0,
             "b_speedup_over_a_plain": 4.0, "b_bundle": str(tmp_path / "gone.jei")}
    build = {"decision_agreement_vs_fp32_model": 0.99, "prediction_agreement_vs_fp32_model": 0.98, "parity_inputs": 100,
             "recipe": "default", "calibration_rows_per_stage": [8, 4], "edges": "fp32"}
    results = {"machine": "m", "command": "python benchmarks/int8_speedup.py --min-agreement 0.5", "load_before": [0],
               "load_after": [0], "families": {"toy": {"batch_1": batch, "build": build}},
               "limits": {"toy": {"repeats": 1, "processes": 1, "n1": 2, "n64": 2}}, "offsets": {"toy": None}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, "benchmarks/int8_speedup.py", "--render", str(path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = path.with_suffix(".md").read_text()
    assert "| toy | 1 | 4.00x | 3.00x | 4.00x |" in md and "| - | 1.00 / 0.75 / 1.12 |" in md, md
    assert "toy: build parity vs the FP32 PyTorch model on 100 inputs" in md
