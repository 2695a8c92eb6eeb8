"""Stage planning on the CPU: a stage per exit vs the measured ``--plan auto`` plan, side by side.

For each benchmark model of ``realized_speedup.py`` (trained on its data, cached in ``runs/bench``),
builds ``FAMILY_auto_bN.jei`` with ``--plan auto`` timed at batch N (1 and 64), then, in fresh
torch-free processes, times both bundles on the test split at that batch size with the same
``jei_edge.profile.Passes`` (``compare_bundles.py``): passes of the two bundles alternate within
each repeat and the ratio (every-exit time / planned time) is taken per repeat (median over
repeats, median across processes). Also reported: each bundle's speedup vs the plain backbone,
realized speedup and realized/ideal efficiency, that both bundles give identical exit indices, and
the planner's own prediction of the gain (its expected ms/sample with a stage per exit / with its
plan, from the bundle's manifest) beside the measured one.

    python benchmarks/stage_planning.py                 # ~10 min with the models already trained
    python benchmarks/stage_planning.py --quick

``--precision int8 [--min-agreement F]``: both bundles INT8 (the per-exit one shared with
``int8_speedup.py``), the plan timed on INT8 candidates (``jei-edge build --plan auto --precision int8``).

Results: ``benchmarks/results/stage_planning.json`` and ``.md`` (INT8: ``stage_planning_int8``).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_bundles import own_flags, run_comparison, write_results  # noqa: E402


def main(argv=None) -> int:
    import argparse

    from int8_speedup import int8_build

    from jei_edge.bundle import Bundle
    from jei_edge.compile import BuildOptions
    from jei_edge.profile import format_interval

    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    own.add_argument("--min-agreement", type=float, default=None)
    opts, rest = own.parse_known_args(argv)
    if opts.min_agreement is not None and opts.precision != "int8":
        own.error("--min-agreement is the INT8 build's floor: give it with --precision int8")
    int8 = opts.precision == "int8"
    floor = 0.95 if opts.min_agreement is None else opts.min_agreement

    def every(fam, data):  # INT8: A is int8_speedup.py's bundle (same name, shared)
        return int8_build(fam, data, min_agreement=floor)

    def planned(fam, bsz, data):
        if not int8:
            return (f"{fam}_auto_b{bsz}.jei", BuildOptions(plan="auto", plan_batch=bsz, data=data, force=True),
                    f"--plan auto at batch {bsz}")
        name, options, what = int8_build(fam, data, min_agreement=floor)
        return (name.replace(".jei", f"_auto_b{bsz}.jei"), replace(options, plan="auto", plan_batch=bsz),
                f"--plan auto at batch {bsz} {what}")

    args, results = run_comparison(__doc__, __file__, planned, rest, bundle_a=every if int8 else None,
                                   out_name="stage_planning_int8.json" if int8 else "", flags=own_flags(own, opts))
    lines = [f"# Stage planning (CPU, onnxruntime{', INT8 bundles' if int8 else ''}): a stage per exit vs "
             "`--plan auto`", "",
             f"Machine: {results['machine']}. Command: `{results['command']}`. Medians over {results['repeats']} repeats "
             f"in each of {results['processes']} processes; passes of the two bundles alternate within a repeat.", "",
             "[CI]: distribution-free confidence interval of the measured median ratio (every repeat of every "
             "process, `jei_edge.profile.median_ci`); the prediction is *within noise* when it lies inside it.", "",
             "| family | batch | auto plan (exit groups) | planned / every (exit mode) [CI] | predicted by the planner | "
             "prediction error | prediction in CI | boundary (us, measured) | planned / every (full mode) | "
             "vs plain: every -> planned | efficiency: every -> planned | identical exits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fam, fo in results["families"].items():
        for key, m in fo.items():
            m["plan"] = plan = dict(Bundle.read_manifest(m["b_bundle"]).plan)
            # the planner's median of per-round ratios (bundles built before it: the ratio of its medians)
            m["predicted_speedup"] = plan.get("expected_speedup_over_every_exit") or \
                plan["expected_ms_per_sample_every_exit"] / plan["expected_ms_per_sample"]
            m["prediction_error"] = m["predicted_speedup"] / m["b_speedup_over_a_exit"] - 1.0
            ci = m["b_speedup_over_a_exit_ci"]
            m["prediction_within_ci"] = ci["low"] <= m["predicted_speedup"] <= ci["high"]
            lines.append(f"| {fam} | {key[6:]} | {plan['groups']} | {m['b_speedup_over_a_exit']:.3f}x "
                         f"{format_interval(ci)} | "
                         f"{m['predicted_speedup']:.3f}x | {100 * m['prediction_error']:+.1f}% | "
                         f"{'yes' if m['prediction_within_ci'] else 'no'} | "
                         f"{plan.get('boundary_us', float('nan')):.1f} | {m['b_speedup_over_a_full']:.3f}x | {m['a']['speedup_vs_plain']:.2f}x -> "
                         f"{m['b']['speedup_vs_plain']:.2f}x | {m['a']['efficiency']:.3f} -> {m['b']['efficiency']:.3f} | "
                         f"{m['exit_agreement'] == 1.0} |")
    write_results(results, args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
