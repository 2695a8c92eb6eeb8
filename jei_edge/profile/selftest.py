"""``jei-edge selftest BUNDLE``: the one-command check of a bundle on the user's own board.

No TensorRT engine can run on the machines jei-edge is developed on, so this is how a user
validates engines where they run. For the bundle's target backend and for onnxruntime (the
reference every backend is compared with), whichever can run here:

1. **facts**: machine, Python, GPU (name, compute capability, integrated), toolchain versions;
2. **per-stage comparison** against onnxruntime with Polygraphy's comparator (``polygraphy``,
   the field's tool for this): every stage on the same inputs (the stored reference inputs; a
   stage k > 0 gets onnxruntime's hidden state of stage k-1), outputs within the precision's
   tolerance. Engines run through Polygraphy's ``TrtRunner`` (full TensorRT). For TensorRT-RTX
   and CPU bundles, whose runtime is onnxruntime itself or whose engines Polygraphy does not
   drive, the comparison says so; the end-to-end check below covers them;
3. **exit decisions** on the bundle's stored reference inputs, with the build's rules
   (``jei_edge.compile.verify.check_decisions``);
4. **speed**: exit vs full vs plain at batch 1 and the target's opt batch
   (``jei_edge.profile.measure.profile_bundle``, the benchmarks' protocol).

What could not run is listed with the reason. A parity failure (stages or decisions) makes the
command exit 1. Torch-free; Polygraphy is optional (``pip install polygraphy``).
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

from jei_edge._io import shorten
from jei_edge.errors import JeiEdgeError

# per-stage output tolerance (max abs error vs onnxruntime) by precision: the same bands as the
# end-to-end rules' probability bounds (jei_edge.compile.verify.RULES)
STAGE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2}
STAGE_ROWS = 64  # reference rows per stage comparison (at most the engines' batch profile)


def _version(module: str) -> Optional[str]:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - absent or broken: reported as not installed
        return None
    return str(getattr(mod, "__version__", "?"))


def facts() -> Dict[str, Any]:
    """Machine, Python, GPU and toolchain versions (None: not installed / no GPU)."""
    out: Dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "platform": platform.platform(), "numpy": np.__version__,
                           "toolchains": {m: _version(m) for m in ("onnxruntime", "tensorrt", "tensorrt_rtx",
                                                                    "cuda.bindings", "polygraphy")}}
    try:
        from jei_edge.runtime.cuda.driver import CudaDriver

        d = CudaDriver.get()
        out["gpu"] = {"name": d.name, "compute_capability": "{}.{}".format(*d.compute_capability),
                      "integrated": d.integrated, "multiprocessors": d.multiprocessors}
    except JeiEdgeError as exc:
        out["gpu"] = None
        out["gpu_reason"] = exc.message
    return out


def compare_stages(bundle, runner_for: Callable[[Any], Any], x: np.ndarray, tolerance: float,
                   name: str) -> Dict[str, Any]:
    """Every stage through ``runner_for(stage)`` (a Polygraphy runner) vs onnxruntime on its graph.

    Returns:
        ``{"ran": True, "passed", "tolerance", "stages": [{"stage", "passed", "max_abs_error": {...}}]}``.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from jei_edge.backends.onnxruntime.chain import chain_stages

    try:
        from polygraphy.comparator import SimpleCompareFunc as _Simple
    except ImportError:  # older Polygraphy
        from polygraphy.comparator import CompareFunc

        _Simple = CompareFunc.simple
    G_LOGGER.module_severity = G_LOGGER.ERROR
    rows = []
    for s, (feed, _) in zip(bundle.manifest.stages, chain_stages(bundle, x)):
        ort = OnnxrtRunner(SessionFromOnnx(str(bundle.file(s.file)), providers=["cpu"]), name="onnxruntime")
        results = Comparator.run([runner_for(s), ort], data_loader=[feed])
        acc = Comparator.compare_accuracy(results, compare_func=_Simple(atol=tolerance, rtol=0.0))
        out_a, out_b = [iterations[0] for _, iterations in results]
        errs = {t.name: float(np.max(np.abs(np.asarray(out_a[t.name], np.float64) -
                                           np.asarray(out_b[t.name], np.float64)))) for t in s.outputs}
        rows.append({"stage": s.index, "passed": bool(acc), "max_abs_error": errs})
    return {"ran": True, "runner": name, "tolerance": tolerance, "rows": int(len(x)),
            "passed": all(r["passed"] for r in rows), "stages": rows}


