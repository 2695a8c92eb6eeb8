"""``build_bundle``: model.pt -> NAME.jei/ in three steps with a clear hand-over.

1. **export** (needs torch; ``export_bundle``): plan the stages, export every stage and the plain
   backbone to ONNX, quantize them (INT8: calibrated on the PyTorch model), check every stage
   graph against its PyTorch stage (``parity.check_stages``), compute the PyTorch model's reference
   outputs and exit decisions, store them (``reference/verify.npz``) and write the typed manifest.
2. **lower** (torch-free; ``lower.lower_bundle``): one TensorRT-RTX engine per stage for RTX
   targets (built here, no GPU needed); nothing for onnxruntime; for Jetson targets the lowering
   plan only, unless JetPack's TensorRT is installed here (``jei-edge lower`` on the board).
3. **verify** (torch-free; ``verify.verify_bundle``): the real runtime against the references;
   a failure fails the build. ``jei-edge verify`` runs the same check later, elsewhere. Engines
   this jei-edge cannot run here are not run: their stage graphs are verified through onnxruntime
   instead (the engines are built from exactly those graphs), and the report says so.

Precisions: ``fp32``; ``fp16`` (stage graphs exported from ``half_precision(model)``: FP16 compute
and hidden states, FP32 input guard, softmaxes and gates); ``int8`` (Q/DQ graphs: onnxruntime's
asymmetric activations for cpu, symmetric for TensorRT).

Then the build report is written, the manifest rehashed, and the staging directory fsynced and
renamed into place (``writer.StagingDir``): a failure at any step leaves nothing at the output.
"""

from __future__ import annotations

import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import numpy as np

from jei_edge import __version__
from jei_edge.bundle.manifest import Costs, Exits, Manifest, Preprocessing, References, TensorSpec
from jei_edge.compile.inputs import RealData, calibration_inputs, load_real, parity_inputs
from jei_edge.compile.lower import check_lowerable, int8_form, lower_bundle, lowering_note, lowering_plan
from jei_edge.compile.parity import (AUTO_MAX, PROBE_ROWS, check_stages, parse_samples, probe_seconds_per_input,
                                     size_check)
from jei_edge.compile.progress import Progress
from jei_edge.compile.references import REFERENCE_FILE, ReferenceSet, compute_references
from jei_edge.compile.report import summary_text
from jei_edge.compile.verify import verify_bundle, verify_device
from jei_edge.compile.writer import StagingDir, write_json, write_manifest
from jei_edge.errors import BuildError

MIN_OPSET = 17
PRECISIONS = ("fp32", "fp16", "int8")  # what this build produces


@dataclass(frozen=True)
class BuildOptions:
    """Settings of one build (defaults in one place; the CLI maps its flags onto these)."""

    target: str = "cpu"
    precision: Optional[str] = None  # None = the target's default
    data: Optional[str] = None  # real parity inputs; None = the source named in the checkpoint
    include_model: bool = True  # carry model.pt (the torch-cuda executor needs it)
    force: bool = False  # replace an existing bundle
    parity_samples: Union[int, str] = "auto"  # decision-check inputs; "auto" = sized to the export time
    stage_samples: int = 512  # per-stage tensor check inputs (at most)
    tolerance: float = 1e-5
    seed: int = 0
    opset: Optional[int] = None  # None = the target's (>= 17)
    plan: str = "every"  # stage plan: "every" (one stage per exit), "auto" (measured), or groups "0-3,4,5"
    plan_batch: int = 1  # batch size the "auto" plan is timed and optimised for
    calibration: str = "default"  # INT8: a recipe name (calibration/) or a .toml file
    min_agreement: float = 0.95  # INT8: fail below this exit-decision agreement with the FP32 model
    # INT8: hidden states cross stage edges quantized (compile/quantize.py): True every edge, False none,
    # None the edges whose next stage quantizes its input anyway, on onnxruntime targets
    quantized_edges: Optional[bool] = None
    # INT8: "auto" keeps the fewest stages in FP32 that hold min_agreement on the calibration inputs
    # (compile/fallback.py; engine targets build those stages' engines in FP32), "off" quantizes every stage
    int8_fallback: str = "auto"


