"""Realized early-exit speedup of the CUDA runtime (torch-cuda backend + fused exit kernel).

Measures, on one GPU, for batch sizes 1, 64 and 256 (times per batch; the package's timing
protocol, ``jei_edge.profile.interleaved``: medians over repeats, ratios per repeat, every clock
reading after a device synchronise):

- ``exit`` and ``full`` mode of ``Runtime.load(bundle, device="cuda")`` (copy-in, stages, exit
  kernels, copy-out: everything ``Runtime.run`` does), with CUDA graphs (default) and eagerly;
- the plain backbone (no IMs, no gates: the model as one stage) run by the same torch-cuda backend
  (``jei_edge.backends.torch_cuda.from_model``: same settings, TF32 off, CUDA graphs per bucket,
  pinned copy-in and copy-out, the same loop);
- the ideal exit time ``sum_k t_k(n_k)`` (docs/architecture.md): the exit pass's stage runs back to back
  (``Passes.ideal_pass``) and the sum of per-stage medians (stage k alone on n rows, completion
  included), and realized/ideal efficiency;
- the exit kernel alone per boundary (CUDA events; microseconds) and the achieved bandwidth of its
  compaction copy; the host sync cost per boundary (launch -> survivor count on the host, stream
  idle, minus the kernel's own time);
- pipeline throughput with several lanes (streams) vs one.

Usage (a bundle built with its model.pt; the benchmark model is trained by ``prepare``)::

    python benchmarks/cuda_speedup.py prepare --out runs/cuda_bench          # CPU: model + build + offsets
    python benchmarks/cuda_speedup.py run --bundle runs/cuda_bench/model.jei \\
        --out benchmarks/results/cuda_speedup.json                             # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realized_speedup as cpu_bench  # noqa: E402  (one home for the benchmark models and offsets)

# The CPU benchmark's ViT (benchmarks/realized_speedup.py MODELS["vit"]): 65 tokens x 160 dims,
# 7 blocks, 6 gated exits, trained so that its own gates spread exits over >= 3 exits.
DATA = cpu_bench.DATA


def spread_offsets(model_path: Path) -> list:
    """Deploy-time threshold offsets, only when the trained operating point is degenerate (the CPU
    benchmark's function, so both benchmarks share it); zeros otherwise."""
    return [float(v) for v in cpu_bench.spread_offsets(model_path)]


# -- prepare (CPU) ---------------------------------------------------------------------------------
def prepare(out: Path, model: Path = None, work: Path = Path("runs/bench")) -> None:
    """Copy ``model`` (default: the CPU benchmark's ViT in ``work``, trained if missing), build the
    bundle with its model.pt, record the offsets (zeros unless the exits are degenerate)."""
    import shutil

    import torch

    from jei_edge.compile.build import BuildOptions, build_bundle
    from jei_edge.data import load_data
    from jei_edge.exit_rule import exit_levels
    from jei_edge.model.checkpoint import load_checkpoint
    from jei_edge.model.jei import exit_decisions

    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / "model.pt"
    if model is None:
        work.mkdir(parents=True, exist_ok=True)
        model = cpu_bench.ensure_model("vit", work, lambda msg: print(msg, flush=True))
    shutil.copyfile(model, dst)
    build_bundle(dst, out / "model.jei", BuildOptions(parity_samples=2000, force=True))
    offsets = spread_offsets(dst)
    net, ck = load_checkpoint(dst)
    rec = ck["training"]["data"]
    d = load_data(rec["source"], preprocessing=ck["preprocessing"], seed=rec.get("split_seed", 0))
    dec = exit_decisions(net, d.test.x)  # the torch model's gates and exit levels at offsets 0
    g = dec.gates
    hist = np.bincount(exit_levels(g, offsets), minlength=g.shape[1] + 1).tolist()
    info = {"offsets": offsets, "data": rec["source"], "test_exit_histogram": hist,
            "trained_test_exit_histogram": np.bincount(dec.levels, minlength=g.shape[1] + 1).tolist()}
    (out / "offsets.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    if sum(h >= 0.05 * len(g) for h in hist) < 3:
        raise SystemExit("the benchmark model's exits are degenerate even with offsets")
    print(f"bundle: {out / 'model.jei'}")


# -- measurement (GPU) -----------------------------------------------------------------------------
def plain_backbone(model, max_batch: int, graphs: bool):
    """The plain backbone on the GPU through the package's torch-cuda backend: the model as one
    stage (a JEIModel without exits sharing its weights), ``from_model``'s executor and workspace
    (pinned copy-in and copy-out, CUDA graphs per bucket), run by the package's loop. Returns
    ``(run(batch), close())``."""
    from jei_edge.backends.torch_cuda import from_model
    from jei_edge.model.jei import JEIModel
    from jei_edge.runtime.loop import run_conditional

    ex, ws = from_model(JEIModel(model.spec, exits=[], config=model.config), max_batch, graphs=graphs)

    def close():
        ex.release(ws)
        ws.close()
        ex.close()

    return (lambda b: run_conditional(ex, ws, b)), close


def kernel_timing(rt, x, offsets=None, repeats=200):
    """Exit kernel per boundary (CUDA events), compaction bandwidth, host sync round trip."""
    from jei_edge.profile import median_time
    from jei_edge.runtime.cuda.kernel import MODE_EXIT, MODE_NONE_EXIT

    ex, ws, d = rt.executor, rt.workspace, rt.workspace.driver
    e0, e1 = d.event_create(timing=True), d.event_create(timing=True)
    out = []
    n0 = min(len(x), ws.max_batch)
    ws.begin(x[:n0])
    n = n0
    for k in range(ex.num_stages - 1):
        delta = 0.0 if offsets is None else float(offsets[k])
        ex.execute(k, n, ws)
        ws.synchronize()
        row_bytes = ws.stages[k].hidden.row_bytes
        rec = {"stage": k, "rows": n, "row_bytes": row_bytes}
        for label, mode in (("exit_rule", MODE_EXIT), ("all_survive", MODE_NONE_EXIT)):
            d.event_record(e0, ws.stream)
            for _ in range(repeats):
                ws._launch(k, n, mode, delta)
            d.event_record(e1, ws.stream)
            d.event_synchronize(e1)
            us = d.event_elapsed_ms(e0, e1) * 1000 / repeats
            rec[f"{label}_us"] = round(us, 2)
            if mode == MODE_NONE_EXIT:  # every hidden row read once and written once
                moved = 2 * n * row_bytes + n * (4 + 4 + 4 + 8 + 8)  # hidden, gate, idx in/out, S in/out
                rec["compaction_bytes"] = moved
                rec["compaction_GBps"] = round(moved / (us * 1e-6) / 1e9, 1)
        # host sync round trip on an idle stream: launch -> event -> host reads the count
        rt_s = median_time(lambda: ws.exit_and_compact(k, n, delta, True), 50, sync=ws.synchronize)
        rec["host_round_trip_us"] = round(rt_s * 1e6, 2)
        rec["host_sync_cost_us"] = round(rt_s * 1e6 - rec["exit_rule_us"], 2)
        out.append(rec)
        n = ws.exit_and_compact(k, n, delta, True)
        if n == 0:
            break
    ws.finish(ex.num_stages - 1, 0)
    ws.synchronize()
    d.event_destroy(e0)
    d.event_destroy(e1)
    return out


def time_batches(rt, plain, xb, offsets, repeats: int) -> dict:
    """The package's protocol on the batches ``xb``: per batch, in ms (see the module docstring)."""
    from jei_edge.profile import Passes, interleaved, median, median_ratio

    p = Passes(rt, plain=plain)
    reaches = p.reaches(xb, offsets)
    pairs = sorted({(k, n) for r in reaches for k, n in enumerate(r)})
    stage_t = {q: [] for q in pairs}

    def stage_runs(i):  # standalone t_k(n) (completion included), interleaved with the repeats
        p.prime(xb[0])
        for k, n in pairs:
            stage_t[(k, n)].append(p.stage_time(k, n))

    t = interleaved([p], xb, [reaches], repeats, offsets, each_repeat=stage_runs)[0]
    tk = {q: median(v) for q, v in stage_t.items()}
    nb = len(xb)
    ms = {m: 1e3 * median(t[m]) / nb for m in ("exit", "full", "plain", "ideal")}
    ideal_medians = 1e3 * sum(tk[(k, n)] for r in reaches for k, n in enumerate(r)) / nb
    return {
        "exit_ms": round(ms["exit"], 4), "full_ms": round(ms["full"], 4), "plain_ms": round(ms["plain"], 4),
        "ideal_exit_ms": round(ms["ideal"], 4), "ideal_from_stage_medians_ms": round(ideal_medians, 4),
        "speedup_exit_vs_full": round(median_ratio(t["full"], t["exit"]), 3),
        "speedup_exit_vs_plain": round(median_ratio(t["plain"], t["exit"]), 3),
        "efficiency_realized_over_ideal": round(median_ratio(t["ideal"], t["exit"]), 3),
        "efficiency_vs_stage_medians": round(ideal_medians / ms["exit"], 3),
        "mean_reach": [round(v / nb, 2) for v in p.reach_total(reaches)],
    }


def bench(bundle: Path, data: str, out: Path, repeats: int, batch_sizes, samples: int, lanes: int,
          offsets=None) -> dict:
    import torch

    from jei_edge.backends import get_backend
    from jei_edge.bundle import Bundle
    from jei_edge.data import load_data
    from jei_edge.model.checkpoint import load_checkpoint
    from jei_edge.profile import Passes, median_time
    from jei_edge.runtime import Runtime

    man = Bundle.read_manifest(bundle)
    ds = load_data(data, preprocessing=man.preprocessing.to_dict(), seed=0)
    reps = -(-samples // len(ds.test.x))
    x = np.concatenate([ds.test.x] * reps)[:samples].astype(np.float32)
    y = np.concatenate([ds.test.y] * reps)[:samples]
    offsets = tuple(float(v) for v in offsets) if offsets else None
    max_b = max(batch_sizes)
    rt = Runtime.load(bundle, device="cuda", max_batch=max_b)
    rt_eager = Runtime.load(bundle, device="cuda", max_batch=max_b, graphs=False)
    ex, ws = rt.executor, rt.workspace
    drv = ws.driver
    model, _ = load_checkpoint(Path(bundle) / "model.pt")
    plain = {label: plain_backbone(model, max_b, graphs=label == "graphs") for label in ("graphs", "eager")}

    full_res = rt.run(x, "exit", offsets)
    hist = full_res.exit_histogram(rt.num_exits)
    cost = np.asarray(man.exits.cost)[full_res.exit_index]
    cost_plain = np.asarray(man.exits.cost_vs_plain)[full_res.exit_index]
    try:
        with Runtime.load(bundle, device="cpu", max_batch=max_b) as cpu_rt:
            cpu_res = cpu_rt.run(x, "exit", offsets)
        parity = {"same_exit_index": float((cpu_res.exit_index == full_res.exit_index).mean()),
                  "same_class": float((cpu_res.pred == full_res.pred).mean()),
                  "max_abs_prob_diff": float(np.abs(cpu_res.probs - full_res.probs).max())}
    except Exception as exc:  # e.g. an onnxruntime too old for the bundle: report, keep measuring
        parity = {"error": str(exc)[:300]}
    result = {
        "gpu": drv.name, "compute_capability": list(drv.compute_capability),
        "torch": torch.__version__, "cuda_torch": torch.version.cuda, "python": platform.python_version(),
        "nvrtc": list(ws.kernel.compiled.nvrtc_version), "kernel_image": ws.kernel.compiled.kind,
        "command": " ".join(sys.argv), "bundle": str(bundle), "data": data, "samples": int(len(x)),
        "backbone": dict(man.backbone), "stages": ex.num_stages, "repeats": repeats,
        "offsets": list(offsets) if offsets else None,
        "exit_histogram": hist, "exit_fractions": [round(h / len(x), 3) for h in hist],
        "accuracy_exit": round(float((full_res.pred == y).mean()), 4),
        "expected_cost_vs_full": round(float(cost.mean()), 4), "expected_cost_vs_plain": round(float(cost_plain.mean()), 4),
        "theoretical_speedup_vs_full": round(float(1 / cost.mean()), 3),
        "theoretical_speedup_vs_plain": round(float(1 / cost_plain.mean()), 3),
        "parity_vs_cpu_runtime": parity,
        "batches": {},
    }
    result["exit_kernel"] = kernel_timing(rt, x, offsets)
    print("exit kernel:", json.dumps(result["exit_kernel"]), flush=True)
    _save(out, result)
    for B in batch_sizes:
        xb = Passes.batches(x, B)
        if B == 1:
            xb = xb[:64]
        row = {"batches_timed": len(xb)}
        for label, runtime in (("graphs", rt), ("eager", rt_eager)):
            row[label] = time_batches(runtime, plain[label][0], xb, offsets, repeats)
        result["batches"][str(B)] = row
        print(f"batch {B}: {json.dumps(row)}", flush=True)
        _save(out, result)  # partial results survive a time limit

    tp = {}
    torch_cuda = get_backend("torch-cuda")
    for mb in (64, max_b):
        for L in (1, lanes):
            pipe = torch_cuda.pipeline(rt.bundle, max_batch=mb, lanes=L)
            t = median_time(lambda: pipe.run(x, "exit", offsets), repeats)
            tp[f"micro_batch{mb}_lanes{L}_samples_per_s"] = round(len(x) / t, 1)
            pipe.close()
    result["pipeline"] = tp
    print("pipeline:", json.dumps(tp), flush=True)
    _save(out, result)
    for _, close in plain.values():
        close()
    rt_eager.close()
    rt.close()
    return result


def _save(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="train the benchmark model and build its bundle (CPU)")
    p.add_argument("--out", type=Path, default=Path("runs/cuda_bench"))
    p.add_argument("--model", type=Path, default=None,
                   help="use this checkpoint (default: the CPU benchmark's ViT in --work, trained if missing)")
    p.add_argument("--work", type=Path, default=Path("runs/bench"))
    r = sub.add_parser("run", help="measure on the GPU")
    r.add_argument("--bundle", type=Path, default=Path("runs/cuda_bench/model.jei"))
    r.add_argument("--data", default=DATA)
    r.add_argument("--out", type=Path, default=Path("benchmarks/results/cuda_speedup.json"))
    r.add_argument("--repeats", type=int, default=7)
    r.add_argument("--batches", default="1,64,256")
    r.add_argument("--samples", type=int, default=1024)
    r.add_argument("--lanes", type=int, default=2)
    r.add_argument("--offsets", type=Path, default=Path("runs/cuda_bench/offsets.json"),
                   help="JSON with 'offsets' written by prepare (missing file: the trained operating point)")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.out, a.model, a.work)
    else:
        offsets = json.loads(a.offsets.read_text())["offsets"] if a.offsets.is_file() else None
        bench(a.bundle, a.data, a.out, a.repeats, [int(b) for b in a.batches.split(",")], a.samples, a.lanes, offsets)
    return 0


if __name__ == "__main__":
    from jei_edge.errors import JeiEdgeError

    try:
        sys.exit(main())
    except JeiEdgeError as exc:  # no GPU, no driver, a bad bundle: one line, not a traceback
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
