"""Realized early-exit speedup of the CUDA runtime (torch-cuda executor + fused exit kernel).

Measures, on one GPU, for batch sizes 1, 64 and 256 (medians over repeats; times per batch):

- ``exit`` and ``full`` mode of ``Runtime.load(bundle, device="cuda")`` (copy-in, stages, exit
  kernels, copy-out: everything ``Runtime.run`` does), with CUDA graphs (default) and eagerly;
- the plain backbone (no IMs, no gates) run by PyTorch on the same GPU with the same settings
  (TF32 off, CUDA graphs per batch size, pinned copy-in and copy-out);
- the ideal exit time ``sum_k t_k(n_k)`` (DESIGN.md), ``t_k(n)`` = stage k alone on n rows with the
  same executor (median wall time incl. its completion), and realized/ideal efficiency;
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
import statistics
import sys
import time
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
    with torch.no_grad():
        g = torch.sigmoid(net(torch.from_numpy(d.test.x))[1]).numpy().astype(np.float64)
    hist = np.bincount(exit_levels(g, offsets), minlength=g.shape[1] + 1).tolist()
    info = {"offsets": offsets, "data": rec["source"], "test_exit_histogram": hist,
            "trained_test_exit_histogram": np.bincount(exit_levels(g), minlength=g.shape[1] + 1).tolist()}
    (out / "offsets.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    if sum(h >= 0.05 * len(g) for h in hist) < 3:
        raise SystemExit("the benchmark model's exits are degenerate even with offsets")
    print(f"bundle: {out / 'model.jei'}")


# -- timing helpers --------------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class PlainRunner:
    """The plain backbone on the GPU: pinned copy-in, CUDA graph per batch size, pinned copy-out."""

    def __init__(self, torch, model, batches, graphs: bool):
        self.torch = torch
        self.net = model.plain_backbone().eval()
        dev = torch.device("cuda")
        top = max(batches)
        self.stream = torch.cuda.Stream()
        self.x_pin = torch.zeros((top,) + tuple(model.input_shape), pin_memory=True)
        self.x_dev = torch.zeros_like(self.x_pin, device=dev)
        self.out_pin = torch.zeros((top, model.num_classes), pin_memory=True)
        self.graphs = {}
        with torch.no_grad(), torch.cuda.stream(self.stream):
            self.net(self.x_dev)
            if graphs:
                pool = torch.cuda.graph_pool_handle()
                for b in batches:
                    for _ in range(2):
                        self.net(self.x_dev[:b])
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, stream=self.stream):
                        out = self.net(self.x_dev[:b])
                    self.graphs[b] = (g, out)
        self.stream.synchronize()

    def run(self, x: np.ndarray) -> np.ndarray:
        torch, b = self.torch, len(x)
        self.x_pin[:b].numpy()[...] = x
        with torch.no_grad(), torch.cuda.stream(self.stream):
            self.x_dev[:b].copy_(self.x_pin[:b], non_blocking=True)
            if b in self.graphs:
                g, out = self.graphs[b]
                g.replay()
            else:
                out = self.net(self.x_dev[:b])
            self.out_pin[:b].copy_(out[:b], non_blocking=True)
        self.stream.synchronize()
        return self.out_pin[:b].numpy().copy()


def _batches(x, b):
    return [x[i:i + b] for i in range(0, len(x) - b + 1, b)]


def stage_table(ex, ws, needed, repeats):
    """t_k(n): stage k alone on n rows (wall time incl. completion), median of repeats."""
    table = {}
    for k, n in sorted(needed):
        def once(k=k, n=n):
            ex.execute(k, n, ws)
            ws.synchronize()
        table[(k, n)] = _median_time(once, repeats)
    return table


def kernel_timing(rt, x, offsets=None, repeats=200):
    """Exit kernel per boundary (events), compaction bandwidth, host sync round trip."""
    from jei_edge.runtime.cuda.kernel import MODE_EXIT, MODE_NONE_EXIT

    ex, ws, d = rt.executor, rt.workspace, rt.workspace.driver
    e0, e1 = d.event_create(timing=True), d.event_create(timing=True)
    out = []
    n0 = min(len(x), ws.max_batch)
    ws.begin(x[:n0])
    n = n0
    for k in range(ex.num_stages - 1):
        ex.execute(k, n, ws)
        ws.synchronize()
        row_bytes = int(np.prod(ws.stages[k].hidden_shape)) * 4
        rec = {"stage": k, "rows": n, "row_bytes": row_bytes}
        for label, mode in (("exit_rule", MODE_EXIT), ("all_survive", MODE_NONE_EXIT)):
            d.event_record(e0, ws.stream)
            delta = 0.0 if offsets is None else float(offsets[k])
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
        def trip(k=k, n=n):
            ws.exit_and_compact(k, n, 0.0 if offsets is None else float(offsets[k]), True)
        rt_s = _median_time(trip, 50)
        rec["host_round_trip_us"] = round(rt_s * 1e6, 2)
        rec["host_sync_cost_us"] = round(rt_s * 1e6 - rec["exit_rule_us"], 2)
        out.append(rec)
        n = ws.exit_and_compact(k, n, 0.0 if offsets is None else float(offsets[k]), True)
        if n == 0:
            break
    ws.finish(ex.num_stages - 1, 0)
    ws.synchronize()
    d.event_destroy(e0)
    d.event_destroy(e1)
    return out


def bench(bundle: Path, data: str, out: Path, repeats: int, batch_sizes, samples: int, lanes: int,
          offsets=None) -> dict:
    import torch

    from jei_edge.data import load_data
    from jei_edge.model.checkpoint import load_checkpoint
    from jei_edge.runtime import Runtime
    from jei_edge.runtime.cuda import make_pipeline
    from jei_edge.runtime.loop import run_conditional

    pre = json.loads((Path(bundle) / "manifest.json").read_text())["preprocessing"]
    ds = load_data(data, preprocessing=pre, seed=0)
    reps = -(-samples // len(ds.test.x))
    x = np.concatenate([ds.test.x] * reps)[:samples].astype(np.float32)
    y = np.concatenate([ds.test.y] * reps)[:samples]
    max_b = max(batch_sizes)
    rt = Runtime.load(bundle, device="cuda", max_batch=max_b)
    rt_eager = Runtime.load(bundle, device="cuda", max_batch=max_b, graphs=False)
    ex, ws = rt.executor, rt.workspace
    drv = ws.driver
    model, _ = load_checkpoint(Path(bundle) / "model.pt")
    model = model.cuda().eval()
    plain = {True: PlainRunner(torch, model, batch_sizes, graphs=True),
             False: PlainRunner(torch, model, batch_sizes, graphs=False)}

    full_res = rt.run(x, "exit", offsets)
    hist = full_res.exit_histogram(rt.num_exits)
    man = rt.manifest
    cost = np.asarray(man["exits"]["cost"])[full_res.exit_index]
    cost_plain = np.asarray(man["exits"]["cost_vs_plain"])[full_res.exit_index]
    try:
        cpu_res = Runtime.load(bundle, device="cpu", max_batch=max_b).run(x, "exit", offsets)
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
        "backbone": man["backbone"], "stages": ex.num_stages, "repeats": repeats, "offsets": offsets,
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
        xb = _batches(x, B)
        if B == 1:
            xb = xb[:64]
        row = {"batches_timed": len(xb)}
        for label, runtime in (("graphs", rt), ("eager", rt_eager)):
            e, w = runtime.executor, runtime.workspace
            t_exit = _median_time(lambda: [run_conditional(e, w, b, "exit", offsets) for b in xb], repeats) / len(xb)
            t_full = _median_time(lambda: [run_conditional(e, w, b, "full") for b in xb], repeats) / len(xb)
            pr = plain[label == "graphs"]
            t_plain = _median_time(lambda: [pr.run(b) for b in xb], repeats) / len(xb)
            reaches = [run_conditional(e, w, b, "exit", offsets).reach for b in xb]
            needed = {(k, n) for r in reaches for k, n in enumerate(r)}
            table = stage_table(e, w, needed, max(3, repeats))
            t_ideal = float(np.mean([sum(table[(k, n)] for k, n in enumerate(r)) for r in reaches]))
            row[label] = {
                "exit_ms": round(t_exit * 1e3, 4), "full_ms": round(t_full * 1e3, 4),
                "plain_ms": round(t_plain * 1e3, 4), "ideal_exit_ms": round(t_ideal * 1e3, 4),
                "speedup_exit_vs_full": round(t_full / t_exit, 3),
                "speedup_exit_vs_plain": round(t_plain / t_exit, 3),
                "efficiency_realized_over_ideal": round(t_ideal / t_exit, 3),
                "mean_reach": [round(float(v), 2) for v in np.mean(
                    [r + [0] * (ex.num_stages - len(r)) for r in reaches], axis=0)],
            }
        result["batches"][str(B)] = row
        print(f"batch {B}: {json.dumps(row)}", flush=True)
        _save(out, result)  # partial results survive a time limit

    tp = {}
    for mb in (64, max_b):
        for L in (1, lanes):
            pipe = make_pipeline(rt.bundle, max_batch=mb, lanes=L)
            t = _median_time(lambda: pipe.run(x, "exit", offsets), repeats)
            tp[f"micro_batch{mb}_lanes{L}_samples_per_s"] = round(len(x) / t, 1)
            pipe.close()
    result["pipeline"] = tp
    print("pipeline:", json.dumps(tp), flush=True)
    _save(out, result)
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
    sys.exit(main())
