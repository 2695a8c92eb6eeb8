"""Profile reports: a text table, a JSON file and a PNG (matplotlib, the ``plots`` extra)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict

from jei_edge._deps import require
from jei_edge._io import atomic_write_bytes
from jei_edge.profile.measure import format_interval
from jei_edge.runtime.output import split_settings


def format_profile(info: Dict[str, Any]) -> str:
    ex = info["exits"]
    lines = [
        f"{info['bundle']}: {info['samples']} samples, device {info['device']}, {info['stages']} stages, "
        f"medians over {info['repeats']} repeats",
        f"  offsets    {info.get('offsets_used', 'offsets 0')}",
        f"  exits      {ex['histogram']} (mean cost {ex['mean_cost']:.3f} of the full model, "
        f"{ex['mean_cost_vs_plain']:.3f} of the plain backbone)",
        f"  theoretical speedup (MACs)  {ex['theoretical_speedup']:.2f}x vs full depth, "
        f"{ex['theoretical_speedup_vs_plain']:.2f}x vs plain backbone",
    ]
    if info.get("accuracy"):
        a = info["accuracy"]
        lines.append(f"  accuracy   {100 * a['exit']:.2f}% with early exit, {100 * a['full']:.2f}% at full depth")
    lines += ["", f"  {'batch':>5}  {'exit ms/smp':>11}  {'full ms/smp':>11}  {'plain ms/smp':>12}  {'realized':>8}  "
                  f"{'vs plain':>8}  {'efficiency':>10}  {'samples/s':>9}  {'p50/p99 ms/call':>15}"]
    for bsz, b in info["batches"].items():
        plain = f"{b['plain_ms_per_sample']:12.3f}" if "plain_ms_per_sample" in b else f"{'-':>12}"
        vsp = f"{b['speedup_vs_plain']:7.2f}x" if "speedup_vs_plain" in b else f"{'-':>8}"
        lat = b["latency_ms_per_call"]
        lines.append(f"  {bsz:>5}  {b['exit_ms_per_sample']:11.3f}  {b['full_ms_per_sample']:11.3f}  {plain}  "
                     f"{b['realized_speedup']:7.2f}x  {vsp}  {b['efficiency']:10.3f}  {b['throughput_exit']:9.0f}  "
                     f"{lat['p50']:7.3f}/{lat['p99']:.3f}")
    cis = [(bsz, b) for bsz, b in info["batches"].items() if b.get("efficiency_ci")]
    if cis:
        cov = min(b["efficiency_ci"]["coverage"] for _, b in cis)
        lines += ["", f"  confidence intervals of the medians (order statistics of the repeats, >= {100 * cov:.0f}%; "
                      "narrow them with --repeats)"]
        for bsz, b in cis:
            parts = [f"{name} {format_interval(b[key])}"
                     for name, key in (("realized", "realized_speedup_ci"), ("vs plain", "speedup_vs_plain_ci"),
                                       ("efficiency", "efficiency_ci")) if b.get(key)]
            lines.append(f"  {bsz:>5}  " + "  ".join(parts))
    sizes = list(info["batches"])
    lines += ["", "  stage latency (stage alone on a full batch, ms) and rows reaching it"]
    lines.append("  " + f"{'stage':>5}" + "".join(f"  {'t(' + s + ')':>9}  {'reach@' + s:>9}" for s in sizes))
    for k in range(info["stages"]):
        row = f"  {k:>5}"
        for s in sizes:
            b = info["batches"][s]
            row += f"  {b['stage_ms'][k]:9.3f}  {b['reach_total'][k]:9d}"
        lines.append(row)
    if info.get("compare_settings"):
        lines += ["", "  other settings, timed side by side (early-exit ms/sample, speedup over the current settings "
                      "[95% CI])"]
        for label in info["compare_settings"]:
            cells = []
            for bsz, b in info["batches"].items():
                c = b["compare"][label]
                cells.append(f"b{bsz} {c['ms_per_sample']:.3f} ms {c['speedup']:.2f}x {format_interval(c['speedup_ci'], 2)}"
                             + ("" if c["same_exits"] else " (exits differ)"))
            lines.append(f"  {label}: " + "; ".join(cells))
        best = info.get("best_settings") or {}
        picked = sorted({v["label"] for v in best.values() if v["label"] != "current"})
        lines.append("  fastest: " + "; ".join(
            f"batch {s} {v['label']}" + (f" ({v['speedup']:.2f}x)" if v["label"] != "current" else " (no other is "
                                                                                               "measurably faster)")
            for s, v in best.items()))
        for label in picked:
            lines.append(f"  run with {label}: " + " ".join(f"--backend-opt {kv}" for kv in split_settings(label)))
    lines.append("")
    lines.append("  realized = full-depth time / early-exit time; vs plain = one-graph backbone time / early-exit "
                 "time; efficiency = stage runs alone / early-exit time (1.0: the runtime's own work is free)")
    return "\n".join(lines)


def write_json(info: Dict[str, Any], path) -> Path:
    path = Path(path)
    data = (json.dumps(info, indent=1) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))
    return path


def plot_profile(info: Dict[str, Any], path) -> Path:
    """Three panels: per-stage latency (per row) by batch size, the exit histogram with each
    exit's cost, and theoretical vs realized speedups by batch size. Written atomically."""
    matplotlib = require("matplotlib", purpose="the profile plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = info["exits"]
    sizes = list(info["batches"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    k = list(range(info["stages"]))
    width = 0.8 / max(len(sizes), 1)
    for j, s in enumerate(sizes):
        b = info["batches"][s]
        per_row = [1e3 * t / int(s) for t in b["stage_ms"]]
        ax.bar([i + (j - (len(sizes) - 1) / 2) * width for i in k], per_row, width, label=f"batch {s}")
    ax.set_xlabel("stage")
    ax.set_ylabel("us per row (stage alone)")
    ax.set_title("Stage latency")
    ax.set_xticks(k)
    ax.legend()

    ax = axes[1]
    exits = list(range(len(ex["histogram"])))
    ax.bar(exits, [100 * f for f in ex["fraction"]], color="tab:green")
    ax.set_xlabel("exit")
    ax.set_ylabel("% of samples")
    ax.set_xticks(exits)
    ax.set_title(f"Exits ({info['samples']} samples, mean cost {ex['mean_cost']:.2f})")
    twin = ax.twinx()
    twin.plot(exits, ex["cost"], "o-", color="tab:gray")
    twin.set_ylabel("cost of the exit (fraction of full MACs)")
    twin.set_ylim(0, 1.05)

    ax = axes[2]
    groups = [("theoretical (MACs)", lambda b: ex["theoretical_speedup"]),
              ("realized (full / exit)", lambda b: b["realized_speedup"]),
              ("vs plain backbone", lambda b: b.get("speedup_vs_plain", 0.0))]
    width = 0.8 / len(groups)
    for j, (name, get) in enumerate(groups):
        vals = [get(info["batches"][s]) for s in sizes]
        xs = [i + (j - 1) * width for i in range(len(sizes))]
        ax.bar(xs, vals, width, label=name)
        for xv, v in zip(xs, vals):
            ax.text(xv, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    top = max([ex["theoretical_speedup"]] + [g(info["batches"][s]) for _, g in groups for s in sizes])
    ax.set_ylim(0, 1.3 * top)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"batch {s}\neff. {info['batches'][s]['efficiency']:.3f}" for s in sizes])
    ax.set_ylabel("speedup (x)")
    ax.set_title("Speedup")
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{Path(info['bundle']).name} on {info['device']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return path