def _stage_comparison(bundle, backend: str, x: np.ndarray) -> Dict[str, Any]:
    m = bundle.manifest
    tol = STAGE_TOLERANCE[m.precision]
    if importlib.util.find_spec("polygraphy") is None:
        return {"ran": False, "reason": "Polygraphy is not installed (pip install polygraphy)"}
    if backend == "onnxruntime":
        from polygraphy.backend.onnxrt import OnnxrtRunner

        def unoptimized(s):  # onnxruntime's optimized graph (the runtime's) vs the graph as exported
            import onnxruntime

            so = onnxruntime.SessionOptions()
            so.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
            return OnnxrtRunner(lambda: onnxruntime.InferenceSession(str(bundle.file(s.file)), so,
                                                                     providers=["CPUExecutionProvider"]),
                                name="onnxruntime-unoptimized")
        return compare_stages(bundle, unoptimized, x, tol, "onnxruntime without graph optimizations")
    if backend == "tensorrt":
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        return compare_stages(bundle, lambda s: TrtRunner(EngineFromBytes(bundle.file(s.engines[0].file).read_bytes()),
                                                          name="tensorrt"), x, tol, "Polygraphy TrtRunner")
    return {"ran": False, "reason": f"Polygraphy's TrtRunner drives `tensorrt`, not `{backend}`: the exit-decision "
                                    "check covers these engines end to end"}


def _backend_checks(path, backend: str, refs, rule, batch_sizes, repeats: int, samples: int, progress) -> Dict:
    from jei_edge.compile.verify import ParityError, check_decisions
    from jei_edge.profile.measure import profile_bundle
    from jei_edge.runtime import Runtime

    try:
        rt = Runtime.load(path, backend=backend)
    except JeiEdgeError as exc:
        return {"ran": False, "reason": exc.message + (f" ({exc.hint})" if exc.hint else "")}
    with rt:
        out: Dict[str, Any] = {"ran": True, "device": rt.device}
        progress(f"{backend}: exit decisions on {len(refs)} stored reference inputs")
        try:
            out["decisions"] = check_decisions(rt, refs, rule, progress)
            out["passed"] = True
        except ParityError as exc:
            out["decisions"] = {"error": exc.message}
            out["passed"] = False
        progress(f"{backend}: exit vs full vs plain at batch {', '.join(map(str, batch_sizes))}")
        prof = profile_bundle(rt, refs.x, batch_sizes=batch_sizes, repeats=repeats, samples=samples)
        out["speed"] = {b: {k: e.get(k) for k in ("exit_ms_per_sample", "full_ms_per_sample", "plain_ms_per_sample",
                                                   "realized_speedup", "speedup_vs_plain", "efficiency")}
                        for b, e in prof["batches"].items()}
        out["theoretical_speedup"] = prof["exits"]["theoretical_speedup"]
    return out


