"""Stage planning on the CPU: a stage per exit vs the measured ``--plan auto`` plan, side by side.

For each benchmark model of ``realized_speedup.py`` (trained on its data, cached in ``runs/bench``),
builds ``FAMILY_auto_bN.jei`` with ``--plan auto`` timed at batch N (1 and 64), then, in fresh
torch-free processes, times both bundles on the test split at that batch size with the same
``jei_edge.profile.Passes``: exit passes of the two bundles alternate within each repeat and the
ratio (every-exit time / planned time) is taken per repeat (median over repeats, median across
processes). Also reported: each bundle's speedup vs the plain backbone, realized speedup and
realized/ideal efficiency, and that both bundles give identical exit indices.

    python benchmarks/stage_planning.py                 # ~10 min with the models already trained
    python benchmarks/stage_planning.py --quick

Results: ``benchmarks/results/stage_planning.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def _median(v):
    return float(np.median(np.asarray(v, dtype=np.float64)))


def measure(every: str, planned: str, inputs: str, bsz: int, n: int, repeats: int) -> dict:
    from jei_edge.profile import Passes
    from jei_edge.runtime import Runtime

    assert "torch" not in sys.modules
    with np.load(inputs) as z:
        x = z["x"]
    rts = {"every": Runtime.load(every, max_batch=bsz), "planned": Runtime.load(planned, max_batch=bsz)}
    passes = {k: Passes.for_runtime(rt, bsz) for k, rt in rts.items()}
    xs = Passes.batches(x, bsz, n)
    same = all(np.array_equal(rts["every"].run(b).exit_index, rts["planned"].run(b).exit_index) for b in xs)
    reaches = {k: p.reaches(xs) for k, p in passes.items()}
    t = {k: {"exit": [], "full": [], "ideal": [], "plain": []} for k in passes}
    for p in passes.values():
        for _ in range(2):
            p.exit_pass(xs), p.full_pass(xs), p.plain_pass(xs)
    order = list(passes)
    for i in range(repeats):
        for k in (order if i % 2 == 0 else order[::-1]):
            p = passes[k]
            p.prime(xs[0])
            if i % 2 == 0:
                t[k]["ideal"].append(p.ideal_pass(xs, reaches[k]))
                t[k]["exit"].append(p.exit_pass(xs))
            else:
                t[k]["exit"].append(p.exit_pass(xs))
                p.prime(xs[0])
                t[k]["ideal"].append(p.ideal_pass(xs, reaches[k]))
            t[k]["full"].append(p.full_pass(xs))
            t[k]["plain"].append(p.plain_pass(xs))
    rows = len(xs) * bsz
    out = {"batch": bsz, "samples": rows, "identical_exits": bool(same),
           "planned_speedup_over_every": _median(np.asarray(t["every"]["exit"]) / np.asarray(t["planned"]["exit"])),
           "planned_full_speedup_over_every": _median(np.asarray(t["every"]["full"]) / np.asarray(t["planned"]["full"]))}
    for k in passes:
        a = {m: np.asarray(v) for m, v in t[k].items()}
        out[k] = {"stages": rts[k].bundle.num_stages, "exit_ms_per_sample": 1e3 * _median(a["exit"]) / rows,
                  "full_ms_per_sample": 1e3 * _median(a["full"]) / rows,
                  "plain_ms_per_sample": 1e3 * _median(a["plain"]) / rows,
                  "speedup_vs_plain": _median(a["plain"] / a["exit"]), "realized_speedup": _median(a["full"] / a["exit"]),
                  "efficiency": _median(a["ideal"] / a["exit"]),
                  "reach_total": np.sum(reaches[k], axis=0).tolist() if len({len(r) for r in reaches[k]}) == 1 else None}
    return out


def _child(args) -> dict:
    cmd = [sys.executable, __file__, "--child", args[0], args[1], args[2], str(args[3]), str(args[4]), str(args[5])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--families", default="vit,resnet")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--n1", type=int, default=150)
    p.add_argument("--n64", type=int, default=512)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stage_planning.json"))
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        e, pl, inp, bsz, n, rep = args.child
        print(json.dumps(measure(e, pl, inp, int(bsz), int(n), int(rep))))
        return 0
    if args.quick:
        args.repeats, args.processes, args.n1, args.n64 = 3, 1, 40, 128

    import realized_speedup as rs

    from jei_edge.compile import BuildOptions, build_bundle

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": rs.machine(), "command": "python benchmarks/stage_planning.py" + (" --quick" if args.quick else ""),
               "families": {}}
    for fam in args.families.split(","):
        model = rs.ensure_model(fam, work, log)
        every = rs.ensure_bundle(model, log)
        inputs = rs.test_inputs(model, work)
        fam_out = {}
        for bsz in (int(b) for b in args.batches.split(",")):
            planned = work / f"{fam}_auto_b{bsz}.jei"
            if not planned.exists():
                log(f"building {planned.name} (--plan auto at batch {bsz})")
                build_bundle(model, planned, BuildOptions(plan="auto", plan_batch=bsz, data=rs.DATA, force=True),
                             progress=log)
            plan = json.loads((planned / "manifest.json").read_text())["plan"]
            n = args.n1 if bsz == 1 else args.n64
            runs = [_child((str(every), str(planned), str(inputs), bsz, n, args.repeats)) for _ in range(args.processes)]
            merged = {"plan": plan, "per_process": runs,
                      "planned_speedup_over_every": _median([r["planned_speedup_over_every"] for r in runs]),
                      "planned_full_speedup_over_every": _median([r["planned_full_speedup_over_every"] for r in runs]),
                      "identical_exits": all(r["identical_exits"] for r in runs)}
            for k in ("every", "planned"):
                merged[k] = {f: _median([r[k][f] for r in runs]) for f in
                             ("stages", "exit_ms_per_sample", "full_ms_per_sample", "plain_ms_per_sample",
                              "speedup_vs_plain", "realized_speedup", "efficiency")}
            log(f"  {fam} batch {bsz}: plan {plan['groups']}; planned/every exit-mode speedup "
                f"{merged['planned_speedup_over_every']:.3f}x; vs plain {merged['every']['speedup_vs_plain']:.2f}x -> "
                f"{merged['planned']['speedup_vs_plain']:.2f}x; efficiency {merged['planned']['efficiency']:.3f}")
            fam_out[f"batch_{bsz}"] = merged
        results["families"][fam] = fam_out
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Stage planning (CPU, onnxruntime): a stage per exit vs `--plan auto`", "",
             f"Machine: {results['machine']}. Command: `{results['command']}`. Medians over {args.repeats} repeats "
             f"in each of {args.processes} processes; exit passes of the two bundles alternate within a repeat.", "",
             "| family | batch | auto plan (exit groups) | planned / every (exit mode) | planned / every (full mode) | "
             "vs plain: every -> planned | efficiency: every -> planned | identical exits |",
             "|---|---|---|---|---|---|---|---|"]
    for fam, fo in results["families"].items():
        for key, m in fo.items():
            lines.append(f"| {fam} | {key.split('_')[1]} | {m['plan']['groups']} | {m['planned_speedup_over_every']:.3f}x | "
                         f"{m['planned_full_speedup_over_every']:.3f}x | {m['every']['speedup_vs_plain']:.2f}x -> "
                         f"{m['planned']['speedup_vs_plain']:.2f}x | {m['every']['efficiency']:.3f} -> "
                         f"{m['planned']['efficiency']:.3f} | {m['identical_exits']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