@dataclass(frozen=True)
class Job:
    """One build, resolved from its options: what the steps work on."""

    options: BuildOptions
    target: Any  # jei_edge.runtime.targets.Target
    precision: str
    opset: int
    recipe: Any  # jei_edge.compile.quantize.Recipe (INT8) or None
    notes: tuple  # what the build changed or could not do, for the report
    parity_samples: Union[int, str]
    model_path: Path
    output: Path
    ckpt: Dict
    model: Any  # the JEIModel
    real: RealData

    @property
    def ort_options(self) -> Dict:
        """onnxruntime settings of the build's own checks (the target's when it is an onnxruntime target)."""
        return dict(self.target.backend_options) if self.target.backend == "onnxruntime" else {}


@dataclass(frozen=True)
class Exported:
    """The export step's hand-over: the manifest it wrote, the references to verify against (every
    input it generated; the bundle stores a subset) and its part of the report."""

    manifest: Manifest
    references: ReferenceSet
    report: Dict
    seconds: Dict[str, float]


def toolchain(opset: int) -> Dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    return {"jei_edge": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "opset": int(opset), "exporter": "torch.onnx (TorchScript, dynamo=False)"}


def prepare(model_path, output, options: BuildOptions) -> Job:
    """Check the options, load the target, checkpoint and real data (BuildError & co. on problems)."""
    from jei_edge.model.checkpoint import model_from_checkpoint, read_checkpoint
    from jei_edge.runtime.targets import load_target

    options = replace(options, plan=(options.plan or "every").strip())  # one spelling of the plan from here on
    target = load_target(options.target)
    check_lowerable(target)
    precision = options.precision or target.default_precision
    if precision not in target.precisions or precision not in PRECISIONS:
        raise BuildError(f"precision '{precision}' is not available for target '{target.name}'",
                         hint=f"the target lists {list(target.precisions)}; this build produces {list(PRECISIONS)}")
    if target.device == "cuda" and options.plan == "auto":  # explicit groups are fine: the CUDA kernel runs them
        raise BuildError(f"--plan auto times the stages with onnxruntime on this CPU, which says nothing about target "
                         f"'{target.name}' (a GPU)", hint="pass the groups yourself (--plan 0-3,4,5) or keep --plan every")
    recipe, notes = None, []
    if precision == "int8":
        from jei_edge.compile.quantize import load_recipe

        form = int8_form(target)
        recipe = load_recipe(options.calibration)
        if form == "qdq" and recipe.activations != "s8":
            recipe = replace(recipe, activations="s8")
            notes.append(f"calibration recipe '{recipe.name}': symmetric int8 activations (s8) instead of "
                         f"u8: {target.backend}'s parser refuses non-zero zero points")
        if not 0.0 <= options.min_agreement <= 1.0:
            raise BuildError(f"min_agreement must be in [0, 1], got {options.min_agreement}")
        from jei_edge.compile.fallback import MODES

        if options.int8_fallback not in MODES:
            raise BuildError(f"int8_fallback must be one of {list(MODES)}, got {options.int8_fallback!r}")
        if options.quantized_edges and target.backend != "onnxruntime":
            raise BuildError(f"quantized (int8) stage edges are for onnxruntime targets; target '{target.name}' runs "
                             f"{target.backend}, whose executors keep float hidden states",
                             hint="drop --int8-edges (the default keeps FP32 edges there)")
    opset = int(options.opset or target.opset)
    if opset < MIN_OPSET:
        raise BuildError(f"opset {opset} is too old; jei-edge exports opset >= {MIN_OPSET}")
    samples = parse_samples(options.parity_samples)
    if options.stage_samples < 1 or not options.tolerance >= 0:
        raise BuildError("stage_samples must be >= 1 and tolerance >= 0")
    model_path = Path(model_path)
    ckpt = read_checkpoint(model_path)
    model = model_from_checkpoint(ckpt, source=f"checkpoint '{model_path}'")
    output = Path(output) if output is not None else model_path.with_suffix(".jei")
    return Job(options, target, precision, opset, recipe, tuple(notes), samples, model_path, output, ckpt, model,
               load_real(ckpt, options.data, options.seed))


