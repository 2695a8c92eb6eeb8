"""Accuracy-cost curves: JEI-DNN vs four thresholding baselines, and the gate pos_weight rules.

For every (seed, data source, backbone family) one backbone is trained, then one JEI model per
lambda is trained from it (IM warm-up + bi-level + conformal calibration; what the reference does
too: the backbone is trained once and frozen). Each JEI model is evaluated on the test split next
to the baselines of ``jei_edge.train.evaluate`` at matched mean cost (each baseline's curve over
geometric budgets q^k, thresholds fitted on validation, interpolated at the JEI model's cost):

  (a) p_max on JEI's own IMs        (b) max-logit on JEI's own IMs
  (c) p_max on warm-up-only IMs     (d) max-logit on warm-up-only IMs (the reference helper's)

The warm-up IMs do not depend on lambda or the pos_weight rule (same backbone, seed and batch
order; checked: ``warmup_sha256`` per run), so (c) and (d) are one curve per backbone and seed.

The pos_weight comparison trains the extra rules (``--pos-weights``, default balanced and none)
at ``--pw-lambdas`` only (fewer lambdas, to fit the compute budget) and reports each rule's
accuracy, cost and its margin over the common baseline (c) at its own cost.

Writes ``benchmarks/results/accuracy_cost.json`` (every run + summary, the command and git commit;
rewritten after every backbone with ``"complete": false`` until the end) and ``accuracy_cost.png``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/accuracy_cost.py       # full run (~60-75 min on one busy core)
    python benchmarks/accuracy_cost.py --quick                 # smoke run (a few minutes)
"""

from __future__ import annotations

import argparse
import hashlib
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
ROOT = HERE.parent
DEFAULT_LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_PW_LAMBDAS = (0.3,)
ALPHA_REPORT = 0.05
STYLE = {"a": ("tab:orange", "s"), "b": ("tab:red", "D"), "c": ("tab:green", "^"), "d": ("tab:purple", "v")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", default="digits,synthetic", help="comma-separated data sources")
    p.add_argument("--backbones", default="vit,resnet", help="comma-separated backbone names")
    p.add_argument("--lambdas", default=",".join(str(v) for v in DEFAULT_LAMBDAS))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (model init, batches and data split)")
    p.add_argument("--pos-weights", default="balanced,none",
                   help="extra gate pos_weight rules trained next to 'reference' ('' for none)")
    p.add_argument("--pw-lambdas", default=",".join(str(v) for v in DEFAULT_PW_LAMBDAS),
                   help="lambdas at which the extra pos_weight rules are trained")
    p.add_argument("--backbone-epochs", type=int, default=None, help="override (default: TrainConfig's)")
    p.add_argument("--min-steps", type=int, default=None, help="override bi-level min_steps")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 1 seed, 2 lambdas, short training")
    p.add_argument("--out", default=str(HERE / "results" / "accuracy_cost"), help="output path without extension")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="no training: redraw the plot beside JSON and print its tables (markdown too)")
    return p.parse_args(argv)


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor()}


def git_state() -> dict:
    """The code measured (``realized_speedup.provenance`` over the training code and this script)."""
    sys.path.insert(0, str(HERE))
    from realized_speedup import provenance

    return provenance(("jei_edge/train", "jei_edge/model", "benchmarks/accuracy_cost.py"))


