"""INT8 vs FP32 on the CPU (onnxruntime), side by side, on the realized-speedup benchmark models.

For each model of ``realized_speedup.py`` (trained on its data, cached in ``runs/bench``) builds
``FAMILY_int8.jei`` (``jei-edge build --precision int8``, the default recipe: exit-aware minmax
calibration on 512 samples of the calibration split, uint8 activations, int8 per-channel weights,
IMs and gates in FP32), then in fresh torch-free processes times the FP32 and INT8 bundles
alternately within each repeat (``compare_bundles.py``) at batch 1 and 64 on the test split:
exit-mode, full-mode and plain-backbone ratios FP32/INT8 (median of per-repeat ratios, median
across processes), accuracy, exit histograms, and exit/prediction agreement with FP32.

    python benchmarks/int8_speedup.py            # ~10 min with the models already trained
    python benchmarks/int8_speedup.py --quick

Results: ``benchmarks/results/int8_speedup.json`` and ``.md``.
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

from compare_bundles import child, merge  # noqa: E402


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
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_speedup.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.processes, args.n1, args.n64 = 3, 1, 40, 128

    import realized_speedup as rs

    from jei_edge.compile import BuildOptions, build_bundle

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": rs.machine(), "command": "python benchmarks/int8_speedup.py" + (" --quick" if args.quick else ""),
               "families": {}}
    for fam in args.families.split(","):
        model = rs.ensure_model(fam, work, log)
        fp32 = rs.ensure_bundle(model, log)
        inputs = rs.test_inputs(model, work)
        int8 = work / f"{fam}_int8.jei"
        if not int8.exists():
            log(f"building {int8.name} (--precision int8)")
            build_bundle(model, int8, BuildOptions(precision="int8", data=rs.DATA, force=True), progress=log)
        report = json.loads((int8 / "report.json").read_text())
        fam_out = {"build": {"decision_agreement_vs_fp32_model": report["decisions"]["agreement"],
                             "prediction_agreement_vs_fp32_model": report["decisions"]["prediction_agreement"],
                             "parity_inputs": report["decisions"]["samples"],
                             "calibration_rows_per_stage": [s["calibration_rows"] for s in report["quantization"]["stages"]],
                             "recipe": report["quantization"]["recipe"]}}
        for bsz in (int(b) for b in args.batches.split(",")):
            n = args.n1 if bsz == 1 else args.n64
            runs = [child(fp32, int8, inputs, bsz, n, args.repeats) for _ in range(args.processes)]
            m = merge(runs)
            m["per_process"] = [{k: r[k] for k in ("b_speedup_over_a_exit", "b_speedup_over_a_full")} for r in runs]
            fam_out[f"batch_{bsz}"] = m
            log(f"  {fam} batch {bsz}: INT8 {m['b_speedup_over_a_exit']:.2f}x faster than FP32 (exit mode), "
                f"{m['b_speedup_over_a_full']:.2f}x (full); accuracy {100 * m['a'].get('accuracy', 0):.1f}% -> "
                f"{100 * m['b'].get('accuracy', 0):.1f}%; exit agreement {100 * m['exit_agreement']:.1f}%")
        results["families"][fam] = fam_out
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# INT8 vs FP32 (CPU, onnxruntime)", "",
             f"Machine: {results['machine']}. Command: `{results['command']}`. Medians over {args.repeats} repeats "
             f"in each of {args.processes} processes; the two bundles alternate within each repeat.", "",
             "| family | batch | INT8 / FP32 speed (exit mode) | (full mode) | (plain backbone) | accuracy FP32 -> INT8 | "
             "exit histogram FP32 / INT8 | exit agreement | INT8 efficiency | INT8 vs plain INT8 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fam, fo in results["families"].items():
        for key, m in ((k, v) for k, v in fo.items() if k.startswith("batch_")):
            lines.append(
                f"| {fam} | {key[6:]} | {m['b_speedup_over_a_exit']:.2f}x | {m['b_speedup_over_a_full']:.2f}x | "
                f"{m['b_speedup_over_a_plain']:.2f}x | {100 * m['a'].get('accuracy', 0):.1f}% -> "
                f"{100 * m['b'].get('accuracy', 0):.1f}% | {m['a']['exit_histogram']} / {m['b']['exit_histogram']} | "
                f"{100 * m['exit_agreement']:.1f}% | {m['b']['efficiency']:.3f} | {m['b']['speedup_vs_plain']:.2f}x |")
    for fam, fo in results["families"].items():
        b = fo["build"]
        lines.append(f"\n- {fam}: build parity vs the FP32 PyTorch model on {b['parity_inputs']} inputs: exit decisions "
                     f"{100 * b['decision_agreement_vs_fp32_model']:.2f}%, predictions "
                     f"{100 * b['prediction_agreement_vs_fp32_model']:.2f}%; exit-aware calibration rows per stage "
                     f"{b['calibration_rows_per_stage']} (recipe '{b['recipe']}')")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
