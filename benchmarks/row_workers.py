"""Row workers vs onnxruntime's intra-op pools, side by side in one process per model.

For every benchmark bundle (``benchmarks/realized_speedup.py --prepare-only`` makes them), the
package's own profiler (``jei_edge.profile.profile_bundle`` with ``compare``, what
``jei-edge profile --compare-settings`` runs) times the early-exit pass with the target's default
settings and, in every repeat next to it, with each candidate setting: speedup = default time /
candidate time, medians of per-repeat ratios with their confidence intervals (docs/runtime.md,
"Row workers"). The models run at the offsets ``realized_speedup.py`` uses.

    python benchmarks/row_workers.py --work runs/bench_new
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from realized_speedup import MODELS, machine, spread_offsets  # noqa: E402

from jei_edge.profile import format_interval, profile_bundle, ratio_verdict  # noqa: E402
from jei_edge.runtime import Runtime  # noqa: E402

CANDIDATES = ("row_workers=2", "row_workers=2,small_batch_rows=1,small_batch_threads=0")


def options(label: str) -> dict:
    from jei_edge.runtime.output import parse_backend_options

    return parse_backend_options(label.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_new"))
    p.add_argument("--families", default="quickstart,vit,resnet,resnet18,vits16")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--samples", type=int, default=256, help="samples per batch size (small models)")
    p.add_argument("--large-samples", type=int, default=128, help="samples of the 112-px models")
    p.add_argument("--candidates", default=";".join(CANDIDATES), help="';'-separated KEY=VALUE[,KEY=VALUE] settings")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "row_workers.json"))
    args = p.parse_args(argv)
    work, sizes = Path(args.work), [int(b) for b in args.batches.split(",")]
    cands = [c for c in args.candidates.split(";") if c]
    res = {"command": "python benchmarks/row_workers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "repeats": args.repeats, "candidates": cands, "families": {}}
    out = Path(args.out)
    for fam in (f for f in args.families.split(",") if f):
        bundle, model = work / f"{fam}.jei", work / f"{fam}.pt"
        if not bundle.exists():
            raise SystemExit(f"{bundle} is missing: run `python benchmarks/realized_speedup.py --work {work} "
                             f"--prepare-only` first")
        # the offsets realized_speedup.py measures at (spread where offsets 0 are degenerate, declared ones)
        offsets = spread_offsets(model, force=bool(MODELS[fam].get("declared")))
        offsets = offsets if any(offsets) else None
        x = np.load(work / f"{fam}_test.npz")["x"].astype(np.float32)
        n = args.large_samples if MODELS[fam].get("declared") else args.samples
        x = np.concatenate([x] * (n // len(x) + 1))[:n]
        rt = Runtime.load(bundle, max_batch=max(sizes))
        compare = {c: Runtime.load(bundle, max_batch=max(sizes), **options(c)) for c in cands}
        print(f"[{time.strftime('%H:%M:%S')}] {fam}: {n} samples, batches {sizes}", flush=True)
        info = profile_bundle(rt, x, batch_sizes=sizes, repeats=args.repeats, samples=n,
                              offsets=offsets, compare=compare)
        res["families"][fam] = {"exits": info["exits"]["histogram"], "batches": {
            b: {"default_ms_per_sample": e["exit_ms_per_sample"], "compare": e["compare"]}
            for b, e in info["batches"].items()}, "best": info["best_settings"]}
        out.write_text(json.dumps(res, indent=1) + "\n")
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out.write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Row workers vs intra-op pools (CPU, onnxruntime)", "",
             f"Command: `{res['command']}`; commit {m['commit']}; {m['cpu']}, {m['cores']} cores; onnxruntime "
             f"{m['onnxruntime']}; {res['started']} - {res.get('finished', '?')}. Early-exit ms per sample with the "
             f"target's defaults, then each candidate's speedup over them (default time / candidate time), medians "
             f"of {res['repeats']} per-repeat ratios timed side by side in one process, [95% CI] (min-max below 6 "
             f"repeats), and the verdict.", "",
             "| model | batch | default ms/sample | " + " | ".join(res["candidates"]) + " |",
             "|---|---|---|" + "---|" * len(res["candidates"])]
    for fam, r in res["families"].items():
        for b, e in r["batches"].items():
            cells = []
            for c in res["candidates"]:
                v = e["compare"][c]
                cells.append(f"{v['speedup']:.2f}x {format_interval(v['speedup_ci'], 2)} {ratio_verdict(v['speedup_ci'])}"
                             + ("" if v["same_exits"] else " (exits differ!)"))
            lines.append(f"| {fam} | {b} | {e['default_ms_per_sample']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
