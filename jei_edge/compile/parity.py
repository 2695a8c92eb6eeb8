"""Build-time parity of the stage graphs, and how many inputs the checks use.

**Per stage** (``check_stages``): every stage graph in onnxruntime against the PyTorch stage on the
same input (the PyTorch hidden state, so errors do not accumulate): max abs error of ``probs``
and ``gate`` <= tolerance (FP32: 1e-5), ``hidden_out`` within a relative bound; the plain backbone
within ``E2E_FACTOR`` x tolerance. Beyond that the build fails naming the stage and tensor. The
end-to-end exit decisions are checked by ``jei_edge.compile.verify`` on the stored references.

**Sizing** (``size_check``): ``--parity-samples auto`` times the per-stage check on a few inputs
and chooses as many inputs as cost about ``AUTO_FACTOR`` times the export (at least ``AUTO_MIN``
when those take at most ``AUTO_MIN_SECONDS``, at most ``AUTO_MAX``, the full check), so a small
model is checked on 10,000 inputs in seconds and a large one does not spend many times its export
time verifying.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence, Tuple, Union

import numpy as np

from jei_edge.bundle.manifest import Graph, Stage
from jei_edge.compile.quantize import dequantize_rows, quantize_rows
from jei_edge.compile.verify import E2E_FACTOR, max_abs_error
from jei_edge.errors import BuildError

HIDDEN_RTOL = 1e-4  # hidden_out: max abs error <= HIDDEN_RTOL * max(1, max |hidden|)
AUTO_FACTOR = 3.0  # auto: checking may cost this multiple of the export ...
AUTO_MIN = 1_000  # ... but check at least this many inputs ...
AUTO_MIN_SECONDS = 120.0  # ... when they take at most this long
AUTO_MAX = 10_000  # the full check ...
AUTO_FULL_SECONDS = 15.0  # ... which auto runs whenever it is expected to take at most this long
AUTO_FLOOR = 100  # never fewer than this
PROBE_ROWS = 48  # inputs the auto probe times


def _torch_batches(fn, x: np.ndarray, batch: int) -> List[np.ndarray]:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            o = fn(torch.from_numpy(x[i:i + batch]))
            outs.append(tuple(t.numpy() for t in (o if isinstance(o, tuple) else (o,))))
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def check_stages(model, stages: Sequence[Stage], sessions: Sequence, plain: Graph, plain_session, x: np.ndarray,
                 tolerance: float, strict: bool = True, batch: int = 256) -> Dict:
    """Per-stage (and plain backbone) max abs errors of onnxruntime vs PyTorch.

    Args:
        model: the JEIModel.
        stages: the exported stages; ``sessions`` their onnxruntime sessions.
        plain: the plain backbone; ``plain_session`` its session.
        x: model inputs.
        tolerance: max abs error of ``probs`` / ``gate`` (the plain backbone: ``E2E_FACTOR`` x).
        strict: raise beyond tolerance; False (FP16 and INT8 graphs against the FP32 model) only
            records the errors (shapes must still match; the exit decisions are checked by verify).
        batch: rows per PyTorch pass.

    Returns:
        The ``stage_parity`` report.
    """
    report = {"samples": int(len(x)), "tolerance": tolerance, "hidden_rtol": HIDDEN_RTOL, "strict": strict,
              "stages": []}
    # every PyTorch pass first, then every onnxruntime run: alternating the two libraries' thread
    # pools stage by stage costs ~0.1 s a switch on a busy 2-core machine (measured)
    refs, inputs, h = [], [], x
    for stage in stages:
        inputs.append(h)
        refs.append(_torch_batches(model.stage(stage.exits[0], last_exit=stage.exits[-1]).eval(), h, batch))
        if stage.gated:
            h = refs[-1][[o.name for o in stage.outputs].index("hidden_out")]
    plain_ref = _torch_batches(model.plain_backbone().eval(), x, batch)[0]
    for stage, sess, ref, h in zip(stages, sessions, refs, inputs):
        k = stage.index
        names = [o.name for o in stage.outputs]
        feed = quantize_rows(h, stage.input) if stage.input.quantized else h.astype(stage.input.dtype, copy=False)
        got = sess.run(names, {stage.input.name: feed})  # FP16 graphs: float16; quantized edges: their integers
        got = [dequantize_rows(g, t) if t.quantized else g for g, t in zip(got, stage.outputs)]
        row = {"stage": k, "max_abs_error": {}}
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise BuildError(f"parity: stage {k} tensor '{name}' has shape {list(g.shape)} in onnxruntime, "
                                 f"{list(r.shape)} in PyTorch")
            row["max_abs_error"][name] = e = max_abs_error(r, g)
            bound = HIDDEN_RTOL * max(1.0, float(np.max(np.abs(r)))) if name == "hidden_out" else tolerance
            if strict and not e <= bound:
                raise BuildError(f"parity failed: stage {k} tensor '{name}' max abs error {e:.3g} > {bound:.3g} "
                                 "(onnxruntime vs PyTorch)",
                                 hint="an op exports or runs differently in onnxruntime (see the stage's ONNX "
                                      "graph); or, for a large model with steep gates, float rounding: rebuild "
                                      f"with --tolerance {10 * bound:.0e} if the error is a few times the bound")
        report["stages"].append(row)
    e = max_abs_error(plain_ref, plain_session.run(["probs"], {plain.inputs[0].name: x})[0])
    report["plain"] = {"max_abs_error": {"probs": e}, "bound": E2E_FACTOR * tolerance}
    if strict and not e <= E2E_FACTOR * tolerance:
        raise BuildError(f"parity failed: plain backbone tensor 'probs' max abs error {e:.3g} > "
                         f"{E2E_FACTOR * tolerance:g}")
    return report


def probe_seconds_per_input(check: Callable[[np.ndarray], object], x: np.ndarray) -> float:
    """Seconds per input of ``check`` (the per-stage check): timed on a few rows and on all of
    ``x`` after a warm-up; the difference removes the fixed cost of a call."""
    check(x[:2])
    few = min(8, len(x) - 1)
    t = time.perf_counter()
    check(x[:few])
    t_few = time.perf_counter() - t
    t = time.perf_counter()
    check(x)
    t_all = time.perf_counter() - t
    return max(t_all - t_few, 0.0) / (len(x) - few)


def size_check(parity_samples: Union[int, str], stage_samples: int, export_seconds: float = 0.0,
               seconds_per_input: float = 0.0) -> Tuple[int, int, Dict]:
    """How many inputs the decision check and the per-stage check use.

    Args:
        parity_samples: an explicit count, or ``"auto"``.
        stage_samples: the per-stage check's inputs (at most; auto may use fewer).
        export_seconds: how long the export took (auto).
        seconds_per_input: measured cost of checking one input (auto: the probe).

    Returns:
        ``(decision inputs, per-stage inputs, sizing report)``.
    """
    if parity_samples != "auto":
        n = int(parity_samples)
        return n, min(stage_samples, n), {"mode": "explicit", "samples": n}
    per = max(seconds_per_input, 1e-9)
    budget = AUTO_FACTOR * export_seconds
    # the per-stage check adds up to a fifth of the decision inputs: both fit the budget
    n = max(budget / (1.2 * per), min(AUTO_MIN, AUTO_MIN_SECONDS / per))
    if 1.2 * AUTO_MAX * per <= AUTO_FULL_SECONDS:  # a small model: the full check is cheap anyway
        n = AUTO_MAX
    n = int(min(max(n, AUTO_FLOOR), AUTO_MAX))
    n_stage = min(stage_samples, max(PROBE_ROWS, n // 5))
    return n, n_stage, {"mode": "auto", "samples": n, "export_seconds": round(export_seconds, 3),
                        "probe_ms_per_input": round(1e3 * per, 3), "budget_seconds": round(budget, 1),
                        "expected_seconds": round((n + n_stage) * per, 1)}


def parse_samples(value: Union[int, str]) -> Union[int, str]:
    """``"auto"`` or a count >= 1 (BuildError otherwise)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise BuildError(f"parity_samples must be 'auto' or an integer >= 1, got {value!r}")
    return n
