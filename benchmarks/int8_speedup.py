"""INT8 vs FP32 on the CPU (onnxruntime), side by side, on the realized-speedup benchmark models.

For each model of ``realized_speedup.py`` (the trained ``vit`` and ``resnet``, cached in
``runs/bench``; with ``--families vit,resnet,resnet18,vits16`` also the untrained deployment-size
declared models, at ``realized_speedup.LARGE``'s sample counts, one process, ``--large-repeats``
repeats) builds ``FAMILY_int8.jei`` (``jei-edge build --precision int8``, the default recipe: exit-aware minmax
calibration on 512 samples of the calibration split, uint8 activations, int8 per-channel weights,
IMs and gates in FP32), then in fresh torch-free processes times the FP32 and INT8 bundles
alternately within each repeat (``compare_bundles.py``) at batch 1 and 64 on the test split:
exit-mode, full-mode and plain-backbone ratios FP32/INT8 (median of per-repeat ratios, median
across processes), accuracy, exit histograms, and exit/prediction agreement with FP32. Threshold
offsets are ``realized_speedup.spread_offsets``' (that benchmark's operating point): the trained
models' offsets 0 unless their exits are degenerate (then spread evenly over every exit, as they
are for these two), the declared models' declared offsets.

    python benchmarks/int8_speedup.py            # ~10 min with the models already trained
    python benchmarks/int8_speedup.py --quick
    python benchmarks/int8_speedup.py --families vit,resnet,resnet18,vits16 --large-repeats 7
    python benchmarks/int8_speedup.py --edges fp32 --out benchmarks/results/int8_speedup_fp32_edges.json

``--edges auto|int8|fp32`` (``jei-edge build --int8-edges / --fp32-edges``; default ``auto``: the
build's default, quantized edges where the next stage quantizes its input) picks how hidden states
cross the INT8 bundle's stage edges (bundle ``FAMILY_int8.jei``, or ``FAMILY_int8_EDGESedges.jei``);
``--min-agreement F`` is the build's INT8 agreement floor (default 0.95, which the build holds by
keeping the fewest stages FP32 that hold it, ``--int8-fallback auto``; another floor builds
``FAMILY_int8_floorF.jei``); ``--calibration NAME|FILE``
the build's recipe (default ``default``; another one builds ``FAMILY_int8_NAME.jei``), e.g.
``stem`` (calibration/stem.toml) to quantize the stem too.

Results: ``benchmarks/results/int8_speedup.json`` and ``.md``; ``--render RESULTS.json`` writes a
results file's ``.md`` again (after a change to the table) without timing anything.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_bundles import own_flags, run_comparison, write_results  # noqa: E402


def gain_parts(m) -> dict:
    """The gain ratio's parts: INT8's gain (FP32 time / INT8 time, ratio of the two medians) on the
    exit pass, in full mode and on the exit pass's own stage runs, each over the plain graph's gain.
    "Stage runs" is the ideal of the efficiency figure (each stage on the rows that reach it, none
    of the runtime's work between them; ideal = efficiency x exit time): below 1 it is the stage
    graphs and the exit mix, not the runtime; full mode runs every stage on every row, so the gap
    between full mode and stage runs is the exit mix (early stages weighing more)."""
    a, b = m["a"], m["b"]
    plain = a["plain_ms_per_sample"] / b["plain_ms_per_sample"]
    ideal = (a["efficiency"] * a["exit_ms_per_sample"]) / (b["efficiency"] * b["exit_ms_per_sample"])
    return {"exit": a["exit_ms_per_sample"] / b["exit_ms_per_sample"] / plain,
            "full": a["full_ms_per_sample"] / b["full_ms_per_sample"] / plain, "stage_runs": ideal / plain}


def build_record(bundle: Path) -> dict:
    """What the results keep of an INT8 bundle's build report (parity, floor, recipe, fallback, edges)."""
    report = json.loads((bundle / "report.json").read_text())
    d, q = report["decisions"], report["quantization"]
    return {"decision_agreement_vs_fp32_model": d["agreement"], "prediction_agreement_vs_fp32_model":
            d["prediction_agreement"], "parity_inputs": d["samples"], "recipe": q["recipe"],
            "calibration_rows_per_stage": [s["calibration_rows"] for s in q["stages"]],
            "floor_on": d.get("floor_on"), "floor_agreement": d.get("floor_agreement"),
            "synthetic_agreement": d.get("synthetic_agreement"), "agreement_by_kind": d.get("agreement_by_kind"),
            "min_agreement": d.get("min_agreement"), "fallback": q.get("fallback") or {}, "edges": q.get("edges", "fp32")}


def build_note(fam: str, b: dict) -> str:
    floor = b.get("floor_agreement")
    held = "" if floor is None else (
        f" (on {b['floor_on']}: {100 * floor:.2f}%, the default floor of 95% "
        f"{'held' if floor >= 0.95 else 'NOT held: built with --min-agreement ' + str(b.get('min_agreement'))}; "
        f"synthetic inputs apart: {100 * (b.get('synthetic_agreement') or 0):.2f}%)")
    fb = b.get("fallback") or {}
    if fb.get("fp32_stages"):
        held += (f"; stage(s) {', '.join(map(str, fb['fp32_stages']))} kept in FP32 by the build's fallback "
                 f"(fully quantized: {100 * fb['agreement_all_int8']:.2f}% of {fb['inputs']} calibration inputs)")
    edges = b.get("edges", "fp32")
    edge_types = "fp32" if isinstance(edges, str) else "/".join(e["dtype"] for e in edges)
    return (f"- {fam}: build parity vs the FP32 PyTorch model on {b['parity_inputs']} inputs: exit decisions "
            f"{100 * b['decision_agreement_vs_fp32_model']:.2f}%{held}, predictions "
            f"{100 * b['prediction_agreement_vs_fp32_model']:.2f}%; exit-aware calibration rows per stage "
            f"{b['calibration_rows_per_stage']} (recipe '{b['recipe']}'); stage edges {edge_types}")


def int8_build(fam: str, data: str, edges: str = "auto", calibration: str = "default", min_agreement: float = 0.95):
    """``(bundle name in --work, BuildOptions, what)`` of a family's INT8 bundle (a stage per exit):
    the one name every benchmark builds or reuses it under (non-default settings in the name)."""
    from jei_edge.compile import BuildOptions

    suffix = ("" if edges == "auto" else f"_{edges}edges") \
        + ("" if calibration == "default" else f"_{Path(calibration).stem}") \
        + ("" if min_agreement == 0.95 else f"_floor{min_agreement:g}")
    return (f"{fam}_int8{suffix}.jei",
            BuildOptions(precision="int8", data=data, force=True, min_agreement=min_agreement, calibration=calibration,
                         quantized_edges={"auto": None, "int8": True, "fp32": False}[edges]),
            f"--precision int8 (edges {edges}, calibration {calibration})")


def main(argv=None) -> int:
    import argparse

    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--edges", choices=("auto", "int8", "fp32"), default="auto")
    own.add_argument("--min-agreement", type=float, default=0.95)
    own.add_argument("--calibration", default="default")
    own.add_argument("--render", metavar="RESULTS.json",
                     help="write RESULTS.md again from a results file of this benchmark (no timing)")
    opts, argv = own.parse_known_args(argv)
    if opts.render:
        results = json.loads(Path(opts.render).read_text())
        render(results, opts.render)
        return 0
    def int8(fam, bsz, data):
        return int8_build(fam, data, opts.edges, opts.calibration, opts.min_agreement)

    args, results = run_comparison(__doc__, __file__, int8, argv, spread=True, flags=own_flags(own, opts))
    results["edges"] = opts.edges
    render(results, args.out)
    return 0


def render(results: dict, out: str) -> None:
    """The results' table and notes, written with the results to ``out`` (.json) and its .md."""
    from jei_edge.profile import format_interval

    lines = ["# INT8 vs FP32 (CPU, onnxruntime)", "",
             f"Machine: {results['machine']}. Command: `{results['command']}` (INT8 stage edges: {results.get('edges', 'fp32')}). "
             f"Medians over repeats (per family below) in each of the family's processes (median across them); "
             f"the two bundles alternate within each repeat. Load average (1/5/15 min) before / after: "
             f"{results['load_before']} / {results['load_after']}. Threshold offsets: `realized_speedup.spread_offsets` "
             f"(trained models: offsets 0 unless their exits are degenerate, then spread evenly over every exit; "
             f"declared models: their declared offsets); the exit histograms are of the timed rows. "
             f"Per-repeat gain ratio: (FP32/INT8 exit-mode time) / (FP32/INT8 plain time) within each repeat, its "
             f"median and distribution-free confidence interval over every repeat of every process "
             f"(`jei_edge.profile.median_ci`). Its parts (`gain_parts`): INT8's gain over the plain graph's as "
             f"ratios of the medians, for the exit pass, full mode and the exit pass's own stage runs (the ideal: "
             f"no runtime work between them); stage runs below 1 is the stage graphs and the exit mix, not the "
             f"runtime.", "",
             "| family | batch | INT8 / FP32 speed (exit mode) | (full mode) | (plain backbone) | accuracy FP32 -> INT8 | "
             "exit histogram FP32 / INT8 | exit agreement | INT8 efficiency | INT8 vs plain INT8 | "
             "theoretical vs plain (MACs, INT8 exits) | INT8 measured / theoretical (goal >= 0.9) | "
             "staged INT8 gain / plain INT8 gain (goal >= 0.9) | per-repeat gain ratio [CI] | "
             "parts, ratios of medians: exit pass / full mode / stage runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for fam, fo in results["families"].items():
        batches = {k: m for k, m in fo.items() if k.startswith("batch_")}
        for key, m in batches.items():
            parts = gain_parts(m)
            ci = m.get("exit_gain_over_plain_gain_ci")  # results before it was recorded have none
            per_repeat = f"{ci['median']:.2f} {format_interval(ci, 2)}" if ci else "-"
            lines.append(
                f"| {fam} | {key[6:]} | {m['b_speedup_over_a_exit']:.2f}x | {m['b_speedup_over_a_full']:.2f}x | "
                f"{m['b_speedup_over_a_plain']:.2f}x | {100 * m['a'].get('accuracy', 0):.1f}% -> "
                f"{100 * m['b'].get('accuracy', 0):.1f}% | {m['a']['exit_histogram']} / {m['b']['exit_histogram']} | "
                f"{100 * m['exit_agreement']:.1f}% | {m['b']['efficiency']:.3f} | {m['b']['speedup_vs_plain']:.2f}x | "
                f"{m['b']['theoretical_speedup_vs_plain']:.2f}x | {m['b']['speedup_vs_plain_over_theory']:.2f} | "
                f"{m['b_speedup_over_a_exit'] / m['b_speedup_over_a_plain']:.2f} "
                f"({'met' if m['b_speedup_over_a_exit'] >= 0.9 * m['b_speedup_over_a_plain'] else 'NOT met'}) | "
                f"{per_repeat} | "
                f"{parts['exit']:.2f} / {parts['full']:.2f} / {parts['stage_runs']:.2f} |")
        if "build" not in fo:  # a fresh run: the INT8 bundle's build record (a re-render keeps the recorded one)
            fo["build"] = build_record(Path(next(iter(batches.values()))["b_bundle"]))
        if fo["build"].get("min_agreement") is None:  # records before it was kept: the command's floor
            floor = re.search(r"--min-agreement (\S+)", results["command"])
            fo["build"]["min_agreement"] = float(floor.group(1)) if floor else 0.95
        notes.append(build_note(fam, fo["build"]))
        lim, offs = results["limits"][fam], results["offsets"][fam]
        notes.append(f"  - timing: {lim['repeats']} repeats x {lim['processes']} process(es), {lim['n1']} samples at "
                     f"batch 1, {lim['n64']} rows at batch 64; offsets "
                     f"{'0' if offs is None else [round(v, 3) for v in offs]}")
    write_results(results, out, lines + [""] + notes)


if __name__ == "__main__":
    sys.exit(main())
