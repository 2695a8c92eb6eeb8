"""Lowering: the exported stage graphs -> what the target's backend runs (torch-free, onnx-free).

The second build step, between export and verify, and the whole of ``jei-edge lower BUNDLE``.

- **onnxruntime** runs the ONNX stage graphs directly: nothing to lower.
- **TensorRT-RTX** (RTX targets): one engine per stage graph, built here ahead of time for the
  target's compute capability, without a GPU.
- **TensorRT** (Jetson targets): engines are built on the board by JetPack's TensorRT. ``jei-edge
  build`` on a host writes the stage graphs and the lowering plan (``Manifest.lowering``); ``jei-edge
  lower NAME.jei`` on the board (numpy + TensorRT: no torch, no onnxruntime) adds the engines.

Both toolchains go through the same code (``jei_edge.backends.tensorrt.builder``): strongly typed
networks, so an engine has exactly the precision of its graph. Engines are written to
``engines/stageK.<backend>.sm<CC>.<precision>.engine`` and recorded in ``Stage.engines``; the
engine cache makes an unchanged stage free to rebuild.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Tuple

from jei_edge.bundle.manifest import ENGINE_BACKENDS, Engine, Lowering, Manifest
from jei_edge.errors import BuildError

LOWERABLE = ("onnxruntime",) + ENGINE_BACKENDS
ENGINE_DIR = "engines"


def check_lowerable(target) -> None:
    """Refuse a target whose backend this build cannot lower (before any export work).

    Args:
        target: a ``jei_edge.runtime.targets.Target``.
    """
    if target.backend not in LOWERABLE:
        raise BuildError(f"target '{target.name}' uses backend '{target.backend}', which this build does not "
                         "produce", hint=f"use a target with backend {', '.join(LOWERABLE)} (see `jei-edge targets`)")


def int8_form(target) -> Optional[str]:
    """How ``target`` expresses INT8 in its engines: ``qdq`` (TensorRT and TensorRT-RTX: symmetric
    int8 activations, per-channel int8 weights, FP32 biases, as explicit Q/DQ in the stage graphs)
    or None (onnxruntime: its own asymmetric Q/DQ, in the graphs it runs).

    TensorRT-RTX 1.7.1 parses and builds these graphs for SM80/86/89 without a GPU (measured: all
    stages of the test ViT and ResNet); it refuses asymmetric (u8) activations at parse time
    ("Non-zero zero point is not supported") and any FP32 GEMM for Turing (SM75), whose targets
    therefore list fp16 only. Which kernels TensorRT-RTX picks for them (INT8 or dequantized) is
    decided when the engine first runs on the GPU and is not visible ahead of time."""
    return "qdq" if target.backend in ENGINE_BACKENDS else None


def lowering_plan(target, precision: str) -> Optional[Lowering]:
    """The manifest's lowering plan for ``target`` at ``precision`` (None: nothing to lower)."""
    if target.backend not in ENGINE_BACKENDS:
        return None
    opts = target.backend_options
    return Lowering(backend=target.backend, precision=precision, compute_capability=str(target.compute_capability),
                    profile=target.batch_profile, toolchain=tuple(target.toolchain.get(target.backend, ())),
                    int8=int8_form(target) if precision == "int8" else None, workspace_mib=target.workspace_mib,
                    optimization_level=opts.get("builder_optimization_level"))


def engine_file(stage: int, precision: str, backend: str, compute_capability: Optional[str]) -> str:
    cc = "board" if compute_capability is None else "sm" + compute_capability.replace(".", "")
    return f"{ENGINE_DIR}/stage{stage}.{backend}.{cc}.{precision}.engine"


def stage_precision(graph: Path, low: Lowering) -> str:
    """The precision of a stage's engine: the plan's, except that a stage graph of an INT8 bundle
    without Q/DQ nodes (kept FP32 by the build's fallback, ``jei_edge.compile.fallback``) is built
    FP32, the precision it was chosen in (engines are strongly typed)."""
    if low.precision != "int8":
        return low.precision
    from jei_edge.bundle.onnx_scan import scan_onnx_file

    ops = {n.op_type for n in scan_onnx_file(graph).nodes}
    return "int8" if ops & {"QuantizeLinear", "DequantizeLinear"} else "fp32"


