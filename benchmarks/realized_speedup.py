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
  decide+compact time measured directly inside the loop);
- **speedup vs a hand-written loop** (``hand_loop``: raw sessions, numpy masks, the package's exit
  rule) = hand / exit, the hand loop timed as a rival of the exit pass (next to it in every repeat),
  with the confidence interval of the median ratio (``median_ci``) and a verdict: faster, slower
  or parity (the interval holds 1).

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
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):  # the package, and compare_bundles beside this file (also when
    if str(_path) not in sys.path:        # imported as benchmarks.realized_speedup, as serving.py does)
        sys.path.insert(0, str(_path))

from compare_bundles import merge  # noqa: E402  (torch-free)

from jei_edge.bundle import Bundle  # noqa: E402  (torch-free, as the measurement child must stay)
from jei_edge.profile import format_interval, median, median_ci, ratio_verdict  # noqa: E402

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
    # the README's quickstart model (`make demo`: jei-edge train --data digits --lambda 0.1)
    "quickstart": {"quickstart": True, "data": "digits", "lam": 0.1, "backbone_kwargs": {}},
    "vit": {"backbone": "vit", "backbone_kwargs": {"embed_dim": 160, "depth": 7, "heads": 4, "patch": 4, "mlp_ratio": 2.0},
            "base_lam": 0.3, "lam": 0.03},
    "resnet": {"backbone": "resnet", "backbone_kwargs": {"widths": [32, 64, 128], "blocks_per_stage": [2, 2, 2]},
               "base_lam": 1.0, "lam": 1.5},
    # At the size users deploy (112 px RGB, 10 classes): ResNet-18's layout (ImageNet stem, 64-512
    # channels, 2 BasicBlocks per width; 0.48 GMACs) and ViT-S/16 (384 dims, 12 blocks, 6 heads;
    # 1.10 GMACs), an exit after every block. Not trained (hours on 2 cores): BatchNorm statistics
    # from 256 training images, IMs sharpened and gates on p_max (``confidence_gates``), and
    # **declared offsets** chosen on the validation split that spread exits evenly over every exit
    # (``spread_offsets(force=True)``): the stated exit mix. Timing does not depend on the weights.
    "resnet18": {"backbone": "resnet", "declared": True, "data": "synthetic:size=112,channels=3,n=2000",
                 "backbone_kwargs": {"widths": [64, 128, 256, 512], "blocks_per_stage": [2, 2, 2, 2],
                                     "stem": "imagenet", "img_size": 112, "in_chans": 3}},
    "vits16": {"backbone": "vit", "declared": True, "data": "synthetic:size=112,channels=3,n=2000",
               "backbone_kwargs": {"embed_dim": 384, "depth": 12, "heads": 6, "patch": 16, "mlp_ratio": 4.0,
                                   "img_size": 112, "in_chans": 3}},
}
# per-family limits of the large models (ViT-S/16 at batch 256: ~20 s a full pass on 2 cores):
# 24 samples at batch 1, 256 rows at batch 8/64/256, 3 repeats, 1 process, no per-stage medians
LARGE = {"n1": 24, "rows": 256, "repeats": 3, "stage_medians": False}


def large_limits(repeats=None) -> dict:
    """``LARGE``, with ``repeats`` instead of its own when given (``--large-repeats``)."""
    return dict(LARGE, **({"repeats": repeats} if repeats else {}))
