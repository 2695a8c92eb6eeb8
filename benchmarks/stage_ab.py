"""Each stage of two builds of the same model, side by side: is bundle B's stage k faster than A's?

For the stage-graph changes of a build (an edge layout, a fused op) the end-to-end benchmarks mix
in every other stage and the host's drift between runs; this times stage k of bundle A and of
bundle B alternately within each repeat, in one process, with the package's onnxruntime settings
(``jei_edge.backends.onnxruntime``; each bundle's own executor settings, so per-graph switches such
as ``qdq_propagation`` apply as in the runtime). Inputs are real: each stage's input rows of a
``full`` pass of that bundle's runtime over the given samples (in that bundle's edge layout and
dtype). The plain graphs are timed the same way on the samples themselves (row "plain"), since a
graph pass changes them too. Reported per stage and batch size: both medians and the median of the per-repeat ratios
A/B (> 1: B is faster) with its distribution-free confidence interval
(``jei_edge.profile.median_ci``).

Usage::

    python benchmarks/stage_ab.py runs/bench_new/old_nchw/resnet18_int8.jei runs/bench_new/old_head/resnet18_int8.jei \\
        --inputs runs/bench_new/resnet18_test.npz --out benchmarks/results/stage_ab_resnet18_int8.json

Results: ``--out`` (JSON) and the same name with ``.md`` (command and commit included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from realized_speedup import machine  # noqa: E402  (benchmarks/: cpu, isa, cores, onnxruntime, commit)

from jei_edge.backends.onnxruntime.executor import create_session  # noqa: E402
from jei_edge.profile import median  # noqa: E402
from jei_edge.profile.measure import median_ci, timed_call  # noqa: E402
from jei_edge.runtime import Runtime  # noqa: E402


def stage_feeds(bundle: str, x: np.ndarray):
    """``(runtime, [(session, input name, rows)] per stage, then the plain graph on x)``: real input
    rows of every stage."""
    rt = Runtime.load(bundle, max_batch=len(x))
    rt.run(x, mode="full")  # every stage's input buffer now holds real rows
    out = []
    for st in rt.manifest.stages:
        sess = create_session(rt.bundle.file(st.file), rt.executor.settings, f"stage {st.index}")
        out.append((sess, st.inputs[0].name, np.array(rt.workspace.stage_input(st.index)[:len(x)])))
    plain = rt.manifest.plain
    out.append((create_session(rt.bundle.file(plain.file), rt.executor.settings, "plain"), plain.inputs[0].name, x))
    return rt, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="bundle A (the baseline)")
    p.add_argument("b", help="bundle B (the change)")
    p.add_argument("--inputs", required=True, help=".npz with array x (model inputs)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=10, help="runs of each graph per repeat")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    with np.load(args.inputs) as z:
        x = np.ascontiguousarray(z["x"][:max(batches)], dtype=np.float32)
    if len(x) < max(batches):
        p.error(f"{args.inputs} holds {len(x)} samples, fewer than the largest batch {max(batches)}")
    rt_a, feeds_a = stage_feeds(args.a, x)
    rt_b, feeds_b = stage_feeds(args.b, x)
    if len(feeds_a) != len(feeds_b):
        p.error(f"the bundles have {len(feeds_a)} and {len(feeds_b)} stages: not two builds of one plan")
    rows = []
    for k, ((sa, na, xa), (sb, nb, xb)) in enumerate(zip(feeds_a, feeds_b)):
        print(f"[{time.strftime('%H:%M:%S')}] stage {k}", file=sys.stderr, flush=True)
        row = {"stage": k if k < len(feeds_a) - 1 else "plain", "input_a": f"{xa.dtype}{list(xa.shape[1:])}", "input_b": f"{xb.dtype}{list(xb.shape[1:])}"}
        for bsz in batches:
            fa, fb = {na: np.ascontiguousarray(xa[:bsz])}, {nb: np.ascontiguousarray(xb[:bsz])}
            for _ in range(3):
                sa.run(None, fa)
                sb.run(None, fb)
            ta, tb, ratio = [], [], []
            for i in range(args.repeats):
                order = ((sa, fa, ta), (sb, fb, tb)) if i % 2 == 0 else ((sb, fb, tb), (sa, fa, ta))
                for sess, feed, acc in order:
                    acc.append(sum(timed_call(sess.run, None, feed)[1] for _ in range(args.inner)) / args.inner)
                ratio.append(ta[-1] / tb[-1])
            ci = median_ci(ratio)
            row[f"batch_{bsz}"] = {"a_us": 1e6 * median(ta), "b_us": 1e6 * median(tb), "a_over_b": ci["median"],
                                   "ci": [ci["low"], ci["high"]], "coverage": ci["coverage"]}
        rows.append(row)
    rt_a.close()
    rt_b.close()
    cmd = "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix()] + (argv or sys.argv[1:]))
    res = {"command": cmd, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "a": args.a, "b": args.b,
           "repeats": args.repeats, "inner": args.inner, "stages": rows}
    lines = ["# Stage by stage, bundle A vs bundle B (onnxruntime, CPU)", "",
             f"Command: `{cmd}`; commit {res['machine']['commit']}; {res['machine']['cpu']}, {res['machine']['cores']} cores; "
             f"onnxruntime {res['machine']['onnxruntime']}. A = `{args.a}`, B = `{args.b}`; {args.repeats} repeats of "
             f"{args.inner} runs each, A and B alternating; A/B = median of per-repeat ratios (> 1: B faster) [CI].", "",
             "| stage | input A | input B | batch | A us | B us | A/B [CI] |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for bsz in batches:
            m = r[f"batch_{bsz}"]
            lines.append(f"| {r['stage']} | {r['input_a']} | {r['input_b']} | {bsz} | {m['a_us']:.1f} | {m['b_us']:.1f} | "
                         f"{m['a_over_b']:.3f} [{m['ci'][0]:.3f}-{m['ci'][1]:.3f}] |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