def warmup_digest(ckpt: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(ckpt["warmup_ims"]):
        h.update(k.encode())
        h.update(ckpt["warmup_ims"][k].numpy().tobytes())
    return h.hexdigest()[:16]


def conformal_at(entries, alpha=ALPHA_REPORT) -> dict:
    c = next(c for c in entries if abs(c["alpha"] - alpha) < 1e-9)
    return {"set_size": c["mean_set_size"], "coverage": c["coverage"]}


def record(ev: dict, ckpt: dict, **meta) -> dict:
    """One run's record: JEI, the four baselines at its cost (and their curves), deltas."""
    jei = ev["jei"]
    rec = dict(meta)
    rec.update({
        "n_test": ev["n_test"], "per_exit_accuracy": ev["per_exit_accuracy"],
        "per_exit_accuracy_warmup": ev.get("per_exit_accuracy_warmup"), "costs": ev["costs"],
        "warmup_sha256": warmup_digest(ckpt), "pos_weights_trained": ckpt["exits"]["pos_weights"],
        "jei": {k: jei[k] for k in ("accuracy", "mean_cost", "mean_cost_vs_plain", "exit_histogram", "ece")},
        "jei_conformal": conformal_at(jei["conformal"]),
        "baselines": {}, "delta": {}, "curves": {},
    })
    for name, b in ev["baselines"].items():
        at = b["at_jei_cost"]
        rec["baselines"][name] = {"label": b["label"], "interpolated_accuracy": at["interpolated_accuracy"],
                                  "q": at["q"], "nearest_accuracy": at["accuracy"], "nearest_cost": at["mean_cost"],
                                  "ece": at["ece"], "exit_histogram": at["exit_histogram"],
                                  **conformal_at(at["conformal"])}
        rec["delta"][name] = jei["accuracy"] - at["interpolated_accuracy"]
        rec["curves"][name] = [{"q": p["q"], "accuracy": p["accuracy"], "mean_cost": p["mean_cost"]}
                               for p in b["curve"]]
    return rec


def one_family(source: str, backbone: str, seed: int, lambdas, rules, pw_lambdas, overrides: dict,
               workdir: Path) -> list:
    """Train one backbone, then one JEI model per lambda (and per extra pos_weight rule at
    ``pw_lambdas``); return one record per trained model."""
    import torch

    from jei_edge.data import load_data
    from jei_edge.train import TrainConfig, train_jei
    from jei_edge.train.evaluate import evaluate_checkpoint

    data = load_data(source, seed=seed)
    base = TrainConfig(backbone=backbone, seed=seed, **overrides)
    t0 = time.perf_counter()
    first = train_jei(replace(base, epochs=0, min_steps=0, im_epochs=0), data, progress=False)
    backbone_s = time.perf_counter() - t0
    weights = workdir / f"{source.replace(':', '_')}_{backbone}_{seed}.pt"
    torch.save({k: v for k, v in first["state_dict"].items() if k.split(".")[0] in ("stem", "blocks", "head")},
               weights)
    jobs = [(lam, "reference") for lam in lambdas] + [(lam, r) for r in rules for lam in pw_lambdas]
    runs = []
    for lam, rule in jobs:
        t1 = time.perf_counter()
        cfg = replace(base, lam=lam, pos_weight=rule, backbone_weights=str(weights), backbone_epochs=0)
        ckpt = train_jei(cfg, data, progress=False)
        heads_s = time.perf_counter() - t1
        ev = evaluate_checkpoint(ckpt, data)
        rec = record(ev, ckpt, source=source, backbone=backbone, seed=seed, pos_weight=rule, **{"lambda": lam})
        rec.update(backbone_seconds=round(backbone_s, 1), heads_seconds=round(heads_s, 1),
                   backbone_val_accuracy=first["training"]["backbone"].get("best_val_accuracy"))
        runs.append(rec)
        d = rec["delta"]
        print(f"  {source:<10} {backbone:<7} seed {seed} lambda {lam:<5g} {rule:<9} JEI acc "
              f"{rec['jei']['accuracy']:.4f} cost {rec['jei']['mean_cost']:.3f} | delta vs a/b/c/d "
              + " ".join(f"{100 * d[k]:+.2f}" for k in sorted(d))
              + f" | exits {rec['jei']['exit_histogram']} | {heads_s:.0f} s", flush=True)
    return runs


def _stat(values) -> dict:
    v = np.array([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def summarize(runs: list) -> list:
    """Mean +- sd over seeds per (source, backbone, lambda, pos_weight rule)."""
    out = []
    keys = sorted({(r["source"], r["backbone"], r["lambda"], r["pos_weight"]) for r in runs})
    for src, bb, lam, rule in keys:
        rs = [r for r in runs if (r["source"], r["backbone"], r["lambda"], r["pos_weight"]) == (src, bb, lam, rule)]
        names = sorted({k for r in rs for k in r["baselines"]})
        out.append({
            "source": src, "backbone": bb, "lambda": lam, "pos_weight": rule, "seeds": len(rs),
            "jei_accuracy": _stat(r["jei"]["accuracy"] for r in rs),
            "mean_cost": _stat(r["jei"]["mean_cost"] for r in rs),
            "mean_cost_vs_plain": _stat(r["jei"]["mean_cost_vs_plain"] for r in rs),
            "full_model_accuracy": _stat(r["per_exit_accuracy"][-1] for r in rs),
            "jei_ece": _stat(r["jei"]["ece"] for r in rs),
            "exits_used": _stat(sum(h >= 0.05 * sum(r["jei"]["exit_histogram"]) for h in r["jei"]["exit_histogram"])
                                for r in rs)["mean"],
            "jei_set_size": _stat(r["jei_conformal"]["set_size"] for r in rs),
            "jei_coverage": _stat(r["jei_conformal"]["coverage"] for r in rs),
            "baselines": {n: {
                "label": rs[0]["baselines"][n]["label"],
                "accuracy_at_cost": _stat(r["baselines"][n]["interpolated_accuracy"] for r in rs),
                "delta": _stat(r["delta"][n] for r in rs),
                "ece": _stat(r["baselines"][n]["ece"] for r in rs),
                "set_size": _stat(r["baselines"][n]["set_size"] for r in rs),
                "coverage": _stat(r["baselines"][n]["coverage"] for r in rs),
            } for n in names},
        })
    return out


def warmup_independent(runs: list) -> dict:
    """Whether the warm-up IMs (so baselines c and d) were identical across lambdas and rules."""
    groups = {}
    for r in runs:
        groups.setdefault(f"{r['source']}/{r['backbone']}/{r['seed']}", set()).add(r["warmup_sha256"])
    return {"all_identical": all(len(v) == 1 for v in groups.values()),
            "distinct_per_family": {k: len(v) for k, v in groups.items()}}


def _mean_curve(curves, grid):
    """Seed-mean and sd of several (cost, accuracy) curves on ``grid`` (each only inside its range)."""
    from jei_edge.train.baseline import accuracy_at_cost

    rows = []
    for curve in curves:
        lo = min(p["mean_cost"] for p in curve)
        hi = max(p["mean_cost"] for p in curve)
        rows.append([accuracy_at_cost(curve, g) if lo <= g <= hi else np.nan for g in grid])
    a = np.array(rows, dtype=float)
    ok = ~np.isnan(a).any(0)  # where every seed's curve reaches
    a = a[:, ok]
    return grid[ok], a.mean(0), a.std(0, ddof=1) if len(curves) > 1 else np.zeros(a.shape[1])


def plot(runs: list, summary: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["source"], r["backbone"]) for r in runs})
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.0 * cols, 5.2 * rows), squeeze=False)
    for ax, (src, bb) in zip(axes.flat, panels):
        rs = [r for r in runs if (r["source"], r["backbone"]) == (src, bb) and r["pos_weight"] == "reference"]
        ss = [s for s in summary if (s["source"], s["backbone"]) == (src, bb) and s["pos_weight"] == "reference"]
        names = sorted({k for r in rs for k in r["curves"]})
        grid = np.linspace(0.0, 1.0, 201)
        accs = []
        for name in names:  # full curves: (a), (b) per lambda (thin); (c), (d) one per seed -> mean +- sd band
            color, marker = STYLE.get(name, ("0.5", "o"))
            label = rs[0]["baselines"][name]["label"]
            if name in ("c", "d"):
                curves = [next(r for r in rs if r["seed"] == seed)["curves"][name] for seed in sorted({r["seed"] for r in rs})]
                g, m, sd = _mean_curve(curves, grid)
                ax.plot(g, 100 * m, color=color, lw=1.0, label=f"({name}) {label}: curve, mean ± sd over seeds")
                ax.fill_between(g, 100 * (m - sd), 100 * (m + sd), color=color, alpha=0.15, lw=0)
            else:
                for i, lam in enumerate(sorted({r["lambda"] for r in rs})):
                    g, m, _ = _mean_curve([r["curves"][name] for r in rs if r["lambda"] == lam], grid)
                    ax.plot(g, 100 * m, color=color, lw=0.6, alpha=0.35,
                            label=f"({name}) {label}: curve per λ (seed mean)" if i == 0 else None)
            x = [s["mean_cost"]["mean"] for s in ss if name in s["baselines"]]
            y = [100 * s["baselines"][name]["accuracy_at_cost"]["mean"] for s in ss if name in s["baselines"]]
            e = [100 * s["baselines"][name]["accuracy_at_cost"]["std"] for s in ss if name in s["baselines"]]
            ax.errorbar(x, y, yerr=e, fmt=marker, color=color, ms=4, capsize=2, lw=0.8, ls="none",
                        label=f"({name}) at JEI's cost, mean ± sd")
            accs += y
        ax.scatter([r["jei"]["mean_cost"] for r in rs], [100 * r["jei"]["accuracy"] for r in rs], s=10,
                   color="tab:blue", alpha=0.35, label="JEI-DNN (each seed)")
        ax.errorbar([s["mean_cost"]["mean"] for s in ss], [100 * s["jei_accuracy"]["mean"] for s in ss],
                    xerr=[s["mean_cost"]["std"] for s in ss], yerr=[100 * s["jei_accuracy"]["std"] for s in ss],
                    fmt="o-", color="tab:blue", lw=1.5, ms=5, capsize=2, label="JEI-DNN, pos-weight reference (mean ± sd)")
        for s in ss:
            ax.annotate(f"λ={s['lambda']:g}", (s["mean_cost"]["mean"], 100 * s["jei_accuracy"]["mean"]),
                        textcoords="offset points", xytext=(4, 5), fontsize=7, color="tab:blue")
        for rule, marker in (("balanced", "P"), ("none", "X")):
            sr = [s for s in summary if (s["source"], s["backbone"], s["pos_weight"]) == (src, bb, rule)]
            if sr:
                ax.errorbar([s["mean_cost"]["mean"] for s in sr], [100 * s["jei_accuracy"]["mean"] for s in sr],
                            xerr=[s["mean_cost"]["std"] for s in sr], yerr=[100 * s["jei_accuracy"]["std"] for s in sr],
                            fmt=marker, color="navy", ms=6, capsize=2, lw=0.8, ls="none", mfc="white",
                            label=f"JEI-DNN, pos-weight {rule} (mean ± sd)")
        full = np.mean([r["per_exit_accuracy"][-1] for r in rs])
        ax.axhline(100 * full, color="k", lw=0.7, ls=":", label="full model (final head)")
        accs += [100 * s["jei_accuracy"]["mean"] for s in ss]
        costs = [r["jei"]["mean_cost"] for r in runs if (r["source"], r["backbone"]) == (src, bb)]
        ax.set_xlim(max(0.0, min(costs) - 0.12), min(1.02, max(costs) + 0.25))  # where JEI's points are
        ax.set_ylim(min(accs) - 4, min(max(accs + [100 * full]) + 1.5, 100.5))
        ax.set_title(f"{src} / {bb}", fontsize=10)
        ax.set_xlabel("mean cost (fraction of full model MACs)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:  # one legend for all panels, below them
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03 + 0.028 * ((len(handles) + 2) // 3) / rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, result: dict, runs: list) -> None:
    """The JSON and the plot, each replaced atomically (a partial run leaves a readable file)."""
    from jei_edge._io import atomic_write_bytes

    summary = summarize(runs)
    result.update(summary=summary, runs=runs, warmup_ims_independent_of_lambda_and_rule=warmup_independent(runs))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".json"), lambda f: f.write(json.dumps(result, indent=1).encode()))
    seeds = sorted({r["seed"] for r in runs})
    plot(runs, summary, out.with_suffix(".png"),
         f"JEI-DNN vs thresholding baselines (a)-(d) at matched cost ({len(seeds)} seed(s), test split)"
         + ("" if result.get("complete") else " [partial]"))