def selftest(path, repeats: int = 5, samples: int = 1024, progress=None) -> Dict[str, Any]:
    """Run the checks of the module docstring on ``path``; returns the report (``passed`` overall)."""
    from jei_edge.bundle import Bundle
    from jei_edge.compile.progress import Progress
    from jei_edge.compile.references import ReferenceSet
    from jei_edge.compile.verify import rule_for
    from jei_edge.errors import BundleError

    t0 = time.perf_counter()
    progress = Progress.of(progress)
    bundle = Bundle.open(path)
    m = bundle.manifest
    if m.references is None:
        raise BundleError(f"bundle '{path}' stores no reference inputs to test against",
                          hint="rebuild it with this jei-edge (`jei-edge build`)")
    refs = ReferenceSet.load(bundle.file(m.references.file), m.num_gates, m.num_classes, m.input.shape)
    rule = rule_for(m)
    opt = m.lowering.profile[1] if m.lowering is not None else 64
    samples = max(1, min(int(samples), len(refs)))
    batch_sizes = tuple(sorted({1, min(int(opt), samples)}))  # the opt batch, when there are rows for it
    report: Dict[str, Any] = {"bundle": str(path), "target": m.target.name, "precision": m.precision,
                              "facts": facts(), "backends": {}, "stage_comparison": {}}
    backends = [m.target.backend] + (["onnxruntime"] if m.target.backend != "onnxruntime" else [])
    x_stage = refs.x[:min(STAGE_ROWS, opt if m.lowering is not None else STAGE_ROWS, len(refs))]
    for backend in backends:
        report["backends"][backend] = _backend_checks(path, backend, refs, rule, batch_sizes, repeats, samples,
                                                      progress)
        if report["backends"][backend]["ran"]:
            progress(f"{backend}: every stage against onnxruntime (Polygraphy)")
            try:
                report["stage_comparison"][backend] = _stage_comparison(bundle, backend, x_stage)
            except Exception as exc:  # noqa: BLE001 - Polygraphy/TensorRT failures are reported, not raised
                report["stage_comparison"][backend] = {"ran": False, "reason": shorten(f"{type(exc).__name__}: {exc}", 300)}
        else:
            report["stage_comparison"][backend] = {"ran": False, "reason": "the backend cannot run here"}
    ran = [b for b, r in report["backends"].items() if r["ran"]]
    failed = [b for b, r in report["backends"].items() if r["ran"] and not r["passed"]]
    failed += [f"{b} stages" for b, r in report["stage_comparison"].items() if r.get("ran") and not r["passed"]]
    report.update({"ran": ran, "not_run": [b for b in backends if b not in ran], "failed": failed,
                   "passed": bool(ran) and not failed, "seconds": round(time.perf_counter() - t0, 2)})
    return report


def summary(report: Dict[str, Any]) -> str:
    """The one-screen text form."""
    f = report["facts"]
    gpu = f.get("gpu")
    tc = ", ".join(f"{k} {v}" for k, v in f["toolchains"].items() if v) or "none"
    lines = [f"jei-edge selftest: {report['bundle']} (target {report['target']}, {report['precision']})",
             f"  machine   {f['machine']}, Python {f['python']}; GPU: "
             + (f"{gpu['name']} (compute capability {gpu['compute_capability']}"
                f"{', integrated' if gpu['integrated'] else ''})" if gpu else f"none ({f.get('gpu_reason', '')})"),
             f"  installed {tc}"]
    for b, r in report["backends"].items():
        if not r["ran"]:
            lines.append(f"  {b:<12} NOT RUN: {r['reason']}")
            continue
        d = r["decisions"]
        dec = (f"decisions agree {100 * d['agreement']:.3f}% on {d['samples']} inputs"
               if "agreement" in d else f"FAILED: {d['error']}")
        lines.append(f"  {b:<12} {'ok  ' if r['passed'] else 'FAIL'} {dec} ({r['device']})")
        for bsz, s in r["speed"].items():
            plain = f", {s['speedup_vs_plain']:.2f}x vs plain" if s.get("speedup_vs_plain") else ""
            lines.append(f"  {'':<12}      batch {bsz}: exit {s['exit_ms_per_sample']:.3f} ms/sample, "
                         f"{s['realized_speedup']:.2f}x vs full{plain} (theory {r['theoretical_speedup']:.2f}x), "
                         f"efficiency {s['efficiency']:.2f}")
        c = report["stage_comparison"].get(b, {})
        if c.get("ran"):
            worst = max((max(row["max_abs_error"].values()) for row in c["stages"]), default=0.0)
            lines.append(f"  {'':<12}      stages vs onnxruntime ({c['runner']}): "
                         f"{'ok' if c['passed'] else 'FAIL'}, max abs error {worst:.2e} (tolerance {c['tolerance']:g})")
        else:
            lines.append(f"  {'':<12}      stages vs onnxruntime: not run ({c.get('reason', '')})")
    verdict = (f"PASSED on {', '.join(report['ran'])}" if report["passed"] else
               ("FAILED: " + ", ".join(report["failed"]) if report["failed"] else "NOTHING RAN"))
    if report["not_run"]:
        verdict += f"; NOT RUN here: {', '.join(report['not_run'])} (see above)"
    lines.append(f"  result    {verdict}")
    return "\n".join(lines)
