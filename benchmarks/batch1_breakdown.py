"""Where a batch-1 call's time goes outside the stage runs (CPU runtime, onnxruntime).

Runs ``Runtime.run`` for one row at a time through ``jei_edge.profile.Breakdown`` (the real code
path, with the executor and workspace wrapped by timing views): ``begin``, each stage run, each
boundary (``exit_and_compact``), ``finish`` and ``collect``; the numpy input check alone; then
times small operations right after a stage run ("cold": the stage evicted the interpreter's and
numpy's code) and again immediately after ("warm"); and each stage run alone, back to back (hot
caches, what the profiler's ideal is built from), next to its time inside the loop. Medians over
every call.

    python benchmarks/batch1_breakdown.py                       # runs/bench/vit.jei (realized_speedup.py builds it)
    python benchmarks/batch1_breakdown.py --bundle B.jei --inputs T.npz --out results/x.json

Torch-free: it imports only the runtime. Results: ``benchmarks/results/batch1_breakdown.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=str(ROOT / "runs" / "bench" / "vit.jei"))
    p.add_argument("--inputs", default=str(ROOT / "runs" / "bench" / "vit_test.npz"), help=".npz with model inputs x")
    p.add_argument("--samples", type=int, default=150)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch1_breakdown.json"))
    args = p.parse_args(argv)

    from jei_edge.profile import Breakdown, median
    from jei_edge.runtime import Runtime
    from jei_edge.runtime.validate import check_batch

    assert "torch" not in sys.modules
    pc = time.perf_counter_ns
    with np.load(args.inputs) as z:
        x = z["x"]
    rt = Runtime.load(args.bundle, max_batch=64)
    ex, ws = rt.executor, rt.workspace
    xs = [np.ascontiguousarray(x[i:i + 1]) for i in range(min(args.samples, len(x)))]
    shape = tuple(rt.input_shape)
    bd = Breakdown(rt)  # Runtime.run's own path, every step timed (begin, stage_K, boundary, finish, collect)
    seg: dict = {"run_total": [], "numpy_finite_check": []}
    for _ in range(args.repeats):
        for b in xs:
            t0 = pc()
            rt.run(b)
            seg["run_total"].append((pc() - t0) / 1e3)
            bd.run(b)
            # the numpy finiteness check, timed although the runtime skips it when stage 0 carries
            # the input guard
            t0 = pc()
            check_batch(b, shape, finite=True)
            seg["numpy_finite_check"].append((pc() - t0) / 1e3)
    seg.update({k: [1e6 * s for s in v] for k, v in bd.times.items()})
    outs = ws.stage_outputs(0)
    probe = {
        "np_empty_3": lambda: np.empty(3),
        "probs_row_copy": lambda: outs["probs"][:1].copy(),
        "gate_item": lambda: outs["gate"].item(0),
        "boundary_decision": lambda: ws.exit_and_compact(0, 1, 0.0, True),
    }
    cold: dict = {}
    for _ in range(args.repeats):
        for name, f in probe.items():
            for b in xs[:50]:
                ws.begin(b)
                ex.execute(0, 1, ws)
                t = pc()
                f()
                t1 = pc()
                f()
                t2 = pc()
                cold.setdefault(name, {"cold": [], "warm": []})
                cold[name]["cold"].append((t1 - t) / 1e3)
                cold[name]["warm"].append((t2 - t1) / 1e3)
    # each stage alone, back to back on one row (hot caches: what the profiler's "ideal" is built
    # from), against the same stage inside the loop above (after the other stages evicted its
    # weights and code)
    alone: dict = {}
    ws.begin(xs[0])
    for k in range(ex.num_stages):
        for _ in range(args.repeats):
            for _b in xs[:50]:
                t = pc()
                ex.execute(k, 1, ws)
                alone.setdefault(f"stage_{k}", []).append((pc() - t) / 1e3)
    import shlex

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from realized_speedup import machine

    out = {
        "command": shlex.join(["python", "benchmarks/batch1_breakdown.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "bundle": args.bundle, "calls": len(xs) * args.repeats,
        "median_us": {k: round(median(v), 2) for k, v in seg.items()},
        "count": {k: len(v) for k, v in seg.items()},
        "after_stage_run_us": {k: {c: round(median(v), 2) for c, v in d.items()} for k, d in cold.items()},
        "input_guard": bool(ws.input_guard),
        "stage_alone_us": {k: round(median(v), 2) for k, v in alone.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for k, v in out["median_us"].items():
        print(f"{k:20s} {v:9.2f} us  (n={out['count'][k]})")
    for k, d in out["after_stage_run_us"].items():
        print(f"{k:20s} cold {d['cold']:6.2f} us, warm {d['warm']:6.2f} us")
    for k, v in out["stage_alone_us"].items():
        print(f"{k:20s} alone {v:8.2f} us, in the loop {out['median_us'].get(k, float('nan')):8.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