def print_table(summary: list) -> None:
    print(f"\n{'source':<10} {'backbone':<8} {'lambda':>6} {'pos_weight':<10} {'cost':>6} {'JEI acc':>8} "
          + " ".join(f"{'d(' + n + ')':>13}" for n in "abcd") + f" {'ECE':>5} {'set':>5}")
    for s in summary:
        cells = []
        for n in "abcd":
            b = s["baselines"].get(n)
            cells.append(f"{100 * b['delta']['mean']:>+6.2f}±{100 * b['delta']['std']:<5.2f}" if b else f"{'-':>13}")
        print(f"{s['source']:<10} {s['backbone']:<8} {s['lambda']:>6g} {s['pos_weight']:<10} {s['mean_cost']['mean']:>6.3f} "
              f"{100 * s['jei_accuracy']['mean']:>8.2f} " + " ".join(f"{c:>13}" for c in cells)
              + f" {s['jei_ece']['mean']:>5.2f} {s['jei_set_size']['mean']:>5.2f}")


def _pm(stat, scale=100.0, sign=False) -> str:
    return f"{scale * stat['mean']:{'+' if sign else ''}.2f} ± {scale * stat['std']:.2f}"


def markdown(summary: list) -> str:
    """The tables of docs/training.md: JEI vs (a)-(d) per lambda, and the pos_weight rules."""
    lines = ["| source | backbone | λ | mean cost | JEI acc % | Δ vs (a) | Δ vs (b) | Δ vs (c) | Δ vs (d) "
             "| ECE JEI / (a) / (c) | set size α=0.05 JEI / (a) / (c) |", "|" + "---|" * 11]
    for s in summary:
        if s["pos_weight"] != "reference":
            continue
        b = s["baselines"]
        deltas = [_pm(b[n]["delta"], sign=True) if n in b else "-" for n in "abcd"]
        ece = " / ".join(f"{x['mean']:.2f}" for x in [s["jei_ece"]] + [b[n]["ece"] for n in "ac" if n in b])
        size = " / ".join(f"{x['mean']:.2f}" for x in [s["jei_set_size"]] + [b[n]["set_size"] for n in "ac" if n in b])
        lines.append(f"| {s['source']} | {s['backbone']} | {s['lambda']:g} | {s['mean_cost']['mean']:.3f} | "
                     f"{_pm(s['jei_accuracy'])} | " + " | ".join(deltas) + f" | {ece} | {size} |")
    rules = [s for s in summary if s["pos_weight"] != "reference"]
    if rules:
        lams = {s["lambda"] for s in rules}
        lines += ["", "| source | backbone | λ | --pos-weight | mean cost | JEI acc % | Δ vs (a) (own IMs) "
                  "| Δ vs (c) (shared warm-up IMs) | exits used (>= 5%) |", "|" + "---|" * 9]
        for s in summary:
            if s["lambda"] not in lams:
                continue
            b = s["baselines"]
            lines.append(f"| {s['source']} | {s['backbone']} | {s['lambda']:g} | {s['pos_weight']} | "
                         f"{s['mean_cost']['mean']:.3f} ± {s['mean_cost']['std']:.3f} | {_pm(s['jei_accuracy'])} | "
                         f"{_pm(b['a']['delta'], sign=True)} | "
                         f"{_pm(b['c']['delta'], sign=True) if 'c' in b else '-'} | {s.get('exits_used', 0):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:  # tables and plot again from a results file (no training)
        result = json.loads(Path(args.render).read_text())
        result["summary"] = summarize(result["runs"])  # this version's summary of the recorded runs
        out = Path(args.render).with_suffix("")
        plot(result["runs"], result["summary"], out.with_suffix(".png"),
             f"JEI-DNN vs thresholding baselines (a)-(d) at matched cost ({len({r['seed'] for r in result['runs']})} seed(s), "
             "test split)" + ("" if result.get("complete") else " [partial]"))
        print_table(result["summary"])
        print()
        print(markdown(result["summary"]))
        return 0
    sources = [s for s in args.sources.split(",") if s]
    backbones = [s for s in args.backbones.split(",") if s]
    lambdas = [float(v) for v in args.lambdas.split(",") if v]
    seeds = [int(v) for v in args.seeds.split(",") if v]
    rules = [r for r in args.pos_weights.split(",") if r and r != "reference"]
    pw_lambdas = [float(v) for v in args.pw_lambdas.split(",") if v]
    overrides = {}
    if args.quick:
        seeds, lambdas = seeds[:1], lambdas[1:4:2] or lambdas[:1]
        pw_lambdas = lambdas[-1:]
        overrides.update(backbone_epochs=3, min_steps=200, im_epochs=2)
    if args.backbone_epochs is not None:
        overrides["backbone_epochs"] = args.backbone_epochs
    if args.min_steps is not None:
        overrides["min_steps"] = args.min_steps
    command = "python benchmarks/accuracy_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": command.strip(), "env": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
              "git": git_state(), "machine": machine(), "complete": False,
              "settings": {"sources": sources, "backbones": backbones, "lambdas": lambdas, "seeds": seeds,
                           "pos_weight_rules": ["reference"] + rules, "pos_weight_lambdas": pw_lambdas,
                           "overrides": overrides, "alpha_reported": ALPHA_REPORT,
                           "delta": "JEI accuracy minus the baseline's curve interpolated at JEI's mean test cost"}}
    out = Path(args.out)
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:  # seeds outermost: a run stopped early still covers every family
            for src in sources:
                for bb in backbones:
                    runs += one_family(src, bb, seed, lambdas, rules, pw_lambdas, overrides, Path(tmp))
                    result["total_seconds"] = round(time.perf_counter() - t0, 1)
                    write(out, result, runs)
    result["complete"] = True
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    write(out, result, runs)
    print_table(result["summary"])
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
