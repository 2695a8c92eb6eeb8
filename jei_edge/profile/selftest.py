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
   (``jei_edge.profile.measure.profile_bundle``, the benchmarks' protocol);
5. **settings to decide on the board** (CUDA backends): exit-mode time with each value of
   ``mapped_io`` (zero-copy host memory for inputs and results, vs device buffers + copies: on an
   integrated GPU such as a Jetson's, measure rather than guess) and ``graphs`` (CUDA graphs vs
   plain enqueues), side by side on the same batches, with the value the target file sets and
   the faster one.

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


# CUDA settings worth measuring on the board: (option, its two values)
SETTING_CHOICES = (("mapped_io", (False, True)), ("graphs", (True, False)))
SAME_BAND = 0.03  # within 3%: no measurable difference between two values


def compare_settings(load: Callable[..., Any], name: str, values, x: np.ndarray, batch_sizes, repeats: int,
                     current=None) -> Dict[str, Any]:
    """Exit-mode time of the same batches with option ``name`` at each of ``values`` (runtimes from
    ``load(**{name: value})``, measured side by side with ``measure.interleaved``).

    Returns ``{"values", "current", "batches": {b: {"ms_per_sample": {value: ms}, "ratio": t(v1)/t(v0)}},
    "faster", "advice"}``; ``faster`` is None when every batch size is within ``SAME_BAND``."""
    from jei_edge.profile.measure import Passes, interleaved, median, median_ratio

    rts = []
    try:
        for v in values:
            rts.append(load(**{name: v}))
        passes = [Passes(rt) for rt in rts]
        out: Dict[str, Any] = {"values": list(values), "current": current, "batches": {}}
        votes = []
        for b in batch_sizes:
            xs = Passes.batches(x, b)
            t = interleaved(passes, xs, [p.reaches(xs) for p in passes], repeats)
            rows = len(xs) * b
            ratio = median_ratio(t[1]["exit"], t[0]["exit"])
            out["batches"][b] = {"ms_per_sample": {str(v): 1e3 * median(r["exit"]) / rows for v, r in zip(values, t)},
                                 "ratio": ratio}
            votes.append(0 if ratio > 1 + SAME_BAND else 1 if ratio < 1 - SAME_BAND else None)
    finally:
        for rt in rts:
            rt.close()
    decided = {v for v in votes if v is not None}
    out["faster"] = values[decided.pop()] if len(decided) == 1 else None
    if out["faster"] is None:
        out["advice"] = (f"{name}: no difference beyond {SAME_BAND:.0%} at every batch size" if not decided
                         else f"{name}: faster with one value at some batch sizes and the other at others")
    elif out["faster"] == current:
        out["advice"] = f"{name} = {str(current).lower()} (the target's setting) is the faster one here"
    else:
        out["advice"] = (f"{name} = {str(out['faster']).lower()} is faster here than the target's "
                         f"{str(current).lower()}: pass it as an option or set it in the target file")
    return out


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
        current = dict(rt.settings.__dict__) if rt.device == "cuda" else {}
    if current:
        out["settings"] = {}
        for name, values in SETTING_CHOICES:
            progress(f"{backend}: {name} = {values[0]} vs {values[1]}, side by side")
            try:
                out["settings"][name] = compare_settings(lambda **o: Runtime.load(path, backend=backend, **o), name,
                                                         values, refs.x[:samples], batch_sizes, repeats,
                                                         current.get(name))
            except JeiEdgeError as exc:
                out["settings"][name] = {"error": exc.message}
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
        for name, c in r.get("settings", {}).items():
            if "error" in c:
                lines.append(f"  {'':<12}      {name}: not measured ({c['error']})")
                continue
            per = "; ".join(f"batch {bsz}: " + " vs ".join(f"{v} {ms:.3f}" for v, ms in e["ms_per_sample"].items())
                            + " ms/sample" for bsz, e in c["batches"].items())
            lines.append(f"  {'':<12}      {per}: {c['advice']}")
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
