"""Two bundles of one model timed side by side (shared by stage_planning.py and int8_speedup.py).

``compare(a, b, inputs, batch, n, repeats)`` loads both with the torch-free runtime, times them
with ``jei_edge.profile.Passes`` in alternating order within each repeat (exit, ideal, full and
plain passes), and returns per-bundle medians plus the per-repeat ratios ``a / b`` (how much
faster ``b`` is). ``child(...)`` runs it in a fresh process; ``python compare_bundles.py A B
INPUTS BATCH N REPEATS`` is that process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def median(v) -> float:
    return float(np.median(np.asarray(v, dtype=np.float64)))


def compare(a: str, b: str, inputs: str, bsz: int, n: int, repeats: int) -> dict:
    from jei_edge.profile import Passes
    from jei_edge.runtime import Runtime

    assert "torch" not in sys.modules
    with np.load(inputs) as z:
        x = z["x"]
        y = z["y"] if "y" in z.files else None
    rts = {"a": Runtime.load(a, max_batch=bsz), "b": Runtime.load(b, max_batch=bsz)}
    passes = {k: Passes.for_runtime(rt, bsz) for k, rt in rts.items()}
    xs = Passes.batches(x, bsz, n)
    exits = {k: np.concatenate([rt.run(bt).exit_index for bt in xs]) for k, rt in rts.items()}
    preds = {k: np.concatenate([rt.run(bt).pred for bt in xs]) for k, rt in rts.items()}
    reaches = {k: p.reaches(xs) for k, p in passes.items()}
    t = {k: {"exit": [], "full": [], "ideal": [], "plain": []} for k in passes}
    for p in passes.values():
        for _ in range(2):
            p.exit_pass(xs), p.full_pass(xs), p.plain_pass(xs)
    for i in range(repeats):
        for k in (("a", "b") if i % 2 == 0 else ("b", "a")):
            p = passes[k]
            p.prime(xs[0])
            if i % 2 == 0:
                t[k]["ideal"].append(p.ideal_pass(xs, reaches[k]))
                t[k]["exit"].append(p.exit_pass(xs))
            else:
                t[k]["exit"].append(p.exit_pass(xs))
                p.prime(xs[0])
                t[k]["ideal"].append(p.ideal_pass(xs, reaches[k]))
            t[k]["full"].append(p.full_pass(xs))
            t[k]["plain"].append(p.plain_pass(xs))
    rows = len(xs) * bsz
    out = {"batch": bsz, "samples": rows,
           "exit_agreement": float(np.mean(exits["a"] == exits["b"])),
           "prediction_agreement": float(np.mean(preds["a"] == preds["b"]))}
    for mode in ("exit", "full", "plain"):
        out[f"b_speedup_over_a_{mode}"] = median(np.asarray(t["a"][mode]) / np.asarray(t["b"][mode]))
    for k in passes:
        arr = {m: np.asarray(v) for m, v in t[k].items()}
        out[k] = {"stages": rts[k].bundle.num_stages, "exit_ms_per_sample": 1e3 * median(arr["exit"]) / rows,
                  "full_ms_per_sample": 1e3 * median(arr["full"]) / rows,
                  "plain_ms_per_sample": 1e3 * median(arr["plain"]) / rows,
                  "speedup_vs_plain": median(arr["plain"] / arr["exit"]), "realized_speedup": median(arr["full"] / arr["exit"]),
                  "efficiency": median(arr["ideal"] / arr["exit"]),
                  "exit_histogram": np.bincount(exits[k], minlength=rts[k].num_exits).tolist()}
        if y is not None:
            out[k]["accuracy"] = float(np.mean(preds[k] == y[:rows]))
    return out


def child(a, b, inputs, bsz: int, n: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, str(a), str(b), str(inputs), str(bsz), str(n), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge(runs: list) -> dict:
    """Medians across processes of every number (per bundle too); lists from the first run."""
    out = {}
    for key, v in runs[0].items():
        if isinstance(v, dict):
            out[key] = merge([r[key] for r in runs])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = median([r[key] for r in runs])
        else:
            out[key] = v
    return out


if __name__ == "__main__":
    a, b, inputs, bsz, n, repeats = sys.argv[1:7]
    print(json.dumps(compare(a, b, inputs, int(bsz), int(n), int(repeats))))
