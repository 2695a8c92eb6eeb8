"""``build_bundle``: model.pt -> NAME.jei/ (plan, export, parity, atomic write).

Steps (DESIGN.md "Data flow"): load the checkpoint (weights only), plan stages (one per exit),
export every stage and the plain backbone to ONNX, copy ``model.pt`` (optional), write the
manifest, load the bundle with the real runtime and check parity against PyTorch, write the build
report, rehash, fsync and rename into place. Any failure leaves nothing at the output path.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from jei_edge import __version__
from jei_edge.compile.parity import ParitySettings, check_decisions, check_stages, parity_inputs
from jei_edge.compile.writer import StagingDir, file_table, write_json
from jei_edge.errors import BuildError, JeiEdgeError
from jei_edge.runtime.bundle import MANIFEST, SCHEMA, SCHEMA_VERSION

log = logging.getLogger(__name__)
MIN_OPSET = 17


@dataclass(frozen=True)
class BuildOptions:
    """Settings of one build (defaults in one place; the CLI maps its flags onto these)."""

    target: str = "cpu"
    precision: Optional[str] = None  # None = the target's default
    data: Optional[str] = None  # real parity inputs; None = the source named in the checkpoint
    include_model: bool = True  # carry model.pt (the torch-cuda executor needs it)
    force: bool = False  # replace an existing bundle
    parity_samples: int = 10_000
    stage_samples: int = 512
    tolerance: float = 1e-5
    seed: int = 0
    opset: Optional[int] = None  # None = the target's (>= 17)
    plan: str = "every"  # stage plan: "every" (one stage per exit), "auto" (measured), or groups "0-3,4,5"
    plan_batch: int = 1  # batch size the "auto" plan is timed and optimised for
    calibration: str = "default"  # INT8: a recipe name (jei_edge/calibration/) or a .toml file
    min_agreement: float = 0.95  # INT8: fail below this exit-decision agreement with the FP32 model


def toolchain(opset: int) -> Dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"jei_edge": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "opset": int(opset), "exporter": "torch.onnx (TorchScript, dynamo=False)"}


def _real_inputs(ckpt: Dict, data: Optional[str], seed: int, notes: list):
    """Normalised real inputs (test + calib + val splits) for parity, or None; also the source
    and its loaded splits (reused for INT8 calibration)."""
    rec = (ckpt.get("training") or {}).get("data") or {}
    source = data or rec.get("source")
    if not source:
        notes.append("no data source given or recorded in the checkpoint: parity used synthetic inputs only "
                     "(pass --data SOURCE)")
        return None, None, None
    from jei_edge.data import load_data

    try:
        d = load_data(source, preprocessing=ckpt["preprocessing"], seed=int(rec.get("split_seed", seed)))
    except JeiEdgeError as exc:
        if data:
            raise
        notes.append(f"recorded data source '{source}' could not be loaded ({exc}); synthetic inputs only")
        return None, None, None
    return np.concatenate([d.test.x, d.calib.x, d.val.x]), source, d


def _calibration_inputs(ckpt: Dict, recipe, options: BuildOptions, loaded=(None, None)) -> np.ndarray:
    """INT8 calibration inputs: the calibration split (then validation) of the recipe's data, of
    ``--data``, or of the data recorded in the checkpoint; at most ``recipe.samples`` rows.
    ``loaded``: ``(source, splits)`` the parity inputs came from, reused when the source is the same."""
    rec = (ckpt.get("training") or {}).get("data") or {}
    source = recipe.data or options.data or rec.get("source")
    if not source:
        raise BuildError("INT8 needs calibration data and none is given or recorded in the checkpoint",
                         hint="pass --data SOURCE (e.g. the data the model was trained on) or set data in the recipe")
    d = loaded[1] if loaded[0] == source else None
    if d is None:
        from jei_edge.data import load_data

        d = load_data(source, preprocessing=ckpt["preprocessing"], seed=int(rec.get("split_seed", options.seed)))
    x = np.concatenate([d.calib.x, d.val.x])[:recipe.samples]
    if len(x) == 0:
        raise BuildError(f"INT8 calibration set from '{source}' is empty", hint="use a data source with samples")
    return np.ascontiguousarray(x)


def _plan(model, options: BuildOptions, real, tmp: Path, target, opset: int, say):
    """Exit groups for ``plan_stages`` (None = one stage per exit) and the plan's report."""
    from jei_edge.compile.plan import parse_groups

    n_exits = len(model.stage_ranges())
    mode = (options.plan or "every").strip()
    if mode == "every":
        return None, {"mode": "every", "groups": [[k] for k in range(n_exits)]}
    if mode != "auto":
        groups = parse_groups(mode, n_exits)
        return groups, {"mode": "manual", "groups": [list(g) for g in groups]}
    if real is None or not len(real):
        raise BuildError("--plan auto needs real inputs for its exit statistics, and none could be loaded",
                         hint="pass --data SOURCE (the data the model was trained on), or use --plan every")
    if options.plan_batch < 1:
        raise BuildError(f"plan_batch must be >= 1, got {options.plan_batch}")
    from jei_edge.compile.planning import auto_groups
    from jei_edge.runtime.ort_backend import OrtSettings

    work = tmp / ".planning"
    work.mkdir()
    try:
        groups, report = auto_groups(model, real, work, OrtSettings.from_options(target.backend_options), opset,
                                     batch=options.plan_batch, progress=say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"plan: exits grouped {[list(g) for g in groups]} (expected {report['expected_ms_per_sample']:.3f} ms/sample "
        f"at batch {options.plan_batch} vs {report['expected_ms_per_sample_every_exit']:.3f} with a stage per exit)")
    return groups, report