def toolchain_for(low: Lowering, toolchain: Optional[str]) -> Tuple[str, bool]:
    """The toolchain module name to build with and whether it stands in for the plan's.

    ``toolchain='tensorrt_rtx'`` on a TensorRT (Jetson) plan runs the board's lowering path on a
    host (CI does): the engines it writes are labelled as TensorRT-RTX engines for the compute
    capability built, so they can never pass for board engines.
    """
    name = toolchain or low.backend
    if name not in ENGINE_BACKENDS:
        raise BuildError(f"unknown toolchain '{name}'", hint=f"choose one of {', '.join(ENGINE_BACKENDS)}")
    if name == "tensorrt" and low.backend == "tensorrt_rtx":
        raise BuildError("an RTX bundle's engines are TensorRT-RTX engines; TensorRT cannot stand in for it",
                         hint="lower it with --toolchain tensorrt_rtx (the default)")
    return name, name != low.backend


def check_toolchain_version(low: Lowering, backend: str, version: str) -> None:
    """The installed toolchain must be one the target expects (``Lowering.toolchain``: prefixes)."""
    if backend != low.backend or not low.toolchain:
        return
    if not any(version == v or version.startswith(v + ".") for v in low.toolchain):
        raise BuildError(f"this machine has {backend} {version}, but the bundle's target expects "
                         f"{' or '.join(low.toolchain)}",
                         hint="lower it on a board with the JetPack the target names (`jei-edge targets`), or "
                              "rebuild the bundle for this board's target")


def lower_bundle(root: Path, manifest: Manifest, progress=None, toolchain: Optional[str] = None,
                 compute_capability: Optional[str] = None, cache=None) -> Tuple[Manifest, Dict]:
    """Build the engines of ``manifest``'s lowering plan into ``root`` (a staging directory).

    Args:
        root: the bundle's staging directory (stage graphs from the export step).
        manifest: its manifest.
        progress: a ``Progress`` or message callback.
        toolchain: ``tensorrt`` | ``tensorrt_rtx``; None = the plan's backend. ``tensorrt_rtx`` may
            stand in for a Jetson plan (``toolchain_for``).
        compute_capability: the stand-in's compute capability (default ``8.6``); TensorRT builds for
            the GPU present, TensorRT-RTX for the plan's.
        cache: an ``EngineCache`` (default: the user's); False = no cache.

    Returns:
        ``(manifest, report)``: the manifest with ``Stage.engines`` set (not yet written) and the
        lowering report (per-stage engine size, build time, cache hit, network layer types).
    """
    from jei_edge.compile.progress import Progress

    low = manifest.lowering
    if low is None:
        return manifest, {"backend": manifest.target.backend, "engines": 0,
                          "note": "onnxruntime runs the ONNX stage graphs directly: nothing to lower"}
    from jei_edge.backends.tensorrt.builder import EngineCache, EngineRequest, build_engine
    from jei_edge.backends.tensorrt.toolchain import import_toolchain, version

    progress = Progress.of(progress)
    name, stand_in = toolchain_for(low, toolchain)
    trt = import_toolchain(name)
    tc = version(trt)
    check_toolchain_version(low, name, tc)
    if name == "tensorrt_rtx":
        cc = (compute_capability or "8.6") if stand_in else low.compute_capability
    else:
        cc = None  # TensorRT builds for the GPU it runs on
    cache = EngineCache() if cache is None else (cache or None)
    stages, rows = [], []
    with progress.bar(len(manifest.stages), f"engines ({name} {tc}, {low.precision})") as update:
        for s in manifest.stages:
            precision = stage_precision(root / s.file, low)
            req = EngineRequest(graph=root / s.file, what=f"stage {s.index}", profile=low.profile,
                                compute_capability=cc, precision=precision, workspace_mib=low.workspace_mib,
                                optimization_level=low.optimization_level)
            built = build_engine(trt, req, target=manifest.target.name, cache=cache)
            rel = engine_file(s.index, precision, name, cc)
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(built.data)
            engine = Engine(file=rel, backend=name, toolchain=tc, compute_capability=cc or low.compute_capability,
                            precision=precision, profile=low.profile)
            stages.append(replace(s, engines=(engine,)))
            rows.append({"stage": s.index, "file": rel, "precision": precision, "bytes": len(built.data),
                         "seconds": round(built.seconds, 3),
                         "cached": built.cached, "layers": built.layers})
            update(1)
    report = {"backend": name, "toolchain": tc, "compute_capability": cc or "the board's GPU",
              "precision": low.precision, "int8": low.int8, "profile": list(low.profile), "engines": len(rows),
              "stages": rows, "cache": None if cache is None else {"dir": str(cache.root), "hits": cache.hits,
                                                                  "misses": cache.misses}}
    if stand_in:
        report["note"] = (f"{name} stood in for the target's {low.backend}: these engines exercise the lowering "
                          "path and will not run on the target board; run `jei-edge lower` there")
    return manifest.replace(stages=tuple(stages)), report


