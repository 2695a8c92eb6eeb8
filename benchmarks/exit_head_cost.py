"""What each stage's exit head (IM + gate + input guard) costs in onnxruntime, at batch 1 and 64.

For every gated stage of a bundle, the stage graph is timed next to its **trunk**: the same graph
cut at ``hidden_out`` (``onnx.utils.extract_model``; the blocks only, no IM, no gate, no probs).
The exit head's cost is the difference. Inputs are real: the stage's input rows of a ``full``
pass of the runtime over the given samples. Both sessions use the package's onnxruntime settings
(``jei_edge.backends.onnxruntime``), timed alternately (``jei_edge.profile.timed_call``); the
head's share is the median of the per-repeat ratios ``(t_stage - t_trunk) / t_stage``.

Usage::

    python benchmarks/exit_head_cost.py runs/bench/vit.jei runs/bench/resnet.jei \\
        --inputs runs/bench/vit_test.npz runs/bench/resnet_test.npz

Results: ``benchmarks/results/exit_head_cost.json`` and ``.md`` (command and commit included).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from realized_speedup import machine  # noqa: E402  (benchmarks/: cpu, cores, onnxruntime, commit)

from jei_edge.backends.onnxruntime.executor import create_session  # noqa: E402
from jei_edge.profile import median  # noqa: E402
from jei_edge.profile.measure import timed_call  # noqa: E402
from jei_edge.runtime import Runtime  # noqa: E402


def trunk_graph(stage_file: Path, input_name: str, out: Path) -> int:
    """The stage graph cut at ``hidden_out``; returns the node count it dropped (the exit head's)."""
    import onnx
    from onnx.utils import extract_model

    extract_model(str(stage_file), str(out), [input_name], ["hidden_out"])
    return len(onnx.load(str(stage_file)).graph.node) - len(onnx.load(str(out)).graph.node)


def measure_bundle(bundle: str, inputs: str, batches, repeats: int, inner: int) -> dict:
    rt = Runtime.load(bundle, max_batch=max(batches))
    with np.load(inputs) as z:
        x = np.ascontiguousarray(z["x"][:max(batches)], dtype=np.float32)
    rt.run(x, mode="full")  # every stage's input buffer now holds real rows
    ws, settings = rt.workspace, rt.executor.settings
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for st in rt.manifest.stages:
            if not st.gates:
                continue
            path = rt.bundle.file(st.file)
            in_name = st.inputs[0].name
            cut = Path(tmp) / f"trunk{st.index}.onnx"
            head_nodes = trunk_graph(path, in_name, cut)
            full = create_session(path, settings, f"stage {st.index}")
            trunk = create_session(cut, settings, f"trunk {st.index}")
            feed_all = np.array(ws.stage_input(st.index)[:max(batches)])
            row = {"stage": st.index, "exits": list(st.exits), "head_nodes": head_nodes}
            for b in batches:
                feed = {in_name: np.ascontiguousarray(feed_all[:b])}
                ts, tt, share = [], [], []
                for _ in range(3):
                    full.run(None, feed)
                    trunk.run(None, feed)
                for i in range(repeats):
                    a = b_ = 0.0
                    for _ in range(inner):
                        if i % 2:
                            b_ += timed_call(trunk.run, None, feed)[1]
                            a += timed_call(full.run, None, feed)[1]
                        else:
                            a += timed_call(full.run, None, feed)[1]
                            b_ += timed_call(trunk.run, None, feed)[1]
                    ts.append(a / inner)
                    tt.append(b_ / inner)
                    share.append((a - b_) / a)
                row[f"batch_{b}"] = {"stage_us": 1e6 * median(ts), "trunk_us": 1e6 * median(tt),
                                     "head_us": 1e6 * (median(ts) - median(tt)), "head_share": median(share)}
            rows.append(row)
    rt.close()
    return {"bundle": bundle, "stages": rows}


def markdown(res: dict) -> str:
    lines = ["# Exit-head cost per stage (onnxruntime, CPU)", "",
             f"Command: `{res['command']}`; commit {res['machine']['commit']}; {res['machine']['cpu']}, "
             f"{res['machine']['cores']} cores; onnxruntime {res['machine']['onnxruntime']}. Head = stage graph minus its trunk (cut at hidden_out); "
             "share = median of per-repeat (stage - trunk) / stage.", "",
             "| bundle | stage | head nodes | batch | stage us | trunk us | head us | head share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["bundles"]:
        for s in r["stages"]:
            for key in sorted((k for k in s if k.startswith("batch_")), key=lambda k: int(k[6:])):
                b = s[key]
                lines.append(f"| {Path(r['bundle']).name} | {s['stage']} | {s['head_nodes']} | {key[6:]} | "
                             f"{b['stage_us']:.1f} | {b['trunk_us']:.1f} | {b['head_us']:.1f} | "
                             f"{100 * b['head_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--inputs", nargs="+", required=True, help="one .npz (array x) per bundle")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=20, help="runs of each graph per repeat")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "exit_head_cost.json"))
    args = p.parse_args(argv)
    if len(args.inputs) != len(args.bundles):
        p.error("give one --inputs file per bundle")
    batches = [int(b) for b in args.batches.split(",")]
    res = {"command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix()] + (argv or sys.argv[1:])),
           "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "bundles": []}
    for bundle, inputs in zip(args.bundles, args.inputs):
        print(f"[{time.strftime('%H:%M:%S')}] {bundle}", file=sys.stderr, flush=True)
        res["bundles"].append(measure_bundle(bundle, inputs, batches, args.repeats, args.inner))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