def _manifest(ckpt: Dict, model, target, precision: str, stages, plain, include_model: bool, opset: int,
              name: str) -> Dict:
    costs = ckpt["costs"]
    calib = ckpt.get("calibration") or {}
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "target": target.to_manifest(), "precision": precision,
        "backbone": {"name": ckpt["config"]["backbone"], "family": model.spec.family,
                     "kwargs": ckpt["config"].get("backbone_kwargs", {}), "blocks": len(model.blocks)},
        "input": {"name": "x", "shape": ["batch"] + [int(d) for d in model.input_shape], "dtype": "float32"},
        "num_classes": int(model.num_classes), "class_names": list(ckpt["class_names"]),
        "preprocessing": ckpt["preprocessing"],
        "stages": stages, "plain": plain,
        "exits": {"positions": list(ckpt["exits"]["positions"]), "pos_weights": list(ckpt["exits"]["pos_weights"]),
                  "alphas": list(calib.get("alphas", [])), "qhat": [list(r) for r in calib.get("qhat", [])],
                  "calibration_split_size": calib.get("split_size", 0),
                  "exit_macs": costs["exit_macs"], "cost": costs["cost"], "cost_vs_plain": costs["cost_vs_plain"]},
        "costs": {"full_macs": costs["full_macs"], "plain_macs": costs["plain_macs"],
                  "stage_macs": [s["macs"] for s in stages]},
        "model_file": "model.pt" if include_model else None,
        "report": "report.json", "report_text": "report.txt",
        "toolchain": toolchain(opset),
        "files": {},
    }


