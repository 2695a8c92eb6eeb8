"""onnxruntime session settings side by side in one process per model (row workers, spinning, ...).

For every benchmark bundle (``benchmarks/realized_speedup.py --prepare-only`` makes them), the
package's own profiler (``jei_edge.profile.profile_bundle`` with ``compare``, what
``jei-edge profile --compare-settings`` runs) times the early-exit pass with the target's default
settings and, in every repeat next to it, with each candidate setting: speedup = default time /
candidate time, medians of per-repeat ratios with their confidence intervals (docs/runtime.md,
"Row workers", "onnxruntime settings"). The models run at the offsets ``realized_speedup.py`` uses.

    python benchmarks/row_workers.py --work runs/bench_new
    python benchmarks/row_workers.py --work runs/bench_new --candidates allow_spinning=false \
        --bundle-suffix _int8_floor0.5 --out benchmarks/results/spinning_in_run_int8.json
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


def rss_mib() -> float:
    """This process's resident memory (Linux ``/proc/self/status``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def memory_child(bundle: str, inputs: str, label: str) -> dict:
    """In a fresh process: resident memory added by loading the runtime with ``label``'s settings
    ("" = defaults) and running a batch of 1 and of 64 rows (sessions, weights, arenas)."""
    x = np.load(inputs)["x"].astype(np.float32)
    x = np.concatenate([x] * (64 // len(x) + 1))[:64]
    import onnxruntime  # noqa: F401  (its own import is not the runtime's cost)

    before = rss_mib()
    rt = Runtime.load(bundle, max_batch=64, **(options(label) if label else {}))
    rt.run(x[:1])
    rt.run(x)
    return {"rss_added_mib": rss_mib() - before}


def memory(bundle: Path, inputs: Path, label: str) -> float:
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--memory-child", str(bundle), str(inputs), label],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"memory of {bundle} ({label or 'defaults'}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["rss_added_mib"]


def options(label: str) -> dict:
    from jei_edge.runtime.output import parse_backend_options, split_settings

    return parse_backend_options(split_settings(label))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_new"))
    p.add_argument("--families", default="quickstart,vit,resnet,resnet18,vits16")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--samples", type=int, default=256, help="samples per batch size (small models)")
    p.add_argument("--large-samples", type=int, default=128, help="samples of the 112-px models")
    p.add_argument("--candidates", default=";".join(CANDIDATES), help="';'-separated KEY=VALUE[,KEY=VALUE] settings")
    p.add_argument("--bundle-suffix", default="", help="time FAMILY+SUFFIX.jei, e.g. _int8_floor0.5 for the INT8 "
                   "bundles benchmarks/int8_speedup.py builds (default: the FP32 bundles)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "row_workers.json"))
    p.add_argument("--memory-child", nargs=3, metavar=("BUNDLE", "INPUTS", "LABEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return 0
    work, sizes = Path(args.work), [int(b) for b in args.batches.split(",")]
    cands = [c for c in args.candidates.split(";") if c]
    res = {"command": "python benchmarks/row_workers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "repeats": args.repeats, "candidates": cands, "families": {}}
    out = Path(args.out)
    for fam in (f for f in args.families.split(",") if f):
        bundle, model = work / f"{fam}{args.bundle_suffix}.jei", work / f"{fam}.pt"
        if not bundle.exists():
            maker = "int8_speedup.py" if args.bundle_suffix else "realized_speedup.py --prepare-only"
            raise SystemExit(f"{bundle} is missing: run `python benchmarks/{maker} --work {work}` first")
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
        for other in [rt, *compare.values()]:
            other.close()
        res["families"][fam] = {"exits": info["exits"]["histogram"], "batches": {
            b: {"default_ms_per_sample": e["exit_ms_per_sample"], "compare": e["compare"]}
            for b, e in info["batches"].items()}, "best": info["best_settings"],
            # resident memory each setting adds (fresh process each: sessions, weights, arenas)
            "rss_added_mib": {label: memory(bundle, work / f"{fam}_test.npz", label) for label in [""] + cands}}
        out.write_text(json.dumps(res, indent=1) + "\n")
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    out.write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# onnxruntime session settings side by side (CPU)", "",
             f"Command: `{res['command']}`; commit {m['commit']}; {m['cpu']}, {m['cores']} cores; onnxruntime "
             f"{m['onnxruntime']}; {res['started']} - {res.get('finished', '?')}. Early-exit ms per sample with the "
             f"target's defaults, then each candidate's speedup over them (default time / candidate time), medians "
             f"of {res['repeats']} per-repeat ratios timed side by side in one process, [95% CI] (min-max below 6 "
             f"repeats), and the verdict.", "",
             "| model | batch | default ms/sample | " + " | ".join(res["candidates"]) + " |",
             "|---|---|---|" + "---|" * len(res["candidates"])]
    mem = ["", "Resident memory each setting adds (MiB; a fresh process per setting: load, then a batch of 1 "
               "and one of 64 rows):", "", "| model | defaults | " + " | ".join(res["candidates"]) + " |",
           "|---|---|" + "---|" * len(res["candidates"])]
    for fam, r in res["families"].items():
        for b, e in r["batches"].items():
            cells = []
            for c in res["candidates"]:
                v = e["compare"][c]
                cells.append(f"{v['speedup']:.2f}x {format_interval(v['speedup_ci'], 2)} {ratio_verdict(v['speedup_ci'])}"
                             + ("" if v["same_exits"] else " (exits differ!)"))
            lines.append(f"| {fam} | {b} | {e['default_ms_per_sample']:.3f} | " + " | ".join(cells) + " |")
        if r.get("rss_added_mib"):
            mem.append(f"| {fam} | " + " | ".join(f"{r['rss_added_mib'][c]:.1f}" for c in [""] + res["candidates"]) + " |")
    return "\n".join(lines + (mem if len(mem) > 5 else [])) + "\n"


if __name__ == "__main__":
    sys.exit(main())
