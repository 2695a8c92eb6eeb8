"""Stage planning on the CPU: a stage per exit vs the measured ``--plan auto`` plan, side by side.

For each benchmark model of ``realized_speedup.py`` (trained on its data, cached in ``runs/bench``),
builds ``FAMILY_auto_bN.jei`` with ``--plan auto`` timed at batch N (1 and 64), then, in fresh
torch-free processes, times both bundles on the test split at that batch size with the same
``jei_edge.profile.Passes`` (``compare_bundles.py``): passes of the two bundles alternate within
each repeat and the ratio (every-exit time / planned time) is taken per repeat (median over
repeats, median across processes). Also reported: each bundle's speedup vs the plain backbone, realized speedup and
realized/ideal efficiency, and that both bundles give identical exit indices.

    python benchmarks/stage_planning.py                 # ~10 min with the models already trained
    python benchmarks/stage_planning.py --quick

Results: ``benchmarks/results/stage_planning.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


from compare_bundles import child, merge  # noqa: E402  (benchmarks/ is on sys.path above)


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
    args = p.parse_args(argv)
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
            runs = [child(every, planned, inputs, bsz, n, args.repeats) for _ in range(args.processes)]
            m = merge(runs)
            merged = {"plan": plan, "per_process": runs,
                      "planned_speedup_over_every": m["b_speedup_over_a_exit"],
                      "planned_full_speedup_over_every": m["b_speedup_over_a_full"],
                      "identical_exits": all(r["exit_agreement"] == 1.0 for r in runs),
                      "every": m["a"], "planned": m["b"]}
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