VARIANTS = {
    "default": {},  # the target's settings (targets/cpu.toml): pools spin inside a run only, IOBinding
    "spinning_off": {"allow_spinning": False},
    "spinning_on": {"allow_spinning": True, "spin_after_run": True},  # onnxruntime's own: spin after runs too
    "global_pool": {"global_thread_pool": True},
    "one_thread": {"intra_op_threads": 1},
    "no_iobinding": {"io_binding": False},
    "small_batch_1": {"small_batch_rows": 1},  # 1-thread sessions when 1 row is live
    "small_batch_8": {"small_batch_rows": 8},  # ... when <= 8 rows are live (also a batch's tail)
    "row_workers_2": {"row_workers": 2},  # rows split over 2 one-thread workers (no intra-op pool)
    # ... and a call on one live row on pool sessions (a second session per stage)
    "row_workers_2_pool_1": {"row_workers": 2, "small_batch_rows": 1, "small_batch_threads": 0},
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
    if spec.get("declared"):
        return declared_model(family, path, log)
    if spec.get("quickstart"):
        log(f"training the quickstart model ({spec['data']}, lambda {spec['lam']}), 1 thread")
        cfg = TrainConfig(lam=spec["lam"], threads=1)
        save_checkpoint(path, checkpoint=train_jei(cfg, load_data(spec["data"], seed=0), progress=True))
        return path
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


def declared_model(family: str, path: Path, log) -> Path:
    """An untrained model at deployment size with exits that vary between inputs (see ``MODELS``)."""
    import torch

    from jei_edge.data import load_data
    from jei_edge.model.checkpoint import save_checkpoint
    from jei_edge.model.jei import build_model, confidence_gates

    spec = MODELS[family]
    log(f"making {family} ({spec['backbone_kwargs']}): untrained, BatchNorm statistics + confidence gates")
    data = load_data(spec["data"], seed=0)
    torch.manual_seed(0)
    model = build_model({"backbone": spec["backbone"], "backbone_kwargs": dict(spec["backbone_kwargs"]), "exits": None})
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for i in range(0, 256, 32):
            model(torch.from_numpy(data.train.x[i:i + 32]))
    confidence_gates(model, torch.from_numpy(data.val.x[:256]), quantiles=(0.5,))
    save_checkpoint(path, model, class_names=data.class_names, preprocessing=data.preprocessing,
                    training={"data": {"source": spec["data"], "split_seed": 0},
                              "note": "untrained (benchmarks/realized_speedup.py declared_model)"})
    return path


def ensure_bundle(model: Path, log, rebuild: bool = False) -> Path:
    out = model.with_suffix(".jei")
    if out.exists() and not rebuild:
        return out
    from jei_edge.compile import BuildOptions, build_bundle

    log(f"building {out}")
    # the untrained large models' steep confidence gates round ~1.1e-5 apart in onnxruntime vs
    # PyTorch (ResNet-18 layout, measured), over the default 1e-5 bound: built with --tolerance 1e-4
    declared = bool(MODELS.get(model.stem, {}).get("declared"))
    build_bundle(model, out, BuildOptions(force=True, tolerance=1e-4 if declared else 1e-5), progress=log)
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
def hand_loop(rt, settings=None):
    """The loop a user could write in ten minutes: raw onnxruntime sessions on the bundle's stage
    files (``settings``: the runtime's own; None: onnxruntime's defaults), numpy boolean masks,
    survivors gathered with fancy indexing, and the package's exit rule (``exit_mask``). The honest
    lower bar for any runtime. Returns ``run(batch, offsets) -> (probs, exit_index)``, or None for a
    bundle with merged stages (the three-line loop does not handle them)."""
    import onnxruntime as ort

    from jei_edge.exit_rule import exit_mask

    man = rt.manifest
    if any(st.merged for st in man.stages):
        return None
    from jei_edge.backends.onnxruntime.executor import session_kwargs

    def session(path):  # the runtime's session settings, or onnxruntime's defaults
        if settings is None:
            return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return ort.InferenceSession(str(path), **session_kwargs(path, settings))

    sess = [session(rt.bundle.file(st.file)) for st in man.stages]
    names = [s.get_inputs()[0].name for s in sess]
    exits = [st.exit for st in man.stages]
    last, classes = len(sess) - 1, man.num_classes

    def run(x, offsets=None):
        probs = np.empty((len(x), classes), np.float32)
        exit_index = np.empty(len(x), np.int64)
        idx, S, h = np.arange(len(x)), np.zeros(len(x)), x
        for k, sk in enumerate(sess):
            out = sk.run(None, {names[k]: h})
            if k == last:
                probs[idx], exit_index[idx] = out[0], exits[k]
                break
            hidden, p, g = out
            ex = exit_mask(g, S, offsets[k] if offsets else 0.0)
            probs[idx[ex]], exit_index[idx[ex]] = p[ex], exits[k]
            keep = ~ex
            if not keep.any():
                break
            h, S, idx = hidden[keep], (S + g)[keep], idx[keep]
        return probs, exit_index

    return run


def measure(bundle: str, inputs: str, batches, repeats: int, n1: int, n64: int, options: dict, offsets=None,
            stage_medians: bool = True, rows: int = 0) -> dict:
    """Everything of one bundle in this (torch-free) process. ``rows``: samples per batch size > 1
    (default ``max(n64, 2 x batch)``); ``stage_medians``: also time every stage standalone at batch
    1 and 64 (the per-stage-median ideal; costly on large models)."""
    from jei_edge.profile import Breakdown, Passes, interleaved, median_ratio, ratios, settings_record, theoretical_speedup
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
    # the loop on the runtime's own session settings. Not on onnxruntime's defaults: their pools
    # spin after every run and steal the cores from whatever runs next in the process (measured:
    # with an ORT-defaults loop in the same process the same-settings loop timed 1.5-4x slower);
    # what spinning after runs costs is the ``spinning_on`` variant. Row workers are the runtime's loop, not
    # a session setting: the hand loop makes whole calls on sessions with intra-op threads instead
    settings = rt.executor.settings
    hand = hand_loop(rt, dataclasses.replace(settings, row_workers=0) if settings.row_workers > 1 else settings)
    cost_vs_plain = np.asarray(exits.cost_vs_plain)
    for bsz in batches:
        n = n1 if bsz == 1 else (rows or max(n64, 2 * bsz))
        # the package's passes and protocol (jei_edge.profile, shared with `jei-edge profile`); the
        # plain backbone gets the stages' thread policy (small-batch settings when the batch is small)
        # the hand-written loop is a rival of the exit pass: timed next to it in every repeat
        rivals = {"hand": (lambda b: hand(b, offsets))} if hand is not None else None
        p = Passes.for_runtime(rt, bsz, rivals=rivals)
        xs = p.batches(x, bsz, n)
        untimed = [rt.run(b, offsets=offsets) for b in xs]  # one pass gives reach counts and exits
        reaches = [r.reach for r in untimed]
        boundaries = p.boundaries(reaches)
        timed_exits = np.concatenate([r.exit_index for r in untimed])
        if hand is not None:  # the hand-written loop decides exactly as the runtime (and is warm after this)
            got = np.concatenate([hand(b, offsets)[1] for b in xs])
            if not np.array_equal(got, timed_exits):
                raise RuntimeError(f"the hand-written loop disagrees with the runtime on "
                                   f"{int((got != timed_exits).sum())} rows")
        timed_stage_medians = stage_medians and bsz in (1, 64)
        pairs = sorted({(k, m) for r in reaches for k, m in enumerate(r)}) if timed_stage_medians else []
        stage_t = {q: [] for q in pairs}
        inner = 5 if bsz == 1 else 2

        def each_repeat(i):  # standalone t_k(m), interleaved with the repeats
            for (k, m) in pairs:
                for _ in range(inner):
                    stage_t[(k, m)].append(p.stage_time(k, m))

        samples = interleaved([p], xs, [reaches], repeats, offsets, warmup=2, each_repeat=each_repeat)[0]
        tk = {q: median(v) for q, v in stage_t.items()}
        ideal_from_medians = sum(tk[(k, m)] for r in reaches for k, m in enumerate(r)) if pairs else None
        ideal = median(samples["ideal"])
        theory = theoretical_speedup(cost_vs_plain, timed_exits)
        # decide + compact measured directly inside the loop (one extra, untimed pass)
        bd = Breakdown(rt)
        for b in xs:
            bd.run(b, offsets=offsets)
        te, tf, tp = (median(samples[k]) for k in ("exit", "full", "plain"))
        timed_rows = len(xs) * bsz
        out[f"batch_{bsz}"] = {
            "batches": len(xs), "samples": timed_rows, "boundaries": boundaries,
            "reach_total": p.reach_total(reaches),
            "exit_s": te, "full_s": tf, "plain_s": tp, "ideal_s": ideal,
            "ideal_from_stage_medians_s": ideal_from_medians,
            "efficiency_vs_stage_medians": ideal_from_medians / te if pairs else None,
            # the same stage runs back to back, no runtime work at all, against the per-stage
            # medians: how much of the second reading's gap a zero-cost runtime would still show
            "back_to_back_vs_stage_medians": ideal_from_medians / ideal if pairs else None,
            "hand_s": median(samples["hand"]) if hand is not None else None,
            "speedup_vs_hand": median_ratio(samples["hand"], samples["exit"]) if hand is not None else None,
            # per-repeat ratios: run_child pools them over processes into a confidence interval
            "ratios_vs_hand": ratios(samples["hand"], samples["exit"]).tolist() if hand is not None else None,
            "ratios_efficiency": ratios(samples["ideal"], samples["exit"]).tolist(),
            "theoretical_speedup_vs_plain": theory,
            "timed_exit_histogram": np.bincount(timed_exits, minlength=rt.num_exits).tolist(),
            "stage_ms": {f"{k}@{m}": round(1e3 * v, 4) for (k, m), v in sorted(tk.items()) if m in (1, bsz)},
            "efficiency": median_ratio(samples["ideal"], samples["exit"]),
            "realized_speedup": median_ratio(samples["full"], samples["exit"]),
            "speedup_vs_plain": median_ratio(samples["plain"], samples["exit"]), "efficiency_ratio_of_medians": ideal / te,
            "speedup_vs_plain_over_theory": median_ratio(samples["plain"], samples["exit"]) / theory,
            "ideal_speedup_vs_full": tf / ideal,
            "overhead_us_per_boundary": 1e6 * (te - ideal) / max(boundaries, 1),
            "decide_compact_us_per_boundary": 1e6 * bd.mean("boundary"),
            "exit_ms_per_sample": 1e3 * te / timed_rows, "full_ms_per_sample": 1e3 * tf / timed_rows,
            "plain_ms_per_sample": 1e3 * tp / timed_rows,
            "spread_exit_s": [min(samples["exit"]), max(samples["exit"])],
        }
    return out


def run_child(bundle: Path, inputs: Path, variant: str, args, offsets, processes: int = None,
              limits: dict = None) -> dict:
    """``args.processes`` fresh measurement processes; per-batch numbers are medians across them
    (thread placement and memory layout differ between processes: a few % on a shared machine)."""
    runs = [_run_child_once(bundle, inputs, variant, args, offsets, limits or {})
            for _ in range(processes or args.processes)]
    out = dict(runs[0])
    for key in (k for k in runs[0] if k.startswith("batch_")):
        merged = merge([r[key] for r in runs])  # medians of every number, nested dicts too
        merged["per_process"] = {f: [r[key][f] for r in runs] for f in ("efficiency", "realized_speedup",
                                                                         "speedup_vs_plain", "exit_ms_per_sample")}
        # confidence intervals of the median ratio over every repeat of every process
        for f, ci_key in (("ratios_vs_hand", "speedup_vs_hand_ci"), ("ratios_efficiency", "efficiency_ci")):
            pooled = [v for r in runs for v in (r[key].get(f) or [])]
            merged[f] = pooled or None
            merged[ci_key] = median_ci(pooled) if pooled else None
        out[key] = merged
    return out


def _run_child_once(bundle: Path, inputs: Path, variant: str, args, offsets, limits: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", str(bundle), str(inputs), "--variant", variant,
           "--offsets", json.dumps(offsets), "--repeats", str(limits.get("repeats", args.repeats)),
           "--n1", str(limits.get("n1", args.n1)), "--n64", str(args.n64), "--batches", limits.get("batches", args.batches),
           "--rows", str(limits.get("rows", 0))] + ([] if limits.get("stage_medians", True) else ["--no-stage-medians"])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement of {bundle} ({variant}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# CPU features that change which onnxruntime kernels run (INT8 above all: VNNI / AMX dot products)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")


def machine() -> dict:
    """The host as every result file records it. ``isa``: the ``ISA_FLAGS`` the CPU reports (a
    cloud VM's "AMD EPYC" may be one of several generations; INT8 timings differ between them)."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's entries
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = info.get("model name") or platform.processor()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    import onnxruntime

    code = provenance()
    return {"cpu": cpu, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "host": platform.node(), "commit": code["commit"] + ("+changes" if code["dirty_paths"] else "")}


def provenance(paths=("jei_edge", "benchmarks")) -> dict:
    """The code measured: the commit, the uncommitted changes under ``paths``, the imported package
    (every benchmark records this; "" / [] where git is unavailable)."""
    def git(*args) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import jei_edge

    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty_paths": git("status", "--porcelain", "--", *paths).splitlines(),
            "package": str(Path(jei_edge.__file__).resolve().parent)}


def _batch_rows(section: dict):
    """``(family, family results, batch size, batch results)`` of a results section, in order."""
    for fam, r in section.items():
        for key in sorted((k for k in r if k.startswith("batch_")), key=lambda k: int(k[6:])):
            yield fam, r, key[6:], r[key]


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Realized speedup (CPU, onnxruntime {m['onnxruntime']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; load average before/after {res['load_before']} / "
             f"{res['load_after']}. Medians over {res['repeats']} repeats in each of {res['processes']} processes (median "
             f"across processes). Command: `{res['command']}`.", "",
             "[CI]: distribution-free confidence interval of the median per-repeat ratio (order statistics "
             "of every repeat of every process; 95% where there are at least 6 repeats, else min-max); "
             "faster / slower: the whole interval is above / below 1; parity: it holds 1 (the two cannot be "
             "told apart on this machine)." + "".join(
                 f" {fam}: {r['limits']['repeats']} repeats, {r['limits']['n1']} samples at batch 1, "
                 f"{r['limits']['rows']} rows at larger batches (a wider interval)."
                 for fam, r in res["families"].items() if r.get("limits")), "",
             "| family | batch | exits of the timed rows | theoretical speedup vs plain (MACs) | measured speedup "
             "vs plain | measured / theoretical | speedup vs hand-written loop (same session settings) [CI] | "
             "efficiency (ideal/exit) [CI] | per-stage-median ideal | realized speedup (full/exit) | overhead / boundary "
             "| exit ms/sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fam, r, bsz, b in _batch_rows(res["families"]):
        hand_cell = "-" if b.get("speedup_vs_hand") is None else f"{b['speedup_vs_hand']:.2f}x"
        if b.get("speedup_vs_hand_ci"):
            hand_cell += f" {format_interval(b['speedup_vs_hand_ci'], 2)} {ratio_verdict(b['speedup_vs_hand_ci'])}"
        eff_cell = f"{b['efficiency']:.3f}" + (f" {format_interval(b['efficiency_ci'])}" if b.get("efficiency_ci") else "")
        med = "-" if b.get("efficiency_vs_stage_medians") is None else \
            f"{b['efficiency_vs_stage_medians']:.3f} ({b['back_to_back_vs_stage_medians']:.3f})"
        lines.append(f"| {fam} | {bsz} | {b.get('timed_exit_histogram', r['exit_histogram'])} | "
                     f"{b['theoretical_speedup_vs_plain']:.2f}x | {b['speedup_vs_plain']:.2f}x | "
                     f"{b['speedup_vs_plain_over_theory']:.3f} | {hand_cell} | {eff_cell} | {med} | "
                     f"{b['realized_speedup']:.2f}x | {b['overhead_us_per_boundary']:.1f} us | "
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
        if r.get("declared_offsets"):
            offs += " (declared: untrained model, offsets spread exits evenly on the validation split)"
        lines.append(f"- {fam} ({r['stages']} stages, {r['model']['backbone_kwargs'] or 'the quickstart ViT'}): "
                     f"threshold offsets {offs}; "
                     f"test exits at offsets 0: {r['trained_exit_histogram']}; accuracy exit {100 * r['accuracy_exit']:.1f}% "
                     f"/ full {100 * r['accuracy_full']:.1f}%; mean cost {r['mean_cost']:.3f} "
                     f"({r['mean_cost_vs_plain']:.3f} of the plain backbone)")
    for fam, variants in (res.get("variants") or {}).items():
        if not variants:
            continue
        lines += ["", f"Session settings ({fam}): efficiency / exit ms per sample / speedup vs plain (same settings) / "
                      f"speedup vs the hand-written loop [CI] (whole calls, same settings but no row workers)", "",
                  "| variant | settings | batch 1 | batch 64 |", "|---|---|---|---|"]

        def hand(b):
            if b.get("speedup_vs_hand") is None:
                return "-"
            ci = b.get("speedup_vs_hand_ci")
            return f"{b['speedup_vs_hand']:.2f}x" + (f" {format_interval(ci, 2)}" if ci else "")

        for name, r in variants.items():
            cells = [f"{r[k]['efficiency']:.3f} / {r[k]['exit_ms_per_sample']:.3f} ms / {r[k]['speedup_vs_plain']:.2f}x"
                     f" / {hand(r[k])}" if k in r else "-" for k in ("batch_1", "batch_64")]
            lines.append(f"| {name} | {VARIANTS[name] or 'target default'} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--families", default="quickstart,vit,resnet,resnet18,vits16")
    p.add_argument("--lambdas", default="", help="override training lambdas, e.g. vit=0.3,resnet=2 (new --work dir)")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--processes", type=int, default=3, help="measurement processes per family (median across them)")
    p.add_argument("--variant-processes", type=int, default=1, help="measurement processes per settings variant")
    p.add_argument("--n1", type=int, default=150, help="samples run one at a time (batch 1)")
    p.add_argument("--n64", type=int, default=512, help="samples run in batches of 64")
    p.add_argument("--large-repeats", type=int, default=None,
                   help=f"repeats of the large declared models (default {LARGE['repeats']}: their passes are long)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="thread-setting variants to compare ('' = none)")
    p.add_argument("--variants-family", default="vit", help="families the variants run on")
    p.add_argument("--spread-families", default="vit,resnet",
                   help="also run these families with offsets that spread exits over every exit ('' = none)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "realized_speedup.json"))
    p.add_argument("--prepare-only", action="store_true", help="train + build, no measurement")
    p.add_argument("--rebuild", action="store_true", help="rebuild the bundles even if they exist")
    p.add_argument("--quick", action="store_true", help="3 repeats, fewer samples (smoke run)")
    p.add_argument("--child", nargs=2, metavar=("BUNDLE", "INPUTS"), help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    p.add_argument("--offsets", default="null", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-stage-medians", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.n1, args.n64, args.processes = 3, 40, 256, 1
    batches = [int(b) for b in args.batches.split(",")]
    for item in filter(None, args.lambdas.split(",")):
        fam, _, lam = item.partition("=")
        MODELS[fam.strip()]["lam"] = float(lam)
    if args.child:
        r = measure(args.child[0], args.child[1], batches, args.repeats, args.n1, args.n64, VARIANTS[args.variant],
                    json.loads(args.offsets), stage_medians=not args.no_stage_medians, rows=args.rows)
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
        declared = bool(MODELS[fam].get("declared"))
        prepared[fam] = (model, ensure_bundle(model, log, args.rebuild), test_inputs(model, work),
                         spread_offsets(model, force=declared))
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

    limits = large_limits(args.large_repeats)
    for fam, (model, bundle, inputs, offsets) in prepared.items():
        log(f"measuring {fam} ({', '.join(map(str, batches))}), offsets {np.round(offsets, 3).tolist()}")
        large = bool(MODELS[fam].get("declared"))
        r = run_child(bundle, inputs, "default", args, offsets, processes=1 if large else None,
                      limits=limits if large else None)
        if large:
            r["limits"] = limits
        r["declared_offsets"] = large
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
        res["spread"][fam] = run_child(bundle, inputs, "default", args, offsets, args.variant_processes,
                                       limits={"batches": "1,64"})
        save()
    variants = [v for v in args.variants.split(",") if v]
    res["variants"] = {}
    for fam in (f for f in args.variants_family.split(",") if f in prepared):
        res["variants"][fam] = {}
        model, bundle, inputs, offsets = prepared[fam]
        vlimits = dict(limits if MODELS[fam].get("declared") else {}, batches="1,64")
        for v in variants:
            log(f"variant {fam} {v}")
            res["variants"][fam][v] = run_child(bundle, inputs, v, args, offsets, args.variant_processes,
                                                limits=vlimits)
            save()
    save()
    log(f"wrote {out} and {out.with_suffix('.md')}")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
