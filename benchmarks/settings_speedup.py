"""One bundle under two onnxruntime settings, side by side: what a settings change does to every pass.

For each benchmark model of ``realized_speedup.py`` (its FP32 bundle with a stage per exit, at
that benchmark's operating point), fresh torch-free processes time the bundle with settings A and
with settings B (``--a`` / ``--b``, ``KEY=VALUE[,KEY=VALUE]`` as ``jei-edge run --backend-opt``
takes them; B's over A's) with the package's protocol (``compare_bundles.compare``: exit, full,
ideal and plain passes, A and B alternating within each repeat). Reported per batch size: B's
speedup over A for the exit pass (per-repeat ratios, with their confidence interval), full mode
and the plain backbone (which runs on the same settings), and for each side its speedup vs the
plain backbone, measured / MAC-theoretical and efficiency. ``row_workers.py`` times the exit pass
only; this also shows whether the plain graph gains more or less than the stages.

    python benchmarks/settings_speedup.py --work runs/bench_new --families quickstart,vit,resnet,resnet18,vits16

Default: ``--a allow_spinning=false --b allow_spinning=true`` (pools spinning inside a run, the
default since 2026-12-01, against no spinning). Results: ``benchmarks/results/settings_speedup.json``
and ``.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_bundles import own_flags, run_comparison, write_results  # noqa: E402


def main(argv=None) -> int:
    import argparse

    from jei_edge.backends.onnxruntime import OrtSettings
    from jei_edge.compile import BuildOptions
    from jei_edge.errors import JeiEdgeError
    from jei_edge.runtime.output import parse_backend_options, split_settings

    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--a", default="allow_spinning=false", help="settings A (KEY=VALUE[,KEY=VALUE])")
    own.add_argument("--b", default="allow_spinning=true", help="settings B, over A's")
    opts, argv = own.parse_known_args(argv)
    try:  # refused here, before any model is prepared, rather than in the first measurement process
        settings = tuple(parse_backend_options(split_settings(v)) for v in (opts.a, opts.b))
        OrtSettings.from_options(settings[1], base=OrtSettings.from_options(settings[0]))
    except JeiEdgeError as e:
        raise SystemExit(f"error: {e}")

    def same_bundle(fam, bsz, data):  # B is A's bundle, which compare_families has just ensured
        return f"{fam}.jei", BuildOptions(force=True), "fp32, a stage per exit"

    args, res = run_comparison(__doc__, __file__, same_bundle, argv, spread=True, flags=own_flags(own, opts),
                               settings=settings)
    res["settings"] = {"a": opts.a, "b": opts.b}
    write_results(res, args.out, table(res))
    return 0


def table(res: dict) -> list:
    """The results' markdown lines (``res``: ``compare_families``' results with ``settings``)."""
    from jei_edge.profile import format_interval

    lines = ["# onnxruntime settings side by side: every pass (CPU)", "",
             f"Machine: {res['machine']}. Command: `{res['command']}`. A = `{res['settings']['a']}`, "
             f"B = `{res['settings']['b']}` (over A's), the same bundle; load average before / after "
             f"{res['load_before']} / {res['load_after']}. B's speedup over A: per-repeat ratios A time / B time, "
             f"median [95% CI over every repeat of every process] for the exit pass, medians of ratios for full "
             f"mode and the plain backbone (it runs on the same settings as the stages).", "",
             "| family | batch | B over A: exit [CI] | full | plain | vs plain A / B | measured / theoretical A / B "
             "| efficiency A / B |", "|---|---|---|---|---|---|---|---|"]
    for fam, fo in res["families"].items():
        for key, m in fo.items():
            a, b = m["a"], m["b"]
            lines.append(
                f"| {fam} | {key[6:]} | {m['b_speedup_over_a_exit']:.2f}x "
                f"{format_interval(m['b_speedup_over_a_exit_ci'], 2)} | {m['b_speedup_over_a_full']:.2f}x | "
                f"{m['b_speedup_over_a_plain']:.2f}x | {a['speedup_vs_plain']:.2f}x / {b['speedup_vs_plain']:.2f}x | "
                f"{a['speedup_vs_plain_over_theory']:.2f} / {b['speedup_vs_plain_over_theory']:.2f} | "
                f"{a['efficiency']:.3f} / {b['efficiency']:.3f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
