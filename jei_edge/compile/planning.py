"""Automatic stage planning: which consecutive exits to merge into one stage (docs/runtime.md, "Stage planning").

Every boundary costs a session run, layout conversions at the graph edges and the runtime's
decision, and early gates often rarely fire. Given

- **exit statistics**: ``reach[i]``, the fraction of real inputs that have not exited before exit
  ``i`` (the trained model at offsets 0, from the build's real inputs), and
- **measured stage times** ``T(a, b)``: the stage holding exits ``a..b`` exported and timed in
  onnxruntime with the target's session settings on ``batch`` rows (median of repeats), plus a
  per-boundary runtime cost,

the plan minimising the expected time per sample ``sum over stages of reach[a] * (T(a, b) +
boundary)`` is found exactly by dynamic programming over the (G+1)(G+2)/2 candidate spans.
Merged stages keep the model's decisions (``jei_edge.compile.plan``), so the plan changes speed
only.

The boundary cost is measured, not assumed: the one-stage-per-exit pipeline (the ``(k, k)``
candidates' sessions in the runtime's own conditional loop, ``NumpyWorkspace`` and
``OrtStageExecutor``) runs on real inputs inside the same timing rounds as the candidates, and
``boundary = (pipeline time - sum reach[a] * T(a, a)) / sum reach[a]``: everything a stage run
costs in the pipeline beyond the session timed alone (the decision and compaction, the glue, and
a session being colder between other stages than in a loop of its own). It also absorbs, at
batch > 1, that a stage runs on fewer rows than ``batch`` once some have left. The predicted time
of the stage-per-exit plan is then the measured one by construction; a merged plan's prediction
errs by the span timings only. (A fixed 10 us per boundary over-predicted the gain of merging:
~10% predicted vs 6% measured at batch 1, 5% vs ~5% at batch 64.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

PIPELINE_ROWS = 64  # real rows per timing round for the boundary calibration (batch 1); at least one batch


def time_spans(model, x: np.ndarray, work: Path, settings, opset: int, batch: int = 1, repeats: int = 30,
               progress: Optional[Callable[[str], None]] = None, x_pipeline: Optional[np.ndarray] = None):
    """Seconds per run of every candidate stage ``a..b`` on ``batch`` rows (onnxruntime, ``settings``).

    With ``x_pipeline`` (real inputs) also times the one-stage-per-exit pipeline on them, in the same
    rounds: returns ``(times, pipeline)`` where ``pipeline`` is ``{"seconds_per_row", "reach"}``
    (median seconds per input row, and the fraction of rows entering each stage)."""
    import torch

    from jei_edge.backends.onnxruntime.executor import create_session
    from jei_edge.compile.export import _export
    from jei_edge.compile.plan import StagePlan

    model.requires_grad_(False)  # IMs share frozen modules without owning them: trace them as constants
    n_exits = len(model.stage_ranges())
    rows = np.ascontiguousarray(np.resize(x[:max(batch, 2)], (max(batch, 2),) + x.shape[1:]).astype(np.float32))
    # the hidden state entering each exit's stage, for these rows (from the unmerged stages)
    inputs = [rows]
    with torch.no_grad():
        h = torch.from_numpy(rows)
        for k in range(n_exits - 1):
            h = model.stage(k)(h)[0]
            inputs.append(np.ascontiguousarray(h.numpy()))
    sessions: Dict[Tuple[int, int], tuple] = {}
    for a in range(n_exits):
        if progress:
            progress(f"planning: exporting the stages that start at exit {a} ({n_exits - a} candidates)")
        for b in range(a, n_exits):
            module = model.stage(a, last_exit=b).eval()
            # the candidate's I/O names as the compiler would give it (index a: "x" iff it starts at exit 0)
            plan = StagePlan(index=a, blocks=(0, 0), exits=tuple(range(a, b + 1)), last=b == n_exits - 1, macs=0)
            path = work / f"span_{a}_{b}.onnx"
            with torch.no_grad():
                _export(module, torch.from_numpy(inputs[a][:2].copy()), path, plan.input_name, plan.output_names,
                        opset, f"candidate stage {a}..{b}")
            sess = create_session(path, settings, f"candidate stage {a}..{b}")
            sessions[(a, b)] = (sess, {sess.get_inputs()[0].name: inputs[a][:batch]})
            path.unlink()
    # round robin over the candidates, a few runs each per round: a shared machine's drift and
    # stalls spread over all candidates instead of biasing the ones timed during them
    samples: Dict[Tuple[int, int], list] = {key: [] for key in sessions}
    per_round = 3
    rounds = max(1, repeats // per_round)
    if progress:
        progress(f"planning: timing {len(sessions)} candidate stages at batch {batch} ({rounds} rounds)")
    for sess, feed in sessions.values():
        sess.run(None, feed)
    pipe = _Pipeline(sessions, inputs, settings, batch, x_pipeline) if x_pipeline is not None else None
    piped: List[float] = []
    for _ in range(rounds):
        for key, (sess, feed) in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                sess.run(None, feed)
                samples[key].append(time.perf_counter() - t)
        if pipe is not None:
            piped.append(pipe.seconds_per_row())
    times = {key: float(np.median(v)) for key, v in samples.items()}
    if pipe is None:
        return times
    return times, {"seconds_per_row": float(np.median(piped)), "reach": pipe.reach}


class _Pipeline:
    """The one-stage-per-exit plan run by the runtime's own loop on the ``(k, k)`` candidate sessions."""

    def __init__(self, sessions, inputs, settings, batch: int, x: np.ndarray):
        from jei_edge.backends.onnxruntime.executor import OrtStageExecutor
        from jei_edge.bundle.manifest import Stage, TensorSpec
        from jei_edge.runtime.workspace import NumpyWorkspace

        n = 1 + max(b for _, b in sessions)
        stages = []
        for k in range(n):
            sess, feed = sessions[(k, k)]
            outs = sess.run(None, feed)
            specs = tuple(TensorSpec(o.name, tuple(v.shape[1:]), str(v.dtype)) for o, v in zip(sess.get_outputs(), outs))
            inp = TensorSpec(sess.get_inputs()[0].name, tuple(inputs[k].shape[1:]), str(inputs[k].dtype))
            stages.append(Stage(k, "", (k, k + 1), (k,), () if k == n - 1 else (k,), 0, False, (inp,), specs))
        self.num_classes = int(stages[-1].output("probs").shape[-1])
        self.executor = OrtStageExecutor([sessions[(k, k)][0] for k in range(n)], settings)
        self.ws = NumpyWorkspace(stages, self.num_classes, batch)
        rows = max(batch, PIPELINE_ROWS // batch * batch)
        x = np.ascontiguousarray(np.resize(x, (rows,) + x.shape[1:]).astype(np.float32))
        self.batches = [x[i:i + batch] for i in range(0, rows, batch)]
        self.rows = rows
        reach = np.zeros(n)
        for b in self.batches:  # untimed: warm-up and the rows entering each stage
            r = self._run(b)
            reach[:len(r)] += r
        self.reach = reach / rows

    def _run(self, b):
        from jei_edge.runtime.loop import run_conditional

        return run_conditional(self.executor, self.ws, b, "exit").reach

    def seconds_per_row(self) -> float:
        t = time.perf_counter()
        for b in self.batches:
            self._run(b)
        return (time.perf_counter() - t) / self.rows


def boundary_seconds(pipeline: Dict, times: Dict[Tuple[int, int], float], batch: int) -> float:
    """Per-stage-run cost beyond the stage timed alone, per run of ``batch`` rows (>= 0), from the
    measured stage-per-exit pipeline (see the module docstring)."""
    reach = np.asarray(pipeline["reach"], dtype=np.float64)
    alone = sum(float(r) * times[(k, k)] for k, r in enumerate(reach))
    return max(0.0, (pipeline["seconds_per_row"] * batch - alone) / float(reach.sum()))


def best_groups(reach: np.ndarray, times: Dict[Tuple[int, int], float], boundary_s: float) -> Tuple[List[Tuple[int, ...]], float]:
    """The grouping of exits ``0..G`` minimising ``sum reach[a] * (T(a, b) + boundary_s)``, and that cost."""
    n = len(reach)
    best = [0.0] * (n + 1)
    choice = [n] * (n + 1)
    for a in range(n - 1, -1, -1):
        best[a] = float("inf")
        for b in range(a, n):
            cost = reach[a] * (times[(a, b)] + boundary_s) + best[b + 1]
            if cost < best[a]:
                best[a], choice[a] = cost, b
    groups, a = [], 0
    while a < n:
        b = choice[a]
        groups.append(tuple(range(a, b + 1)))
        a = b + 1
    return groups, best[0]


def expected_seconds(groups, reach: np.ndarray, times: Dict[Tuple[int, int], float], boundary_s: float) -> float:
    return float(sum(reach[g[0]] * (times[(g[0], g[-1])] + boundary_s) for g in groups))


def auto_groups(model, x_real: np.ndarray, work: Path, settings, opset: int, batch: int = 1,
                progress: Optional[Callable[[str], None]] = None):
    """Measure and choose (see the module docstring). Returns ``(groups, report)``."""
    from jei_edge.model.jei import exit_decisions

    reach = exit_decisions(model, x_real).reach(len(model.stage_ranges()))
    times, pipeline = time_spans(model, x_real, work, settings, opset, batch=batch, progress=progress,
                                 x_pipeline=x_real)
    n = len(reach)
    b_s = boundary_seconds(pipeline, times, batch)
    boundary_us = b_s * 1e6
    groups, cost = best_groups(reach, times, b_s)
    every = [(i,) for i in range(n)]
    report = {
        "mode": "auto", "batch": int(batch), "boundary_us": round(float(boundary_us), 3), "samples": int(len(x_real)),
        "boundary": "measured (stage-per-exit pipeline vs its stages timed alone)",
        "reach": [round(float(r), 6) for r in reach],
        "span_ms": {f"{a}-{b}": round(1e3 * t, 4) for (a, b), t in sorted(times.items())},  # per run of `batch` rows
        "groups": [list(g) for g in groups],
        # the span times are per run of ``batch`` rows: per sample is that / batch
        "expected_ms_per_sample": round(1e3 * cost / batch, 4),
        "expected_ms_per_sample_every_exit": round(1e3 * expected_seconds(every, reach, times, b_s) / batch, 4),
        "expected_ms_per_sample_one_stage": round(1e3 * expected_seconds([tuple(range(n))], reach, times, b_s) / batch, 4),
    }
    return groups, report


def choose_groups(model, plan: str, plan_batch: int, x_real: Optional[np.ndarray], work: Path, backend_options: Dict,
                  opset: int, progress: Optional[Callable[[str], None]] = None):
    """The exit groups of ``--plan`` (None = one stage per exit) and the plan's report.

    Args:
        model: the JEIModel.
        plan: ``"every"``, ``"auto"`` or explicit groups (``"0-3,4,5"``).
        plan_batch: the batch ``auto`` times the stages at.
        x_real: real inputs (``auto`` needs them for its exit statistics).
        work: a scratch directory for ``auto``'s candidate graphs (removed afterwards).
        backend_options: the target's onnxruntime settings.
        opset: ONNX opset.
        progress: message callback.
    """
    import shutil

    from jei_edge.backends.onnxruntime import OrtSettings
    from jei_edge.compile.plan import parse_groups
    from jei_edge.errors import BuildError

    n_exits = len(model.stage_ranges())
    mode = (plan or "every").strip()
    if mode == "every":
        return None, {"mode": "every", "groups": [[k] for k in range(n_exits)]}
    if mode != "auto":
        groups = parse_groups(mode, n_exits)
        return groups, {"mode": "manual", "groups": [list(g) for g in groups]}
    if x_real is None or not len(x_real):
        raise BuildError("--plan auto needs real inputs for its exit statistics, and none could be loaded",
                         hint="pass --data SOURCE (the data the model was trained on), or use --plan every")
    if plan_batch < 1:
        raise BuildError(f"plan_batch must be >= 1, got {plan_batch}")
    work.mkdir()
    try:
        groups, report = auto_groups(model, x_real, work, OrtSettings.from_options(backend_options), opset,
                                     batch=plan_batch, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        progress(f"plan: exits grouped {[list(g) for g in groups]} (expected {report['expected_ms_per_sample']:.3f} "
                 f"ms/sample at batch {plan_batch} vs {report['expected_ms_per_sample_every_exit']:.3f} with a stage "
                 "per exit)")
    return groups, report