def _manifest(job: Job, stages, plain, plan: Dict, quant: Optional[Dict], refs: References) -> Manifest:
    ckpt, model = job.ckpt, job.model
    costs, pre = ckpt["costs"], ckpt["preprocessing"]
    calib = ckpt.get("calibration") or {}
    return Manifest(
        name=job.output.stem, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        target=job.target.to_manifest(), precision=job.precision,
        input=TensorSpec("x", tuple(int(d) for d in model.input_shape)), num_classes=int(model.num_classes),
        class_names=tuple(ckpt["class_names"]),
        preprocessing=Preprocessing(tuple(pre["input_shape"]), tuple(pre["mean"]), tuple(pre["std"])),
        stages=tuple(stages), plain=plain,
        exits=Exits(positions=tuple(ckpt["exits"]["positions"]), pos_weights=tuple(ckpt["exits"]["pos_weights"]),
                    exit_macs=tuple(costs["exit_macs"]), cost=tuple(costs["cost"]),
                    cost_vs_plain=tuple(costs["cost_vs_plain"]), alphas=tuple(calib.get("alphas", ())),
                    qhat=tuple(tuple(r) for r in calib.get("qhat", ())),
                    calibration_split_size=int(calib.get("split_size", 0))),
        costs=Costs(full_macs=int(costs["full_macs"]), plain_macs=int(costs["plain_macs"]),
                    stage_macs=tuple(s.macs for s in stages)),
        toolchain=toolchain(job.opset),
        backbone={"name": ckpt["config"]["backbone"], "family": model.spec.family,
                  "kwargs": ckpt["config"].get("backbone_kwargs", {}), "blocks": len(model.blocks)},
        model_file="model.pt" if job.options.include_model else None, references=refs, plan=plan,
        quantization=quant, lowering=lowering_plan(job.target, job.precision))