def _summary(report: Dict) -> str:
    d, s = report["decisions"], report["stage_parity"]
    lines = [f"jei-edge build report: {report['bundle']}",
             f"  model      {report['model']}",
             f"  target     {report['target']} ({report['precision']}), {report['num_stages']} stages, "
             f"opset {report['opset']}",
             f"  parity     per stage on {s['samples']} inputs (tolerance {s['tolerance']:g}):"]
    for row in s["stages"]:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in row["max_abs_error"].items())
        lines.append(f"             stage {row['stage']}: {errs}")
    if "plain" in s:
        lines.append(f"             plain backbone: probs {s['plain']['max_abs_error']['probs']:.2e}")
    lines += [f"  decisions  {d['samples']} inputs ({', '.join(f'{k} {v}' for k, v in report['parity_inputs'].items())})",
              f"             agreement {100 * d['agreement']:.3f}%, {d['disagreements']} differ " +
              (f"(all within the tie band |g - thr| < {d['tolerance']:g})" if "min_agreement" not in d else
               f"(INT8 vs the FP32 model; required >= {100 * d['min_agreement']:.1f}%; "
               f"{d['disagreements_within_tie_band']} within the FP32 tie band)"),
              f"             exit histogram PyTorch {d['exit_histogram_pytorch']}, bundle {d['exit_histogram_bundle']}",
              f"             probs at exit max abs error {d['exit_probs_max_abs_error']:.2e}, "
              f"full mode {d['full_mode_probs_max_abs_error']:.2e}",
              f"  time       {report['seconds']}"]
    q = report.get("quantization")
    if q:
        lines.insert(3, f"  int8       recipe '{q['recipe']}' ({q['method']}, activations {q['activations']}, weights "
                        f"{q['weights']}; FP32: {', '.join(q['fp32'])}); calibration {q['calibration_samples']} samples, "
                        "rows per stage " + str([st['calibration_rows'] for st in q['stages']]))
    lines += [f"  note       {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def build_bundle(model_path, output=None, options: BuildOptions = BuildOptions(),
                 progress: Optional[Callable[[str], None]] = None) -> Dict:
    """Compile ``model_path`` into a bundle directory; returns the build report (also in the bundle).

    Args:
        model_path: a ``model.pt`` checkpoint.
        output: the bundle directory (default ``<model stem>.jei`` beside the checkpoint).
        options: ``BuildOptions``.
        progress: called with a short message at each step (the CLI prints them).

    Raises:
        CheckpointError, BuildError, JeiEdgeError: nothing is left at ``output`` in that case.
    """
    import torch

    from jei_edge.compile.export import export_plain, export_stages
    from jei_edge.compile.plan import plan_stages
    from jei_edge.model.checkpoint import model_from_checkpoint, read_checkpoint
    from jei_edge.runtime.ort_backend import OrtSettings, create_session
    from jei_edge.runtime.runtime import Runtime
    from jei_edge.runtime.targets import load_target

    say = progress or (lambda msg: log.info(msg))
    t0 = time.perf_counter()
    timings: Dict[str, float] = {}
    target = load_target(options.target)
    if target.backend != "onnxruntime":
        raise BuildError(f"target '{target.name}' uses backend '{target.backend}', which this build does not produce yet",
                         hint="use --target cpu")
    precision = options.precision or target.default_precision
    if precision not in target.precisions or precision not in ("fp32", "int8"):
        raise BuildError(f"precision '{precision}' is not available for target '{target.name}'",
                         hint=f"the target lists {list(target.precisions)}; this build produces fp32 and int8")
    recipe = None
    if precision == "int8":
        from jei_edge.compile.quantize import load_recipe

        recipe = load_recipe(options.calibration)
        if not 0.0 <= options.min_agreement <= 1.0:
            raise BuildError(f"min_agreement must be in [0, 1], got {options.min_agreement}")
    opset = int(options.opset or target.opset)
    if opset < MIN_OPSET:
        raise BuildError(f"opset {opset} is too old; jei-edge exports opset >= {MIN_OPSET}")
    if options.parity_samples < 1 or options.stage_samples < 1 or not options.tolerance >= 0:
        raise BuildError("parity_samples and stage_samples must be >= 1 and tolerance >= 0")
    model_path = Path(model_path)
    ckpt = read_checkpoint(model_path)
    model = model_from_checkpoint(ckpt, source=f"checkpoint '{model_path}'")
    output = Path(output) if output is not None else model_path.with_suffix(".jei")
    notes: list = []
    if options.parity_samples < 10_000:
        notes.append(f"decision parity on {options.parity_samples} inputs, fewer than the 10,000 of a release build")
    real, source, splits = _real_inputs(ckpt, options.data, options.seed, notes)
    x_calib = _calibration_inputs(ckpt, recipe, options, (source, splits)) if recipe is not None else None
    x, counts = parity_inputs(ckpt["preprocessing"], real, options.parity_samples, options.seed)
    timings["load"] = time.perf_counter() - t0

    with StagingDir(output, force=options.force) as staging:
        tmp = staging.tmp
        say(f"exporting the stages of {len(model.stage_ranges())} exits + plain backbone (opset {opset})")
        t = time.perf_counter()
        groups, plan_report = _plan(model, options, real, tmp, target, opset, say)
        plans = plan_stages(model, ckpt["costs"], groups)
        example = torch.from_numpy(x[:2].copy())
        stages = export_stages(model, plans, tmp, example, opset)
        plain = export_plain(model, tmp, example, opset)
        plain["macs"] = int(ckpt["costs"]["plain_macs"])
        quant = None
        if recipe is not None:
            from jei_edge.compile.quantize import quantize_bundle_graphs

            t_q = time.perf_counter()
            quant = quantize_bundle_graphs(model, plans, stages, plain, tmp, x_calib, recipe, progress=say)
            timings["quantize"] = time.perf_counter() - t_q
        if options.include_model:
            shutil.copyfile(model_path, tmp / "model.pt")
        manifest = _manifest(ckpt, model, target, precision, stages, plain, options.include_model, opset, output.stem)
        manifest["plan"] = plan_report
        if quant is not None:
            manifest["quantization"] = quant
        write_json(tmp / "report.json", {})
        (tmp / "report.txt").write_text("")
        manifest["files"] = file_table(tmp)
        write_json(tmp / MANIFEST, manifest)
        timings["export"] = time.perf_counter() - t

        say(f"parity: {len(stages)} stages on {min(len(x), options.stage_samples)} inputs, "
            f"decisions on {len(x)} inputs")
        t = time.perf_counter()
        ps = ParitySettings(samples=options.parity_samples, stage_samples=options.stage_samples,
                            tolerance=options.tolerance, seed=options.seed)
        settings = OrtSettings.from_options(target.backend_options)
        sessions = [create_session(tmp / s["file"], settings, f"stage {s['index']}") for s in stages]
        plain_sess = create_session(tmp / plain["file"], settings, "plain backbone")
        int8 = quant is not None
        stage_report = check_stages(model, stages, sessions, plain_sess, x[:options.stage_samples], ps, strict=not int8)
        del sessions, plain_sess
        rt = Runtime.load(tmp, device="cpu")
        decisions = check_decisions(model, rt, x, ps, min_agreement=options.min_agreement if int8 else None)
        del rt
        timings["parity"] = time.perf_counter() - t

        report = {
            "bundle": str(output), "model": str(model_path), "target": target.name, "precision": precision,
            "opset": opset, "num_stages": len(stages), "options": asdict(options),
            "parity_inputs": counts, "data_source": source, "plan": plan_report, "quantization": quant,
            "stage_parity": stage_report, "decisions": decisions,
            "seconds": {k: round(v, 3) for k, v in timings.items()}, "notes": notes,
        }
        report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / "report.json", report)
        (tmp / "report.txt").write_text(_summary(report), encoding="utf-8")
        manifest["files"] = file_table(tmp)
        write_json(tmp / MANIFEST, manifest)
        say(f"writing {output}")
        staging.commit()
    return report
