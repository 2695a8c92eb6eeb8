"""Serving load: the bundle on Triton (``jei-edge serve``'s server) under 1, 8 and 32 concurrent clients.

One server serves three models side by side: ``jei`` (early exit), ``jei_full`` (the same bundle
in mode full: every stage) and ``jei_plain`` (the bundle's plain backbone graph). For each
concurrency and repeat, the three models take the same bounded set of single-sample requests in
alternating order (so a shared machine's stalls hit all alike); each client is a thread with its
own gRPC connection sending its requests one after another. Reported per model and concurrency:
throughput (requests/s), p50/p99 latency, the batch sizes Triton's dynamic batcher formed and the
server's compute time per sample (both from Triton's model statistics) and the part of it spent in
jei-edge (``jei_edge_run_seconds_total``), the realized cost (mean per-sample cost as a fraction of
the full model's MACs, from the responses and from the server's jei_edge_* metrics), and the count
of lost, duplicated and mismatched responses: every response is checked against the runtime run
directly in this process (``Handler.run``: ``Runtime.run`` plus the response fields; exact classes,
exits and conformal sets, probabilities within 1e-6). Ratios (exit vs full, exit vs plain) are
medians of per-repeat ratios.

Runs in the serving environment (.venv-serve)::

    .venv-serve/bin/python benchmarks/serving.py [--bundle runs/demo/model.jei] [--inputs runs/demo/test.npz]

``--inputs``: a .npz with raw ``x`` in [0, 1] (the bundle's preprocessing is applied); when missing
it is written by the build environment (.venv) from the digits test split, as ``make demo`` does.
Writes ``benchmarks/results/serving.{json,md}`` with the command, commit and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.realized_speedup import machine  # noqa: E402
from jei_edge.profile import median  # noqa: E402
from jei_edge.profile.measure import median_ratio  # noqa: E402
from jei_edge.runtime import Runtime  # noqa: E402
from jei_edge.serve.client import Client, mismatches  # noqa: E402
from jei_edge.serve.handler import Handler  # noqa: E402
from jei_edge.serve.repository import RepositoryOptions, write_repository  # noqa: E402
from jei_edge.serve.server import Ports, TritonServer  # noqa: E402

MODES = ("exit", "full", "plain")


def load_inputs(path: Path, bundle: Path, build_python: str, preprocessed: bool = False) -> np.ndarray:
    """Model inputs from a ``.npz`` of raw values (written from the digits test split by .venv when
    missing) or, with ``preprocessed``, of model inputs."""
    if not path.exists():
        code = ("import sys, numpy as np; from jei_edge.data import load_data; d = load_data('digits'); "
                "np.savez(sys.argv[1], x=d.raw_test, y=d.test.y)")
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([build_python, "-c", code, str(path)], cwd=ROOT, check=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    from jei_edge.runtime.inputs import load_inputs as read

    with Runtime.load(bundle, device="cpu") as rt:
        return read([str(path)], rt.preprocessing, preprocessed).x


def batch_counts(server: TritonServer, model: str) -> dict:
    """``{batch size: (executions, compute ns)}`` so far (Triton's model statistics; compute_infer is
    the model's execute: the runtime's work plus the Python backend's tensor handling)."""
    stats = server.stats(model)["model_stats"][0].get("batch_stats", [])
    return {int(b["batch_size"]): (int(b["compute_infer"]["count"]), int(b["compute_infer"]["ns"])) for b in stats}


def metric_sum(text: str, name: str, model: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def load_run(server: TritonServer, model: str, x: np.ndarray, want: dict, clients: int, requests: int) -> dict:
    """``requests`` single-sample requests (sample i % len(x)) from ``clients`` threads."""
    answered = np.zeros(requests, np.int64)
    latency = np.full(requests, np.nan)
    problems: list = []
    mismatched = np.zeros(requests, bool)
    lock = threading.Lock()

    def work(ids):
        with Client(server.grpc_url, "grpc", model, timeout_s=60) as c:
            for i in ids:
                j = i % len(x)
                t = time.perf_counter()
                try:
                    out = c.infer(x[j:j + 1])
                except Exception as exc:  # a lost request (never answered): counted, the run goes on
                    with lock:
                        problems.append(f"request {i}: {exc}")
                    continue
                latency[i] = time.perf_counter() - t
                bad = mismatches(out, {k: v[j:j + 1] for k, v in want.items()})
                with lock:
                    answered[i] += 1
                    mismatched[i] |= bool(bad)
                    problems.extend(f"request {i}: {p}" for p in bad)

    before_b, before_m = batch_counts(server, model), server.metrics()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, [range(c, requests, clients) for c in range(clients)]))
    seconds = time.perf_counter() - t0
    after_b, after_m = batch_counts(server, model), server.metrics()
    zero = (0, 0)
    formed = {b: n - before_b.get(b, zero)[0] for b, (n, _) in sorted(after_b.items()) if n - before_b.get(b, zero)[0]}
    compute_ns = sum(ns - before_b.get(b, zero)[1] for b, (_, ns) in after_b.items())
    samples = metric_sum(after_m, "jei_edge_samples_total", model) - metric_sum(before_m, "jei_edge_samples_total", model)
    cost = metric_sum(after_m, "jei_edge_cost_total", model) - metric_sum(before_m, "jei_edge_cost_total", model)
    run_s = metric_sum(after_m, "jei_edge_run_seconds_total", model) - metric_sum(before_m, "jei_edge_run_seconds_total",
                                                                                model)
    idx = np.arange(requests) % len(x)
    lat = latency[~np.isnan(latency)]
    return {"seconds": seconds, "throughput_rps": requests / seconds,
            "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat.size else None,
            "compute_us_per_sample": compute_ns / 1e3 / max(1, sum(b * n for b, n in formed.items())),
            "jei_edge_us_per_sample": run_s * 1e6 / samples if samples else None,
            "batches_formed": formed, "mean_batch": sum(b * n for b, n in formed.items()) / max(1, sum(formed.values())),
            "realized_cost": float(np.asarray(want["cost"], np.float64)[idx].mean()),
            "metrics_mean_cost": cost / samples if samples else None, "metrics_samples": samples,
            "lost": int((answered == 0).sum()), "duplicated": int((answered > 1).sum()),
            "mismatched": int(mismatched.sum()), "problems": problems[:5]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "runs" / "demo" / "model.jei"))
    ap.add_argument("--inputs", default=str(ROOT / "runs" / "demo" / "test.npz"))
    ap.add_argument("--preprocessed", action="store_true", help="--inputs holds model inputs, not raw values.")
    ap.add_argument("--build-python", default=os.environ.get("JEI_EDGE_BUILD_PYTHON", str(ROOT / ".venv/bin/python")))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=480, help="Requests per model, concurrency and repeat.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--max-queue-delay-us", type=int, default=100)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per instance.")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving"))
    args = ap.parse_args(argv)
    bundle = Path(args.bundle)
    x = load_inputs(Path(args.inputs), bundle, args.build_python, args.preprocessed)
    opts = RepositoryOptions(modes=MODES, instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                             max_batch_size=args.max_batch_size, backend_options=(f"intra_op_threads={args.threads}",))
    with Runtime.load(bundle, device="cpu", intra_op_threads=args.threads) as rt:  # the direct runtime
        want = {s.mode: Handler(rt, s).run(x) for s in opts.specs()}
    import tempfile

    conc = [int(c) for c in args.concurrency.split(",")]
    runs = {m: {c: [] for c in conc} for m in MODES}
    with tempfile.TemporaryDirectory(prefix="jei-serving-bench-") as tmp:
        repo = write_repository(bundle, Path(tmp) / "models", opts, copy_bundle=False)
        t = time.perf_counter()
        with TritonServer(repo, Ports.free(), exit_timeout_s=5) as server:
            startup = time.perf_counter() - t
            for s in opts.specs():  # warm-up: every instance's sessions
                load_run(server, s.name, x, want[s.mode], clients=4, requests=32)
            for c in conc:
                for r in range(args.repeats):
                    order = MODES if r % 2 == 0 else MODES[::-1]
                    for m in order:
                        res = load_run(server, opts.model_name(m), x, want[m], c, args.requests)
                        runs[m][c].append(res)
                        print(f"clients {c:>2} repeat {r} {m:>5}: {res['throughput_rps']:7.1f} req/s, p50 "
                              f"{res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, mean batch {res['mean_batch']:.2f}, "
                              f"cost {res['realized_cost']:.3f}, lost/dup/mismatch {res['lost']}/{res['duplicated']}/"
                              f"{res['mismatched']}", flush=True)
    table = {}
    for c in conc:
        row = {}
        for m in MODES:
            rs = runs[m][c]
            batches: dict = {}
            for r in rs:
                for b, n in r["batches_formed"].items():
                    batches[b] = batches.get(b, 0) + n
            row[m] = {"throughput_rps": median([r["throughput_rps"] for r in rs]),
                      "p50_ms": median([r["p50_ms"] for r in rs]), "p99_ms": median([r["p99_ms"] for r in rs]),
                      "mean_batch": median([r["mean_batch"] for r in rs]),
                      "compute_us_per_sample": median([r["compute_us_per_sample"] for r in rs]),
                      "jei_edge_us_per_sample": median([r["jei_edge_us_per_sample"] for r in rs]),
                      "batch_sizes": f"{min(batches)}-{max(batches)}" if batches else "",
                      "batches_formed": dict(sorted(batches.items())),
                      "realized_cost": rs[0]["realized_cost"], "metrics_mean_cost": rs[-1]["metrics_mean_cost"],
                      "lost": sum(r["lost"] for r in rs), "duplicated": sum(r["duplicated"] for r in rs),
                      "mismatched": sum(r["mismatched"] for r in rs), "problems": [p for r in rs for p in r["problems"]][:5]}
        for other in ("full", "plain"):
            row[f"throughput_exit_vs_{other}"] = median_ratio([r["throughput_rps"] for r in runs["exit"][c]],
                                                              [r["throughput_rps"] for r in runs[other][c]])
            row[f"p50_{other}_vs_exit"] = median_ratio([r["p50_ms"] for r in runs[other][c]],
                                                       [r["p50_ms"] for r in runs["exit"][c]])
            row[f"compute_{other}_vs_exit"] = median_ratio([r["compute_us_per_sample"] for r in runs[other][c]],
                                                           [r["compute_us_per_sample"] for r in runs["exit"][c]])
            row[f"jei_edge_{other}_vs_exit"] = median_ratio([r["jei_edge_us_per_sample"] for r in runs[other][c]],
                                                            [r["jei_edge_us_per_sample"] for r in runs["exit"][c]])
        table[c] = row
    cmd = "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    result = {"command": cmd, "machine": machine(), "bundle": str(bundle), "samples": int(len(x)),
              "startup_s": round(startup, 2), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "affinity": sorted(os.sched_getaffinity(0)), "results": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = ["# Serving on Triton: early exit vs full vs plain backbone", "",
             f"`{cmd}` at commit `{result['machine']['commit']}` on {result['machine']['cpu']} "
             f"(CPU cores used: {result['affinity']}); bundle `{bundle}`, {len(x)} samples cycled, "
             f"{args.requests} single-sample gRPC requests per model, concurrency and repeat, {args.repeats} repeats, "
             f"{args.instances} instance(s) x {args.threads} onnxruntime thread(s), max queue delay "
             f"{args.max_queue_delay_us} us; Triton started in {startup:.1f} s.", "",
             "| clients | model | req/s | p50 ms | p99 ms | mean batch | batch sizes | Triton compute us/sample | "
             "in jei-edge us/sample | realized cost | lost/dup/mismatch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, row in table.items():
        for m in MODES:
            r = row[m]
            lines.append(f"| {c} | {m} | {r['throughput_rps']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['mean_batch']:.2f} | {r['batch_sizes']} | {r['compute_us_per_sample']:.0f} | "
                         f"{r['jei_edge_us_per_sample']:.0f} | "
                         f"{r['realized_cost']:.3f} | "
                         f"{r['lost']}/{r['duplicated']}/{r['mismatched']} |")
    lines += ["", "Medians of per-repeat ratios:", ""]
    for c, row in table.items():
        lines.append(f"- {c} client(s): throughput exit/full {row['throughput_exit_vs_full']:.2f}x, exit/plain "
                     f"{row['throughput_exit_vs_plain']:.2f}x; p50 full/exit {row['p50_full_vs_exit']:.2f}x, "
                     f"plain/exit {row['p50_plain_vs_exit']:.2f}x; Triton compute per sample full/exit "
                     f"{row['compute_full_vs_exit']:.2f}x, plain/exit {row['compute_plain_vs_exit']:.2f}x; in jei-edge "
                     f"full/exit {row['jei_edge_full_vs_exit']:.2f}x, plain/exit {row['jei_edge_plain_vs_exit']:.2f}x")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = sum(row[m][k] for row in table.values() for m in MODES for k in ("lost", "duplicated", "mismatched"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