def _check_and_reference(job: Job, root: Path, stages, plain, strict: bool, probe: np.ndarray,
                         export_seconds: float, progress: Progress):
    """Size the checks, check every stage graph against PyTorch, compute the references.

    Returns:
        ``(stage parity report, sizing report, inputs of each kind, ReferenceSet)``.
    """
    from jei_edge.backends.onnxruntime import OrtSettings
    from jei_edge.backends.onnxruntime.executor import create_session

    opts = job.options
    settings = OrtSettings.from_options(job.ort_options)
    sessions = [create_session(root / s.file, settings, f"stage {s.index}") for s in stages]
    plain_session = create_session(root / plain.file, settings, "plain backbone")

    def stage_check(x: np.ndarray) -> Dict:
        return check_stages(job.model, stages, sessions, plain, plain_session, x, opts.tolerance, strict=strict)

    per_input = probe_seconds_per_input(stage_check, probe) if job.parity_samples == "auto" else 0.0
    n, n_stage, sizing = size_check(job.parity_samples, opts.stage_samples, export_seconds, per_input)
    x, counts = parity_inputs(job.ckpt["preprocessing"], job.real.x, n, opts.seed, job.real.held_out)
    progress(f"parity: every stage on {n_stage} inputs, exit decisions on {n}")
    stage_report = stage_check(x[::max(1, n // n_stage)][:n_stage])  # rows of every kind
    del sessions, plain_session
    with progress.bar(n, "references (PyTorch)") as update:
        refs = compute_references(job.model, x, counts, progress=update)
    return stage_report, sizing, counts, refs


def _fallback_inputs(job: Job, x_calib: np.ndarray, seed: int):
    """What the INT8 fallback search chooses on, mirroring what verify will hold the floor on: the
    calibration inputs when the test split has enough rows for the floor to be held on them alone;
    else (the floor is then held on every parity input, synthetic kinds included) the calibration
    inputs and as many synthetic ones of the parity kinds, drawn with another seed than the check's.
    Returns ``(inputs, description)`` or None for the calibration inputs alone."""
    from jei_edge.compile.verify import MIN_HELD_OUT

    if job.real.held_out >= MIN_HELD_OUT:
        return None
    x, counts = parity_inputs(job.ckpt["preprocessing"], x_calib, 2 * len(x_calib), seed + 1)
    return x, (f"{len(x)} inputs: the {counts.get('real', 0)} calibration inputs and "
               f"{len(x) - counts.get('real', 0)} synthetic ones (the floor is held on all parity inputs: "
               f"fewer than {MIN_HELD_OUT} real held-out ones)")


def _fuses_attention(job: Job) -> bool:
    """onnxruntime's ``Attention`` kernel where onnxruntime runs the FP32 graphs: not for engine
    targets (TensorRT parses standard ONNX) and not for INT8 (the quantizer works on standard ops)."""
    return job.target.backend == "onnxruntime" and job.precision == "fp32"


def export_bundle(job: Job, root: Path, progress: Progress) -> Exported:
    """Step 1 (torch): graphs, per-stage parity, references and the manifest, written into ``root``.

    Args:
        job: from ``prepare``.
        root: the staging directory.
        progress: messages and bars.

    Returns:
        ``Exported``.
    """
    import torch

    from jei_edge.compile.export import export_plain, export_stages, passes_summary
    from jei_edge.compile.plan import plan_stages
    from jei_edge.compile.planning import choose_groups

    opts, model, ckpt = job.options, job.model, job.ckpt
    seconds: Dict[str, float] = {}
    t = time.perf_counter()
    # None: the edges that save work, on onnxruntime targets (the CUDA executors keep float hidden states)
    edges = {True: "all", False: "none"}.get(opts.quantized_edges,
                                             "auto" if job.target.backend == "onnxruntime" else "none")
    quantize, x_calib = None, None
    if job.recipe is not None and opts.plan == "auto":  # an INT8 bundle is planned on INT8 candidates
        from jei_edge.compile.quantize import CandidateQuantizer

        x_calib = calibration_inputs(ckpt, job.recipe, opts.data, opts.seed, job.real)
        quantize = CandidateQuantizer(model, x_calib, ckpt["costs"], job.recipe, edges)  # calibrates when first used
    groups, plan_report = choose_groups(model, opts.plan, opts.plan_batch, job.real.x, root / ".planning",
                                        job.ort_options, job.opset, progress, fuse_attention=_fuses_attention(job),
                                        quantize=quantize)
    plans = plan_stages(model, ckpt["costs"], groups)
    seconds["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    progress(f"exporting the stages of {len(model.stage_ranges())} exits + plain backbone (opset {job.opset})")
    probe, _ = parity_inputs(ckpt["preprocessing"], job.real.x, PROBE_ROWS, opts.seed)
    example = torch.from_numpy(probe[:2].copy())
    from jei_edge.model.jei import half_precision

    stage_model = half_precision(model) if job.precision == "fp16" else model
    passes: list = []
    fuse = _fuses_attention(job)  # the planner above timed its candidates the same way
    stages = export_stages(stage_model, plans, root, example, job.opset, passes=passes, fuse_attention=fuse)
    plain = export_plain(model, root, example, job.opset, macs=int(ckpt["costs"]["plain_macs"]), passes=passes,
                         fuse_attention=fuse)
    quant = None
    if job.recipe is not None:
        from jei_edge.compile.quantize import quantize_bundle_graphs

        # engine targets too: the search runs their (symmetric) Q/DQ graphs in onnxruntime, as
        # verify does, and a stage kept FP32 gets an FP32 engine (lower.stage_precision)
        fallback = float(opts.min_agreement) if opts.int8_fallback == "auto" else None
        if x_calib is None:
            x_calib = calibration_inputs(ckpt, job.recipe, opts.data, opts.seed, job.real)
        stages, quant = quantize_bundle_graphs(model, plans, stages, plain, root, x_calib, job.recipe,
                                               progress=progress, edges=edges, fallback_floor=fallback,
                                               ort_options=job.ort_options,
                                               fallback_inputs=_fallback_inputs(job, x_calib, opts.seed))
        quant["min_agreement"] = float(opts.min_agreement)  # verify's floor (int8 bundles)
        # the fallback search is timed apart: the auto-sized parity check scales with the export alone
        seconds["int8_fallback"] = float(quant["fallback"].get("seconds", 0.0))
    seconds["export"] = time.perf_counter() - t - seconds.get("int8_fallback", 0.0)

    t = time.perf_counter()
    stage_report, sizing, counts, refs = _check_and_reference(job, root, stages, plain, strict=job.precision == "fp32",
                                                              probe=probe, export_seconds=seconds["export"],
                                                              progress=progress)
    stored = refs.stored_subset()
    stored.save(root / REFERENCE_FILE)
    if opts.include_model:
        shutil.copyfile(job.model_path, root / "model.pt")
    stored_rec = References(file=REFERENCE_FILE, samples=len(stored), kinds=stored.kinds)
    manifest = write_manifest(root, _manifest(job, stages, plain, plan_report, quant, stored_rec))
    seconds["stage_parity_and_references"] = time.perf_counter() - t
    report = {"parity_inputs": counts, "plan": plan_report, "quantization": quant, "check": sizing,
              **passes_summary(passes),
              "stage_parity": stage_report, "references": stored_rec.to_dict()}
    return Exported(manifest, refs, report, seconds)


def _lower(root: Path, manifest: Manifest, progress: Progress):
    """Step 2: build the engines when the toolchain is here (always for TensorRT-RTX); a Jetson
    target without JetPack's TensorRT keeps its lowering plan for `jei-edge lower` on the board."""
    import importlib.util

    low = manifest.lowering
    if low is not None and low.backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        note = lowering_note(manifest)
        progress(note)
        return manifest, {"backend": low.backend, "engines": 0, "note": note}
    lowered, report = lower_bundle(root, manifest, progress)
    return (write_manifest(root, lowered) if lowered is not manifest else manifest), report


def build_bundle(model_path, output=None, options: BuildOptions = BuildOptions(),
                 progress: Optional[Callable[[str], None]] = None) -> Dict:
    """Compile ``model_path`` into a bundle directory: export -> lower -> verify (module docstring).

    Args:
        model_path: a ``model.pt`` checkpoint.
        output: the bundle directory (default ``<model stem>.jei`` beside the checkpoint).
        options: ``BuildOptions``.
        progress: called with a short message at each step (the CLI prints them); with it, long
            steps also show a progress bar when stderr is a terminal.

    Returns:
        The build report (also ``report.json`` / ``report.txt`` in the bundle).

    Raises:
        CheckpointError, BuildError (``ParityError`` when verification fails), JeiEdgeError:
        nothing is left at ``output`` in that case.
    """
    t0 = time.perf_counter()
    prog = Progress.of(progress)
    job = prepare(model_path, output, options)
    notes = ([job.real.note] if job.real.note else []) + list(job.notes)
    seconds = {"load": time.perf_counter() - t0}
    with StagingDir(job.output, force=options.force) as staging:
        root = staging.tmp
        exported = export_bundle(job, root, prog)
        seconds.update(exported.seconds)

        t = time.perf_counter()
        manifest, lowering = _lower(root, exported.manifest, prog)
        seconds["lower"] = time.perf_counter() - t

        t = time.perf_counter()
        device, what = verify_device(root, shown=job.output)
        if device is not None:
            notes.append(what)
        tol = options.tolerance if job.precision == "fp32" else None  # --tolerance is the fp32 tie band
        verified = verify_bundle(root, device=device, progress=prog, references=exported.references, tolerance=tol)
        seconds["verify"] = time.perf_counter() - t
        d = verified["decisions"]
        if d["samples"] < AUTO_MAX:
            notes.append(f"exit decisions checked on {d['samples']} inputs: a rate of {d['rate_bound']['counted']} "
                         f"above {100 * d['rate_bound']['upper']:.2g}% is excluded at 95% confidence; "
                         f"--parity-samples {AUTO_MAX} runs the full check")

        report = {"bundle": str(job.output), "model": str(job.model_path), "target": job.target.name,
                  "precision": job.precision, "opset": job.opset, "num_stages": len(manifest.stages),
                  "options": asdict(options), "data_source": job.real.source, **exported.report,
                  "lowering": lowering, "decisions": d, "input_guard": verified["input_guard"],
                  "seconds": {k: round(v, 3) for k, v in seconds.items()}, "notes": notes}
        report["seconds"]["total"] = round(time.perf_counter() - t0, 3)
        write_json(root / "report.json", report)
        (root / "report.txt").write_text(summary_text(report), encoding="utf-8")
        write_manifest(root, manifest.replace(report="report.json", report_text="report.txt"))
        prog(f"writing {job.output}")
        staging.commit()
    return report