def lowering_note(manifest: Manifest) -> Optional[str]:
    """What the build could not do here for ``manifest`` (None when its engines are built or none are needed)."""
    low = manifest.lowering
    if low is None or all(s.engines for s in manifest.stages):
        return None
    return (f"engines not built: target '{manifest.target.name}' needs {low.backend} "
            f"{' or '.join(low.toolchain) or ''} on the board; copy the bundle there and run "
            f"`jei-edge lower {manifest.name}.jei`")


def lower_existing(bundle_path, toolchain: Optional[str] = None, compute_capability: Optional[str] = None,
                   force: bool = False, progress=None, cache=None) -> Dict:
    """``jei-edge lower BUNDLE``: add the engines of the bundle's lowering plan, atomically.

    The bundle is checked (sha256 of every file), copied into a staging directory beside it, its
    engines built (``lower_bundle``), its manifest and build report rewritten, then verified: on
    the engines where this jei-edge can run them, else on the stage graphs through onnxruntime
    (said in the report; skipped with a note when onnxruntime is not installed, as on a bare
    board). Only then does the new bundle replace the old one; any failure leaves it untouched.
    Needs numpy and the toolchain; never torch or onnx.

    Args:
        bundle_path: the ``NAME.jei`` directory.
        toolchain, compute_capability, cache: as ``lower_bundle``.
        force: rebuild engines a bundle already has.
        progress: a message callback or ``Progress``.

    Returns:
        ``{"bundle", "lowering", "verify"}``.
    """
    import importlib.util
    import json

    from jei_edge.bundle import Bundle
    from jei_edge.compile.progress import Progress
    from jei_edge.compile.report import summary_text
    from jei_edge.compile.verify import verify_bundle, verify_device
    from jei_edge.compile.writer import StagingDir, copy_bundle, write_json, write_manifest

    progress = Progress.of(progress)
    path = Path(bundle_path)
    bundle = Bundle.open(path)  # every file's sha256, paths inside the bundle
    m = bundle.manifest
    if m.lowering is None:
        raise BuildError(f"bundle '{path}' is for target '{m.target.name}' ({m.target.backend}): it has no engines "
                         "to build", hint="only TensorRT / TensorRT-RTX targets have engines (`jei-edge targets`)")
    if all(s.engines for s in m.stages) and not force:
        raise BuildError(f"bundle '{path}' already has its engines "
                         f"({m.stages[0].engines[0].backend} {m.stages[0].engines[0].toolchain})",
                         hint="pass --force to rebuild them")
    old_engines = {e.file for s in m.stages for e in s.engines}
    m = m.replace(stages=tuple(replace(s, engines=()) for s in m.stages))
    with StagingDir(path, force=True) as staging:
        root = staging.tmp
        copy_bundle(bundle, root, skip=old_engines)
        m, lowering = lower_bundle(root, m, progress, toolchain=toolchain, compute_capability=compute_capability,
                                   cache=cache)
        m = write_manifest(root, m)
        device, note = verify_device(root, shown=path)
        if device == "cpu" and importlib.util.find_spec("onnxruntime") is None:
            verified = None
            note = ("not verified here: this jei-edge does not run these engines and onnxruntime (to check their "
                    "stage graphs) is not installed; the bundle was verified when it was built")
        else:
            verified = verify_bundle(root, device=device, progress=progress)
        if m.report:  # keep the build report true: its lowering and verification are now these
            report = json.loads(bundle.file(m.report).read_text(encoding="utf-8"))
            report["lowering"] = lowering
            if verified is not None:
                report["decisions"] = verified["decisions"]
            report["notes"] = [n for n in report.get("notes", []) if not n.startswith(("engines not built",
                                                                                     "verified the", "not verified"))]
            report["notes"] += [n for n in (note, lowering.get("note")) if n]
            write_json(root / m.report, report)
            if m.report_text:
                (root / m.report_text).write_text(summary_text(report), encoding="utf-8")
            m = write_manifest(root, m)
        progress(f"writing {path}")
        staging.commit()
    return {"bundle": str(path), "lowering": lowering, "verify": verified, "note": note}
