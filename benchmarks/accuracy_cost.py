"""Accuracy-cost curves: JEI-DNN vs max-softmax thresholding on the same IMs.

For every (data source, backbone family, seed) one backbone is trained, then one JEI model per
lambda is trained from it (IM warm-up + bi-level + conformal calibration; what the reference does
too: the backbone is trained once and frozen). Each JEI model is evaluated on the test split next
to the thresholding baseline on *its own* IMs (geometric budgets q^k fitted on validation), and
compared at matched mean cost (baseline curve interpolated at the JEI model's cost).

Writes ``benchmarks/results/accuracy_cost.json`` (every run + summary) and ``accuracy_cost.png``.

Usage::

    python benchmarks/accuracy_cost.py                 # full run (~20-30 min on 2 CPU cores)
    python benchmarks/accuracy_cost.py --quick         # smoke run (a minute or two)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0)
ALPHA_REPORT = 0.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", default="digits,synthetic", help="comma-separated data sources")
    p.add_argument("--backbones", default="vit,resnet", help="comma-separated backbone names")
    p.add_argument("--lambdas", default=",".join(str(v) for v in DEFAULT_LAMBDAS))
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (model init, batches and data split)")
    p.add_argument("--backbone-epochs", type=int, default=None, help="override (default: TrainConfig's)")
    p.add_argument("--min-steps", type=int, default=None, help="override bi-level min_steps")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 1 seed, 2 lambdas, short training")
    p.add_argument("--out", default=str(HERE / "results" / "accuracy_cost"), help="output path without extension")
    return p.parse_args(argv)


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor()}


def one_family(source: str, backbone: str, seed: int, lambdas, overrides: dict, workdir: Path) -> list:
    """Train one backbone, then one JEI model per lambda; return one record per lambda."""
    import torch

    from jei_edge.data import load_data
    from jei_edge.train import TrainConfig, train_jei
    from jei_edge.train.evaluate import evaluate_checkpoint

    data = load_data(source, seed=seed)
    base = TrainConfig(backbone=backbone, seed=seed, **overrides)
    t0 = time.perf_counter()
    first = train_jei(replace(base, epochs=0, min_steps=0, im_epochs=0), data,
                      progress=False)
    backbone_s = time.perf_counter() - t0
    weights = workdir / f"{source.replace(':', '_')}_{backbone}_{seed}.pt"
    torch.save({k: v for k, v in first["state_dict"].items() if k.split(".")[0] in ("stem", "blocks", "head")},
               weights)
    runs = []
    for lam in lambdas:
        t1 = time.perf_counter()
        cfg = replace(base, lam=lam, backbone_weights=str(weights), backbone_epochs=0)
        ckpt = train_jei(cfg, data, progress=False)
        heads_s = time.perf_counter() - t1
        ev = evaluate_checkpoint(ckpt, data)
        jei, at = ev["jei"], ev["baseline"]["at_jei_cost"]
        conf_j = next(c for c in jei["conformal"] if abs(c["alpha"] - ALPHA_REPORT) < 1e-9)
        conf_b = next(c for c in at["conformal"] if abs(c["alpha"] - ALPHA_REPORT) < 1e-9)
        rec = {
            "source": source, "backbone": backbone, "seed": seed, "lambda": lam,
            "n_test": ev["n_test"], "backbone_seconds": round(backbone_s, 1), "heads_seconds": round(heads_s, 1),
            "backbone_val_accuracy": first["training"]["backbone"].get("best_val_accuracy"),
            "per_exit_accuracy": ev["per_exit_accuracy"], "costs": ev["costs"],
            "jei": {k: jei[k] for k in ("accuracy", "mean_cost", "mean_cost_vs_plain", "exit_histogram", "ece")},
            "jei_conformal": jei["conformal"],
            "baseline_at_jei_cost": {"interpolated_accuracy": at["interpolated_accuracy"], "q": at["q"],
                                     "nearest_accuracy": at["accuracy"], "nearest_cost": at["mean_cost"],
                                     "ece": at["ece"], "exit_histogram": at["exit_histogram"]},
            "baseline_conformal": at["conformal"],
            "set_size_at_alpha": {"alpha": ALPHA_REPORT, "jei": conf_j["mean_set_size"],
                                  "jei_coverage": conf_j["coverage"], "baseline": conf_b["mean_set_size"],
                                  "baseline_coverage": conf_b["coverage"]},
            "baseline_curve": [{"q": p["q"], "accuracy": p["accuracy"], "mean_cost": p["mean_cost"]}
                               for p in ev["baseline"]["curve"]],
        }
        rec["delta_accuracy"] = rec["jei"]["accuracy"] - rec["baseline_at_jei_cost"]["interpolated_accuracy"]
        runs.append(rec)
        print(f"  {source:<10} {backbone:<7} seed {seed} lambda {lam:<5g} JEI acc {rec['jei']['accuracy']:.4f} "
              f"cost {rec['jei']['mean_cost']:.3f} | baseline {rec['baseline_at_jei_cost']['interpolated_accuracy']:.4f}"
              f" | ECE {rec['jei']['ece']:.2f} vs {at['ece']:.2f} | set@{ALPHA_REPORT} {conf_j['mean_set_size']:.2f} "
              f"vs {conf_b['mean_set_size']:.2f} | exits {rec['jei']['exit_histogram']}", flush=True)
    return runs


def summarize(runs: list) -> list:
    """Mean +- std over seeds per (source, backbone, lambda)."""
    out = []
    keys = sorted({(r["source"], r["backbone"], r["lambda"]) for r in runs}, key=lambda k: (k[0], k[1], k[2]))
    for src, bb, lam in keys:
        rs = [r for r in runs if (r["source"], r["backbone"], r["lambda"]) == (src, bb, lam)]

        def stat(f):
            v = np.array([f(r) for r in rs], dtype=float)
            return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

        out.append({
            "source": src, "backbone": bb, "lambda": lam, "seeds": len(rs),
            "jei_accuracy": stat(lambda r: r["jei"]["accuracy"]),
            "baseline_accuracy_at_cost": stat(lambda r: r["baseline_at_jei_cost"]["interpolated_accuracy"]),
            "delta_accuracy": stat(lambda r: r["delta_accuracy"]),
            "mean_cost": stat(lambda r: r["jei"]["mean_cost"]),
            "mean_cost_vs_plain": stat(lambda r: r["jei"]["mean_cost_vs_plain"]),
            "full_model_accuracy": stat(lambda r: r["per_exit_accuracy"][-1]),
            "jei_ece": stat(lambda r: r["jei"]["ece"]),
            "baseline_ece": stat(lambda r: r["baseline_at_jei_cost"]["ece"]),
            "jei_set_size": stat(lambda r: r["set_size_at_alpha"]["jei"]),
            "baseline_set_size": stat(lambda r: r["set_size_at_alpha"]["baseline"]),
            "jei_coverage": stat(lambda r: r["set_size_at_alpha"]["jei_coverage"]),
            "baseline_coverage": stat(lambda r: r["set_size_at_alpha"]["baseline_coverage"]),
        })
    return out


def plot(runs: list, summary: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["source"], r["backbone"]) for r in runs})
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), squeeze=False)
    for ax, (src, bb) in zip(axes.flat, panels):
        rs = [r for r in runs if (r["source"], r["backbone"]) == (src, bb)]
        for i, r in enumerate(rs):
            c = [p["mean_cost"] for p in r["baseline_curve"]]
            a = [100 * p["accuracy"] for p in r["baseline_curve"]]
            ax.plot(c, a, color="0.6", lw=0.8, alpha=0.6, label="threshold baseline (each model's IMs)" if i == 0 else None)
        ax.scatter([r["jei"]["mean_cost"] for r in rs], [100 * r["jei"]["accuracy"] for r in rs], s=14,
                   color="tab:blue", alpha=0.45, label="JEI-DNN (each seed)")
        ss = [s for s in summary if (s["source"], s["backbone"]) == (src, bb)]
        ax.errorbar([s["mean_cost"]["mean"] for s in ss], [100 * s["jei_accuracy"]["mean"] for s in ss],
                    xerr=[s["mean_cost"]["std"] for s in ss], yerr=[100 * s["jei_accuracy"]["std"] for s in ss],
                    fmt="o-", color="tab:blue", lw=1.5, ms=5, capsize=2, label="JEI-DNN (mean over seeds)")
        ax.plot([s["mean_cost"]["mean"] for s in ss], [100 * s["baseline_accuracy_at_cost"]["mean"] for s in ss],
                "s--", color="tab:orange", ms=4, lw=1.2, label="baseline at JEI's cost (mean)")
        for s in ss:
            ax.annotate(f"λ={s['lambda']:g}", (s["mean_cost"]["mean"], 100 * s["jei_accuracy"]["mean"]),
                        textcoords="offset points", xytext=(4, -11), fontsize=7, color="tab:blue")
        full = np.mean([r["per_exit_accuracy"][-1] for r in rs])
        ax.axhline(100 * full, color="k", lw=0.7, ls=":", label="full model (final head)")
        ax.set_xlim(0.0, 1.02)
        accs = [100 * s["jei_accuracy"]["mean"] for s in ss] + [100 * s["baseline_accuracy_at_cost"]["mean"] for s in ss]
        ax.set_ylim(min(accs) - 6, max(accs + [100 * full]) + 2)
        ax.set_title(f"{src} / {bb}", fontsize=10)
        ax.set_xlabel("mean cost (fraction of full model MACs)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    sources = [s for s in args.sources.split(",") if s]
    backbones = [s for s in args.backbones.split(",") if s]
    lambdas = [float(v) for v in args.lambdas.split(",") if v]
    seeds = [int(v) for v in args.seeds.split(",") if v]
    overrides = {}
    if args.quick:
        seeds, lambdas = seeds[:1], lambdas[1:4:2] or lambdas[:1]
        overrides.update(backbone_epochs=3, min_steps=200, im_epochs=2)
    if args.backbone_epochs is not None:
        overrides["backbone_epochs"] = args.backbone_epochs
    if args.min_steps is not None:
        overrides["min_steps"] = args.min_steps
    command = "python benchmarks/accuracy_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            for bb in backbones:
                for seed in seeds:
                    runs += one_family(src, bb, seed, lambdas, overrides, Path(tmp))
    summary = summarize(runs)
    total = time.perf_counter() - t0
    result = {"command": command.strip(), "machine": machine(), "total_seconds": round(total, 1),
              "settings": {"sources": sources, "backbones": backbones, "lambdas": lambdas, "seeds": seeds,
                           "overrides": overrides, "alpha_reported": ALPHA_REPORT},
              "summary": summary, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(runs, summary, out.with_suffix(".png"),
         f"JEI-DNN vs max-softmax thresholding on the same IMs ({len(seeds)} seed(s); test split)")
    print(f"\n{'source':<10} {'backbone':<8} {'lambda':>6} {'cost':>6} {'JEI acc':>8} {'thr acc':>8} {'delta':>7} "
          f"{'ECE':>5} {'thrECE':>6} {'set':>5} {'thrset':>6}")
    for s in summary:
        print(f"{s['source']:<10} {s['backbone']:<8} {s['lambda']:>6g} {s['mean_cost']['mean']:>6.3f} "
              f"{100 * s['jei_accuracy']['mean']:>8.2f} {100 * s['baseline_accuracy_at_cost']['mean']:>8.2f} "
              f"{100 * s['delta_accuracy']['mean']:>+7.2f} {s['jei_ece']['mean']:>5.2f} {s['baseline_ece']['mean']:>6.2f} "
              f"{s['jei_set_size']['mean']:>5.2f} {s['baseline_set_size']['mean']:>6.2f}")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
