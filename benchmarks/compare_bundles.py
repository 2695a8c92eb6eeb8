"""Two bundles of one model timed side by side (shared by stage_planning.py and int8_speedup.py).

``compare(a, b, inputs, batch, n, repeats)`` loads both with the torch-free runtime (B with A's
session settings, then ``b_options`` over them; A with its target's, then ``a_options``), times them
with the package's protocol (``jei_edge.profile.interleaved``: exit, ideal, full and plain
passes, the two bundles alternating within each repeat), and returns per-bundle medians plus the
per-repeat ratios ``a / b`` (how much faster ``b`` is). ``child(...)`` runs it in a fresh process; ``python compare_bundles.py A B
INPUTS BATCH N REPEATS`` is that process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import List, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jei_edge.profile import median, median_ci  # noqa: E402  (torch-free)


def compare(a: str, b: str, inputs: str, bsz: int, n: int, repeats: int, offsets=None,
            a_options=None, b_options=None) -> dict:
    """Both bundles timed side by side (module docstring). ``b_options`` replace single keys of A's
    settings, so they must agree with the rest of them: e.g. ``row_workers=2`` for B against A's
    ``intra_op_threads=2`` needs ``intra_op_threads=0`` too (``OrtSettings`` refuses the clash)."""
    from jei_edge.profile import Passes, interleaved, median_ratio, ratios, theoretical_speedup
    from jei_edge.runtime import Runtime

    assert "torch" not in sys.modules
    with np.load(inputs) as z:
        x = z["x"]
        y = z["y"] if "y" in z.files else None
    rt_a = Runtime.load(a, max_batch=bsz, **(a_options or {}))
    # B runs with A's session settings (a bundle keeps its target's table from when it was built):
    # the two differ in their graphs only, or in ``b_options`` where a benchmark compares settings
    rts = {"a": rt_a, "b": Runtime.load(b, max_batch=bsz, **{**dataclasses.asdict(rt_a.settings), **(b_options or {})})}
    passes = {k: Passes.for_runtime(rt, bsz) for k, rt in rts.items()}
    xs = Passes.batches(x, bsz, n)
    offsets = tuple(offsets) if offsets else None
    res = {k: [rt.run(bt, offsets=offsets) for bt in xs] for k, rt in rts.items()}
    exits = {k: np.concatenate([r.exit_index for r in v]) for k, v in res.items()}
    preds = {k: np.concatenate([r.pred for r in v]) for k, v in res.items()}
    reaches = {k: [r.reach for r in v] for k, v in res.items()}
    # the package's protocol, both bundles in alternating order within each repeat
    times = interleaved([passes["a"], passes["b"]], xs, [reaches["a"], reaches["b"]], repeats, offsets, warmup=2)
    t = {"a": times[0], "b": times[1]}
    rows = len(xs) * bsz
    out = {"batch": bsz, "samples": rows,
           "exit_agreement": float(np.mean(exits["a"] == exits["b"])),
           "prediction_agreement": float(np.mean(preds["a"] == preds["b"]))}
    for mode in ("exit", "full", "plain"):
        out[f"b_speedup_over_a_{mode}"] = median_ratio(t["a"][mode], t["b"][mode])
    # per-repeat ratios: compare_families pools them over processes into a confidence interval
    out["b_speedup_over_a_exit_ratios"] = ratios(t["a"]["exit"], t["b"]["exit"]).tolist()
    # per repeat: B's exit-mode gain over A relative to its plain-backbone gain (INT8: staged gain /
    # plain gain), both timed in that repeat
    out["exit_gain_over_plain_gain_ratios"] = (ratios(t["a"]["exit"], t["b"]["exit"])
                                               / ratios(t["a"]["plain"], t["b"]["plain"])).tolist()
    for k in passes:
        tk = t[k]
        # the MAC-theoretical speedup vs the plain backbone of the timed rows' exits (precision-free)
        theory = theoretical_speedup(rts[k].manifest.exits.cost_vs_plain, exits[k])
        out[k] = {"stages": rts[k].bundle.num_stages, "settings": dataclasses.asdict(rts[k].settings),
                  "exit_ms_per_sample": 1e3 * median(tk["exit"]) / rows,
                  "full_ms_per_sample": 1e3 * median(tk["full"]) / rows,
                  "plain_ms_per_sample": 1e3 * median(tk["plain"]) / rows,
                  "speedup_vs_plain": median_ratio(tk["plain"], tk["exit"]),
                  "theoretical_speedup_vs_plain": theory,
                  "speedup_vs_plain_over_theory": median_ratio(tk["plain"], tk["exit"]) / theory,
                  "realized_speedup": median_ratio(tk["full"], tk["exit"]),
                  "efficiency": median_ratio(tk["ideal"], tk["exit"]),
                  "exit_histogram": np.bincount(exits[k], minlength=rts[k].num_exits).tolist()}
        if y is not None:
            out[k]["accuracy"] = float(np.mean(preds[k] == y[:rows]))
    return out


def child(a, b, inputs, bsz: int, n: int, repeats: int, offsets=None, settings=(None, None)) -> dict:
    """``compare`` in a fresh process (``settings``: its ``a_options`` and ``b_options``)."""
    cmd = [sys.executable, __file__, str(a), str(b), str(inputs), str(bsz), str(n), str(repeats),
           "--offsets", json.dumps(list(offsets) if offsets else None), "--options", json.dumps(list(settings))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge(runs: list) -> dict:
    """Medians across processes of every number (per bundle too); lists and each bundle's session
    ``settings`` (the same in every process) from the first run."""
    out = {}
    for key, v in runs[0].items():
        if key == "settings":
            out[key] = v
        elif isinstance(v, dict):
            out[key] = merge([r[key] for r in runs])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = median([r[key] for r in runs])
        else:
            out[key] = v
    return out


def bench_parser(doc: str, out_name: str):
    """The command line shared by the two-bundle benchmarks."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--families", default="vit,resnet")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--n1", type=int, default=150)
    p.add_argument("--n64", type=int, default=512)
    p.add_argument("--large-repeats", type=int, default=None,
                   help="repeats of the large declared models (default: realized_speedup.LARGE's)")
    p.add_argument("--quick", action="store_true", help="3 repeats, 1 process, fewer samples (smoke run)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out_name))
    return p


def compare_families(args, command: str, bundle_b, spread: bool = False, bundle_a=None,
                     settings=(None, None)) -> dict:
    """For each family of ``realized_speedup.py``'s benchmark models and each batch size: bundle
    A = the model's FP32 bundle with a stage per exit (or ``bundle_a(family, data)``, same form as
    B's), bundle B = ``bundle_b(family, batch, data)``
    -> ``(file name in --work, BuildOptions, what)``, built from the model unless it exists;
    ``args.processes`` fresh processes of ``compare``, merged (the large declared models: one
    process, ``realized_speedup.LARGE``'s sample counts and repeats, ``--large-repeats`` overrides).
    Threshold offsets: the declared models' declared ones (``spread_offsets(force=True)``); the
    trained models run at offsets 0, or with ``spread`` at ``realized_speedup.spread_offsets(model)``
    (that benchmark's operating point: offsets 0 unless the trained exits are degenerate, then
    spread evenly over every exit). ``settings``: the session options of A and, over A's, of B (``compare``).
    Returns the results (``families[fam]["batch_N"]`` = merged
    numbers, ``per_process``, ``a_bundle`` and ``b_bundle``; ``offsets[fam]``; ``limits[fam]``)."""
    import time

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import realized_speedup as rs

    if args.quick:
        args.repeats, args.processes, args.n1, args.n64 = 3, 1, 40, 128

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": rs.machine(), "command": command, "load_before": [round(v, 2) for v in os.getloadavg()],
               "repeats": args.repeats, "processes": args.processes, "families": {}}
    for fam in args.families.split(","):
        model = rs.ensure_model(fam, work, log)
        data = rs.MODELS[fam].get("data", rs.DATA)
        if bundle_a is None:
            a = rs.ensure_bundle(model, log)
        else:
            name_a, options_a, what_a = bundle_a(fam, data)
            a = cached_build(model, work / name_a, options_a, log, what_a)
        inputs = rs.test_inputs(model, work)
        declared = bool(rs.MODELS[fam].get("declared"))  # untrained: its declared offsets give the exit mix
        offsets = rs.spread_offsets(model, force=declared) if declared or spread else None
        large = rs.large_limits(args.large_repeats) if declared else {}
        repeats, processes = large.get("repeats", args.repeats), 1 if declared else args.processes
        results.setdefault("offsets", {})[fam] = offsets
        results.setdefault("limits", {})[fam] = {"repeats": repeats, "processes": processes,
                                                 "n1": large.get("n1", args.n1), "n64": large.get("rows", args.n64)}
        log(f"{fam}: offsets {None if offsets is None else np.round(offsets, 3).tolist()}, {repeats} repeats, "
            f"{processes} process(es)")
        fam_out = {}
        for bsz in (int(v) for v in args.batches.split(",")):
            name, options, what = bundle_b(fam, bsz, data)
            b = cached_build(model, work / name, options, log, what)
            n = large.get("n1", args.n1) if bsz == 1 else large.get("rows", args.n64)
            runs = [child(a, b, inputs, bsz, n, repeats, offsets, settings) for _ in range(processes)]
            m = merge(runs)
            for key in ("b_speedup_over_a_exit", "exit_gain_over_plain_gain"):  # every repeat of every process
                pooled = [v for r in runs for v in r[f"{key}_ratios"]]
                m[f"{key}_ratios"] = pooled
                m[f"{key}_ci"] = median_ci(pooled)
            m["per_process"] = [{k: r[k] for k in ("b_speedup_over_a_exit", "b_speedup_over_a_full")} for r in runs]
            m["a_bundle"], m["b_bundle"] = str(a), str(b)
            fam_out[f"batch_{bsz}"] = m
            log(f"  {fam} batch {bsz}: B {m['b_speedup_over_a_exit']:.3f}x faster than A (exit mode), "
                f"{m['b_speedup_over_a_full']:.3f}x (full); exit agreement {100 * m['exit_agreement']:.1f}%")
        results["families"][fam] = fam_out
    results["load_after"] = [round(v, 2) for v in os.getloadavg()]  # 1/5/15-minute load averages
    return results


