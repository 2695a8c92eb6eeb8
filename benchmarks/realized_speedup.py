"""Realized early-exit speedup of the CPU runtime (onnxruntime), as defined in docs/architecture.md (Definitions).

For each backbone family (a ViT and a ResNet, trained with JEI-DNN on the synthetic source so that
at least 3 exits each take >= 5% of samples) and batch sizes 1 and 64, on the test split:

- ``exit`` / ``full`` mode time of the runtime and the plain backbone graph (same session settings);
- **ideal exit time** = sum over stages of t_k(n_k), t_k(n) = stage k run standalone on n rows
  (same executor, buffers and session settings), n_k = the real reach counts. Measured as the
  very stage runs of the exit pass (stage k on n_k rows of the same batch's data) executed back to
  back without decisions or compaction (one total per repeat), timed next to the exit pass in
  alternating order, so that a shared machine's stalls hit both sides alike;
  the sum of per-stage medians is reported too (``efficiency_vs_stage_medians``);
- **realized/ideal efficiency** = ideal / exit time; **realized speedup** = full / exit;
  **speedup vs plain backbone** = plain / exit; each ratio is the median over repeats of the
  per-repeat ratio (the ratio of the medians is kept as ``efficiency_ratio_of_medians``);
- **per-boundary overhead** = (exit time - ideal) / boundaries crossed, in microseconds (and the
  decide+compact time measured directly inside the loop).

The passes and their interleaved protocol are ``jei_edge.profile`` (``Passes``, ``interleaved``:
the same code as ``jei-edge profile``; decide+compact from ``Breakdown``); this script adds fresh
processes, per-stage medians, trained models and setting variants.
It also compares onnxruntime thread settings (spinning, global pool, 1 thread, IOBinding) at both
batch sizes. Every measurement runs in a fresh subprocess that imports only the torch-free runtime.
Times are medians over ``--repeats`` interleaved repeats. Usage::

    python benchmarks/realized_speedup.py                 # train (if missing), build, measure, write results
    python benchmarks/realized_speedup.py --quick         # fewer repeats/samples (smoke run)

Results: ``benchmarks/results/realized_speedup.json`` and ``.md``. Models and bundles are cached in
``--work`` (default ``runs/bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jei_edge.bundle import Bundle  # noqa: E402  (torch-free, as the measurement child must stay)
from jei_edge.profile import median  # noqa: E402

# Harder than the default synthetic source (blends with another class's prototype up to 45%, pixel
# noise up to 0.6, both scaled by a per-sample difficulty): easy samples are right at the first
# exits, hard ones need depth, so the trained gates spread exits without threshold offsets. On the
# default source (size=32) every exit is ~95% accurate and the gates put nearly every sample on
# exit 0 or 1 at any lambda (measured). Stage compute is large enough to measure overheads fairly
# (ViT: 65 tokens x 160 dims; ResNet: 32-128 channels on 32x32).
DATA = "synthetic:size=32,hard=0.45,noise=0.6"
# Each model: a base run trains the backbone (phase 1 does not depend on lambda), then the IMs and
# gates are trained again on that frozen backbone at the benchmark's lambda (``--backbone-weights
# BASE --backbone-epochs 0``), the way the lambda was chosen (a sweep on the frozen backbone; test
# exits at offset 0: ViT 0.03 -> [125, 415, 60, 0, 0, 0, 0], ResNet 1.5 -> [0, 0, 3, 102, 393, 102]).
MODELS = {
    "vit": {"backbone": "vit", "backbone_kwargs": {"embed_dim": 160, "depth": 7, "heads": 4, "patch": 4, "mlp_ratio": 2.0},
            "base_lam": 0.3, "lam": 0.03},
    "resnet": {"backbone": "resnet", "backbone_kwargs": {"widths": [32, 64, 128], "blocks_per_stage": [2, 2, 2]},
               "base_lam": 1.0, "lam": 1.5},
}
VARIANTS = {
    "default": {},  # the target's settings (jei_edge/targets/cpu.toml): spinning off, IOBinding
    "spinning_on": {"allow_spinning": True},
    "global_pool": {"global_thread_pool": True},
    "one_thread": {"intra_op_threads": 1},
    "no_iobinding": {"io_binding": False},
    "small_batch_1": {"small_batch_rows": 1},  # 1-thread sessions when 1 row is live
    "small_batch_8": {"small_batch_rows": 8},  # ... when <= 8 rows are live (also a batch's tail)
}


# -- preparation (needs torch) -------------------------------------------------------------------
def ensure_model(family: str, work: Path, log) -> Path:
    """``work/FAMILY.pt``: trained as described at ``MODELS`` (the base model is kept as ``FAMILY_base.pt``)."""
    path = work / f"{family}.pt"
    if path.exists():
        return path
    from jei_edge.data import load_data
    from jei_edge.model.checkpoint import save_checkpoint
    from jei_edge.train import TrainConfig, train_jei

    spec = MODELS[family]
    data = load_data(DATA, seed=0)
    base = work / f"{family}_base.pt"
    if not base.exists():
        log(f"training {family} on {DATA} (backbone, then IMs and gates at lambda {spec['base_lam']}), 1 thread")
        cfg = TrainConfig(backbone=spec["backbone"], backbone_kwargs=dict(spec["backbone_kwargs"]),
                          lam=spec["base_lam"], threads=1)
        save_checkpoint(base, checkpoint=train_jei(cfg, data, progress=True))
    log(f"training {family}'s IMs and gates at lambda {spec['lam']} on the frozen backbone of {base.name}")
    cfg = TrainConfig(backbone=spec["backbone"], backbone_kwargs=dict(spec["backbone_kwargs"]), lam=spec["lam"],
                      backbone_weights=str(base), backbone_epochs=0, threads=1)
    save_checkpoint(path, checkpoint=train_jei(cfg, data, progress=True))
    return path


def ensure_bundle(model: Path, log, rebuild: bool = False) -> Path:
    out = model.with_suffix(".jei")
    if out.exists() and not rebuild:
        return out
    from jei_edge.compile import BuildOptions, build_bundle

    log(f"building {out}")
    build_bundle(model, out, BuildOptions(force=True), progress=log)
    return out


def spread_offsets(model: Path, force: bool = False) -> list:
    """Deploy-time threshold offsets (JEI-DNN's accuracy/cost knob) chosen on the validation split so
    that exits are spread evenly: gate l takes 1/(G+1-l) of the rows still live. Used when the
    trained operating point (offsets 0) is degenerate (fewer than 3 exits with >= 5% of samples),
    or with ``force`` (the "spread" scenario: rows cross every boundary, the overhead's worst case)."""
    from jei_edge.data import load_data
    from jei_edge.exit_rule import exit_threshold
    from jei_edge.model.checkpoint import load_checkpoint
    from jei_edge.model.jei import exit_decisions

    net, ck = load_checkpoint(model)
    rec = ck["training"]["data"]
    d = load_data(rec["source"], preprocessing=ck["preprocessing"], seed=rec.get("split_seed", 0))
    dec = exit_decisions(net, d.val.x)  # the torch model's gates and exit levels (offsets 0)
    g = dec.gates
    hist = np.bincount(dec.levels, minlength=g.shape[1] + 1) / len(g)
    if (hist >= 0.05).sum() >= 3 and not force:
        return [0.0] * g.shape[1]
    live = np.ones(len(g), bool)
    S = np.zeros(len(g))
    offsets = []
    for l in range(g.shape[1]):
        margin = g[live, l] - exit_threshold(S[live])
        delta = float(np.quantile(margin, 1.0 - 1.0 / (g.shape[1] + 1 - l))) if margin.size else 0.0
        offsets.append(delta)
        live &= ~(g[:, l] >= exit_threshold(S, delta))
        S += g[:, l]
    return offsets


def test_inputs(model: Path, work: Path) -> Path:
    """The test split (model inputs, labels) of the data the model was trained on."""
    path = work / f"{model.stem}_test.npz"
    if not path.exists():
        from jei_edge.data import load_data
        from jei_edge.model.checkpoint import read_checkpoint

        ck = read_checkpoint(model)
        rec = ck["training"]["data"]
        d = load_data(rec["source"], preprocessing=ck["preprocessing"], seed=rec.get("split_seed", 0))
        np.savez(path, x=d.test.x, y=d.test.y)
    return path


# -- measurement (child process: torch-free runtime only) ------------------------------------------
def measure(bundle: str, inputs: str, batches, repeats: int, n1: int, n64: int, options: dict, offsets=None) -> dict:
    from jei_edge.profile import Breakdown, Passes, interleaved, median_ratio, settings_record
    from jei_edge.runtime import Runtime

    assert "torch" not in sys.modules
    offsets = tuple(offsets) if offsets else None  # a tuple is validated once by Runtime.run
    with np.load(inputs) as z:
        x, y = z["x"], z["y"]
    rt = Runtime.load(bundle, max_batch=max(batches), **options)
    exits = rt.manifest.exits
    res_all = rt.run(x, offsets=offsets)
    settings = settings_record(rt)
    settings.pop("backend", None)
    out = {"settings": settings,
           "offsets": list(offsets or []), "trained_exit_histogram": rt.run(x).exit_histogram(rt.num_exits),
           "test_samples": int(len(x)), "exit_histogram": res_all.exit_histogram(rt.num_exits),
           "accuracy_exit": float(np.mean(res_all.pred == y)),
           "accuracy_full": float(np.mean(rt.run(x, mode="full").pred == y)),
           "mean_cost": float(np.mean(np.asarray(exits.cost)[res_all.exit_index])),
           "mean_cost_vs_plain": float(np.mean(np.asarray(exits.cost_vs_plain)[res_all.exit_index]))}
    for bsz in batches:
        n = n1 if bsz == 1 else n64
        # the package's passes and protocol (jei_edge.profile, shared with `jei-edge profile`); the
        # plain backbone gets the stages' thread policy (small-batch settings when the batch is small)
        p = Passes.for_runtime(rt, bsz)
        xs = p.batches(x, bsz, n)
        reaches = p.reaches(xs, offsets)
        boundaries = p.boundaries(reaches)
        pairs = sorted({(k, m) for r in reaches for k, m in enumerate(r)})
        stage_t = {q: [] for q in pairs}
        inner = 5 if bsz == 1 else 2

        def stage_runs(i):  # standalone t_k(m), interleaved with the protocol's repeats
            for (k, m) in pairs:
                for _ in range(inner):
                    stage_t[(k, m)].append(p.stage_time(k, m))

        samples = interleaved([p], xs, [reaches], repeats, offsets, warmup=2, each_repeat=stage_runs)[0]
        tk = {q: median(v) for q, v in stage_t.items()}
        ideal_from_medians = sum(tk[(k, m)] for r in reaches for k, m in enumerate(r))
        ideal = median(samples["ideal"])
        # decide + compact measured directly inside the loop (one extra, untimed pass)
        bd = Breakdown(rt)
        for b in xs:
            bd.run(b, offsets=offsets)
        te, tf, tp = (median(samples[k]) for k in ("exit", "full", "plain"))
        rows = len(xs) * bsz
        out[f"batch_{bsz}"] = {
            "batches": len(xs), "samples": rows, "boundaries": boundaries,
            "reach_total": p.reach_total(reaches),
            "exit_s": te, "full_s": tf, "plain_s": tp, "ideal_s": ideal,
            "ideal_from_stage_medians_s": ideal_from_medians,
            "efficiency_vs_stage_medians": ideal_from_medians / te,
            # the same stage runs back to back, no runtime work at all, against the per-stage
            # medians: how much of the second reading's gap a zero-cost runtime would still show
            "back_to_back_vs_stage_medians": ideal_from_medians / ideal,
            "stage_ms": {f"{k}@{m}": round(1e3 * v, 4) for (k, m), v in sorted(tk.items()) if m in (1, bsz)},
            "efficiency": median_ratio(samples["ideal"], samples["exit"]),
            "realized_speedup": median_ratio(samples["full"], samples["exit"]),
            "speedup_vs_plain": median_ratio(samples["plain"], samples["exit"]), "efficiency_ratio_of_medians": ideal / te,
            "ideal_speedup_vs_full": tf / ideal,
            "overhead_us_per_boundary": 1e6 * (te - ideal) / max(boundaries, 1),
            "decide_compact_us_per_boundary": 1e6 * bd.mean("boundary"),
            "exit_ms_per_sample": 1e3 * te / rows, "full_ms_per_sample": 1e3 * tf / rows,
            "plain_ms_per_sample": 1e3 * tp / rows,
            "spread_exit_s": [min(samples["exit"]), max(samples["exit"])],
        }
    return out


def run_child(bundle: Path, inputs: Path, variant: str, args, offsets, processes: int = None) -> dict:
    """``args.processes`` fresh measurement processes; per-batch numbers are medians across them
    (thread placement and memory layout differ between processes: a few % on a shared machine)."""
    runs = [_run_child_once(bundle, inputs, variant, args, offsets) for _ in range(processes or args.processes)]
    out = dict(runs[0])
    for key in (k for k in runs[0] if k.startswith("batch_")):
        merged = {}
        for field, v in runs[0][key].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                merged[field] = median([r[key][field] for r in runs])
            else:
                merged[field] = v
        merged["per_process"] = {f: [r[key][f] for r in runs] for f in ("efficiency", "realized_speedup",
                                                                         "speedup_vs_plain", "exit_ms_per_sample")}
        out[key] = merged
    return out


def _run_child_once(bundle: Path, inputs: Path, variant: str, args, offsets) -> dict:
    cmd = [sys.executable, __file__, "--child", str(bundle), str(inputs), "--variant", variant,
           "--offsets", json.dumps(offsets),
           "--repeats", str(args.repeats), "--n1", str(args.n1), "--n64", str(args.n64), "--batches", args.batches]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement of {bundle} ({variant}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    try:  # the code measured: the commit, and whether the working tree differed from it
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "jei_edge", "benchmarks"],
                                    capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "host": platform.node(),
            "commit": commit + ("+changes" if dirty else "")}


def _batch_rows(section: dict):
    """``(family, family results, batch size, batch results)`` of a results section, in order."""
    for fam, r in section.items():
        for key in sorted(k for k in r if k.startswith("batch_")):
            yield fam, r, key[6:], r[key]


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Realized speedup (CPU, onnxruntime {m['onnxruntime']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; load average before/after {res['load_before']} / "
             f"{res['load_after']}. Medians over {res['repeats']} repeats in each of {res['processes']} processes (median "
             f"across processes). Command: `{res['command']}`.", "",
             "| family | batch | exit hist. (test) | efficiency (ideal/exit) | efficiency, per-stage-median ideal "
             "(bound for a zero-cost runtime) | realized speedup (full/exit) | "
             "speedup vs plain | overhead / boundary | decide+compact | exit ms/sample |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for fam, r, bsz, b in _batch_rows(res["families"]):
        lines.append(f"| {fam} | {bsz} | {r['exit_histogram']} | {b['efficiency']:.3f} | "
                     f"{b['efficiency_vs_stage_medians']:.3f} ({b['back_to_back_vs_stage_medians']:.3f}) | "
                     f"{b['realized_speedup']:.2f}x | {b['speedup_vs_plain']:.2f}x | "
                     f"{b['overhead_us_per_boundary']:.1f} us | {b['decide_compact_us_per_boundary']:.1f} us | "
                     f"{b['exit_ms_per_sample']:.3f} |")
    if res.get("spread"):
        lines += ["", "Spread scenario (same models, threshold offsets chosen on the validation split so that "
                  "exits spread evenly over all exits: rows cross every boundary, the overhead's worst case; "
                  "1 process):", "",
                  "| family | batch | exit hist. (test) | efficiency | realized speedup | speedup vs plain | "
                  "overhead / boundary | accuracy exit / full |", "|---|---|---|---|---|---|---|---|"]
        for fam, r, bsz, b in _batch_rows(res["spread"]):
            lines.append(f"| {fam} | {bsz} | {r['exit_histogram']} | {b['efficiency']:.3f} | "
                         f"{b['realized_speedup']:.2f}x | {b['speedup_vs_plain']:.2f}x | "
                         f"{b['overhead_us_per_boundary']:.1f} us | {100 * r['accuracy_exit']:.1f}% / "
                         f"{100 * r['accuracy_full']:.1f}% |")
    lines.append("")
    for fam, r in res["families"].items():
        offs = "none (trained operating point)" if not any(r["offsets"] or []) else \
            "[" + ", ".join(f"{v:+.3f}" for v in r["offsets"]) + "]"
        lines.append(f"- {fam} ({r['stages']} stages, {r['model']['backbone_kwargs']}): threshold offsets {offs}; "
                     f"test exits at offsets 0: {r['trained_exit_histogram']}; accuracy exit {100 * r['accuracy_exit']:.1f}% "
                     f"/ full {100 * r['accuracy_full']:.1f}%; mean cost {r['mean_cost']:.3f} "
                     f"({r['mean_cost_vs_plain']:.3f} of the plain backbone)")
    for fam, variants in (res.get("variants") or {}).items():
        if not variants:
            continue
        lines += ["", f"Session settings ({fam}): efficiency / exit ms per sample / speedup vs plain", "",
                  "| variant | settings | batch 1 | batch 64 |", "|---|---|---|---|"]
        for name, r in variants.items():
            cells = [f"{r[k]['efficiency']:.3f} / {r[k]['exit_ms_per_sample']:.3f} ms / {r[k]['speedup_vs_plain']:.2f}x"
                     if k in r else "-" for k in ("batch_1", "batch_64")]
            lines.append(f"| {name} | {VARIANTS[name] or 'target default'} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--families", default="vit,resnet")
    p.add_argument("--lambdas", default="", help="override training lambdas, e.g. vit=0.3,resnet=2 (new --work dir)")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--processes", type=int, default=5, help="measurement processes per family (median across them)")
    p.add_argument("--variant-processes", type=int, default=1, help="measurement processes per settings variant")
    p.add_argument("--n1", type=int, default=150, help="samples run one at a time (batch 1)")
    p.add_argument("--n64", type=int, default=512, help="samples run in batches of 64")
    p.add_argument("--variants", default=",".join(VARIANTS), help="thread-setting variants to compare ('' = none)")
    p.add_argument("--variants-family", default="vit,resnet", help="families the variants run on")
    p.add_argument("--spread-families", default="vit,resnet",
                   help="also run these families with offsets that spread exits over every exit ('' = none)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "realized_speedup.json"))
    p.add_argument("--prepare-only", action="store_true", help="train + build, no measurement")
    p.add_argument("--rebuild", action="store_true", help="rebuild the bundles even if they exist")
    p.add_argument("--quick", action="store_true", help="3 repeats, fewer samples (smoke run)")
    p.add_argument("--child", nargs=2, metavar=("BUNDLE", "INPUTS"), help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    p.add_argument("--offsets", default="null", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.n1, args.n64, args.processes = 3, 40, 256, 1
    batches = [int(b) for b in args.batches.split(",")]
    for item in filter(None, args.lambdas.split(",")):
        fam, _, lam = item.partition("=")
        MODELS[fam.strip()]["lam"] = float(lam)
    if args.child:
        r = measure(args.child[0], args.child[1], batches, args.repeats, args.n1, args.n64, VARIANTS[args.variant],
                    json.loads(args.offsets))
        print(json.dumps(r))
        return 0

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    families = [f for f in args.families.split(",") if f]
    prepared = {}
    for fam in families:
        model = ensure_model(fam, work, log)
        prepared[fam] = (model, ensure_bundle(model, log, args.rebuild), test_inputs(model, work), spread_offsets(model))
    if args.prepare_only:
        return 0
    load_before = [round(v, 2) for v in os.getloadavg()]
    res = {"command": "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix()] + (argv or sys.argv[1:])),
           "machine": machine(), "repeats": args.repeats, "processes": args.processes, "load_before": load_before, "data": DATA,
           "definitions": "docs/architecture.md#definitions", "goal": "efficiency >= 0.95 at batch 1 and 64", "families": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        res["load_after"] = [round(v, 2) for v in os.getloadavg()]
        out.write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(res))

    for fam, (model, bundle, inputs, offsets) in prepared.items():
        log(f"measuring {fam} ({', '.join(map(str, batches))}), offsets {np.round(offsets, 3).tolist()}")
        r = run_child(bundle, inputs, "default", args, offsets)
        man = Bundle.read_manifest(bundle)
        r["model"] = MODELS[fam]
        r["stages"] = man.num_stages
        r["exit_cost"] = list(man.exits.cost)
        res["families"][fam] = r
        save()
        for key in (k for k in r if k.startswith("batch_")):
            b = r[key]
            log(f"  {fam} {key}: efficiency {b['efficiency']:.3f}, realized {b['realized_speedup']:.2f}x, vs plain "
                f"{b['speedup_vs_plain']:.2f}x, overhead {b['overhead_us_per_boundary']:.1f} us/boundary")
    res["spread"] = {}
    for fam in (f for f in args.spread_families.split(",") if f in prepared):
        model, bundle, inputs, _ = prepared[fam]
        offsets = spread_offsets(model, force=True)
        log(f"spread scenario {fam}: offsets {np.round(offsets, 3).tolist()}")
        res["spread"][fam] = run_child(bundle, inputs, "default", args, offsets, args.variant_processes)
        save()
    variants = [v for v in args.variants.split(",") if v]
    res["variants"] = {}
    for fam in (f for f in args.variants_family.split(",") if f in prepared):
        res["variants"][fam] = {}
        model, bundle, inputs, offsets = prepared[fam]
        for v in variants:
            log(f"variant {fam} {v}")
            res["variants"][fam][v] = run_child(bundle, inputs, v, args, offsets, args.variant_processes)
            save()
    save()
    log(f"wrote {out} and {out.with_suffix('.md')}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