def run_comparison(doc: str, script: str, bundle_b, argv=None, spread: bool = False, bundle_a=None,
                   out_name: str = "", flags: Sequence[str] = (), settings=(None, None)):
    """A two-bundle benchmark's command line and measurements: ``(args, compare_families(...))``;
    the results' ``command`` is the script with every argument given (``flags``: the script's own
    options, ``own_flags``, then the shared ones)."""
    import shlex

    name = Path(script).stem
    argv = sys.argv[1:] if argv is None else list(argv)
    args = bench_parser(doc, out_name or f"{name}.json").parse_args(argv)
    return args, compare_families(args, shlex.join(["python", f"benchmarks/{name}.py", *flags, *argv]), bundle_b,
                                  spread, bundle_a, settings)


def own_flags(parser, opts) -> List[str]:
    """A script's own options (``parser``, parsed into ``opts``) that differ from their defaults,
    as command-line tokens for the results' ``command``."""
    out: List[str] = []
    for key, value in vars(opts).items():
        if value != parser.get_default(key):
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def cached_build(model, path: Path, options, log, what: str) -> Path:
    """``path``, built from ``model`` with ``options`` (a ``BuildOptions``) unless it exists."""
    if not path.exists():
        from jei_edge.compile import build_bundle

        log(f"building {path.name} ({what})")
        build_bundle(model, path, options, progress=log)
    return path


def write_results(results: dict, out: str, lines: list) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="The measurement process: " + __doc__.split("\n\n")[0])
    for name in ("a", "b", "inputs"):
        ap.add_argument(name)
    for name in ("batch", "n", "repeats"):
        ap.add_argument(name, type=int)
    ap.add_argument("--offsets", default="null")
    ap.add_argument("--options", default="[null, null]", help="JSON [A's settings, B's over A's]")
    args = ap.parse_args()
    print(json.dumps(compare(args.a, args.b, args.inputs, args.batch, args.n, args.repeats, json.loads(args.offsets),
                             *json.loads(args.options))))
