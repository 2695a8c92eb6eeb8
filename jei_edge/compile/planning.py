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
``boundary = (pipeline time - sum reach[a] * T(a, a)) / sum reach[a]`` (at least 0).

Then the choice is checked the same way: the planned grouping, a stage per exit and one single
stage are each run as a pipeline on the same real inputs, interleaved over ``PIPELINE_ROUNDS``
rounds, and the fastest of those measured faster than a stage per exit with confidence is kept
(else a stage per exit: ``confident_choice``); the report's expected times are those measurements, and its
expected gain over a stage per exit is the median of the per-round ratios, with its confidence
interval (``jei_edge.profile.median_ci``). Candidates timed alone in a round robin over
all spans run colder than inside the pipeline, by different amounts for small and large spans,
so the model alone mispredicted the gain of merging (~10-13% predicted where 5-6% was measured
at batch 1); the measured pipelines are what the runtime will do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

PIPELINE_ROWS = 256  # real rows each pipeline runs per timing round (at least one batch)


class Candidates:
    """Every candidate stage ``a..b`` exported and loaded in onnxruntime (``settings``), with the
    input rows that reach it (``batch`` rows of ``x``, hidden states from the unmerged stages).

    ``quantize`` (``jei_edge.compile.quantize.CandidateQuantizer``): the candidates become the
    build's INT8 graphs with its stage edges (``graph``, then ``edges_of`` over all of them; the
    rows entering exit ``a`` then cross as ``edge_rows(a, x)``), so an INT8 bundle is planned on
    the stage and boundary times it will have."""

    def __init__(self, model, x: np.ndarray, work: Path, settings, opset: int, batch: int = 1,
                 progress: Optional[Callable[[str], None]] = None, fuse_attention: bool = False,
                 quantize=None):
        import torch

        from jei_edge.backends.onnxruntime.executor import create_session
        from jei_edge.compile.export import _export
        from jei_edge.compile.plan import StagePlan

        self.settings, self.batch = settings, int(batch)
        model.requires_grad_(False)  # IMs share frozen modules without owning them: trace them as constants
        self.n_exits = n_exits = len(model.stage_ranges())
        rows = np.ascontiguousarray(np.resize(x[:max(batch, 2)], (max(batch, 2),) + x.shape[1:]).astype(np.float32))
        # the hidden state entering each exit's stage, for these rows (from the unmerged stages)
        inputs = [rows]
        with torch.no_grad():
            h = torch.from_numpy(rows)
            for k in range(n_exits - 1):
                h = model.stage(k)(h)[0]
                inputs.append(np.ascontiguousarray(h.numpy()))
        self.sessions: Dict[Tuple[int, int], tuple] = {}
        paths: Dict[Tuple[int, int], Path] = {}
        for a in range(n_exits):
            if progress:
                progress(f"planning: exporting{' and quantizing' if quantize else ''} the stages that start at "
                         f"exit {a} ({n_exits - a} candidates)")
            for b in range(a, n_exits):
                module = model.stage(a, last_exit=b).eval()
                # the candidate's I/O names as the compiler would give it (index a: "x" iff it starts at exit 0)
                plan = StagePlan(index=a, blocks=(0, 0), exits=tuple(range(a, b + 1)), last=b == n_exits - 1, macs=0)
                path = work / f"span_{a}_{b}.onnx"
                with torch.no_grad():
                    _export(module, torch.from_numpy(inputs[a][:2].copy()), path, plan.input_name, plan.output_names,
                            opset, f"candidate stage {a}..{b}", fuse_attention)
                if quantize is None:  # loaded at once: one candidate file on disk at a time
                    self._load(a, b, path, inputs, create_session)
                else:
                    quantize.graph(path, a, plan.input_name)
                    paths[(a, b)] = path
        if quantize is not None:  # the edges need every candidate: then they are loaded
            quantize.edges_of(paths)
            inputs = [quantize.edge_rows(a, x) for a, x in enumerate(inputs)]
            for (a, b), path in paths.items():
                self._load(a, b, path, inputs, create_session)
        self.inputs = inputs

    def _load(self, a: int, b: int, path: Path, inputs, create_session) -> None:
        sess = create_session(path, self.settings, f"candidate stage {a}..{b}")
        self.sessions[(a, b)] = (sess, {sess.get_inputs()[0].name: inputs[a][:self.batch]})
        path.unlink()

    def time_spans(self, repeats: int = 30, pipeline: Optional["Pipeline"] = None,
                   progress: Optional[Callable[[str], None]] = None):
        """Seconds per run of every candidate on ``batch`` rows (median), and the median seconds per
        row of ``pipeline`` timed in the same rounds (None without one).

        Round robin over the candidates, a few runs each per round: a shared machine's drift and
        stalls spread over all candidates instead of biasing the ones timed during them."""
        samples: Dict[Tuple[int, int], list] = {key: [] for key in self.sessions}
        per_round = 3
        rounds = max(1, repeats // per_round)
        if progress:
            progress(f"planning: timing {len(self.sessions)} candidate stages at batch {self.batch} ({rounds} rounds)")
        for sess, feed in self.sessions.values():
            sess.run(None, feed)
        piped: List[float] = []
        for _ in range(rounds):
            for key, (sess, feed) in self.sessions.items():
                for _ in range(per_round):
                    t = time.perf_counter()
                    sess.run(None, feed)
                    samples[key].append(time.perf_counter() - t)
            if pipeline is not None:
                piped.append(pipeline.seconds_per_row())
        times = {key: float(np.median(v)) for key, v in samples.items()}
        return times, (float(np.median(piped)) if piped else None)

    def pipeline(self, groups: Sequence[Sequence[int]], x: np.ndarray) -> "Pipeline":
        return Pipeline(self, groups, x)


class Pipeline:
    """A grouping of exits run by the runtime's own conditional loop (``NumpyWorkspace``,
    ``OrtStageExecutor``) on the candidates' sessions, over ``PIPELINE_ROWS`` rows of ``x``."""

    def __init__(self, cands: Candidates, groups: Sequence[Sequence[int]], x: np.ndarray):
        from jei_edge.backends.onnxruntime.executor import OrtStageExecutor
        from jei_edge.bundle.manifest import Stage, TensorSpec
        from jei_edge.runtime.workspace import NumpyWorkspace

        last, batch = cands.n_exits - 1, cands.batch
        self.groups = [tuple(g) for g in groups]
        stages, sessions = [], []
        for i, g in enumerate(self.groups):
            sess, feed = cands.sessions[(g[0], g[-1])]
            outs = sess.run(None, feed)
            specs = tuple(TensorSpec(o.name, tuple(v.shape[1:]), str(v.dtype)) for o, v in zip(sess.get_outputs(), outs))
            inp = cands.inputs[g[0]]
            stages.append(Stage(i, "", (g[0], g[-1] + 1), g, tuple(e for e in g if e < last), 0, False,
                                (TensorSpec(sess.get_inputs()[0].name, tuple(inp.shape[1:]), str(inp.dtype)),), specs))
            sessions.append(sess)
        self.executor = OrtStageExecutor(sessions, cands.settings)
        self.ws = NumpyWorkspace(stages, int(stages[-1].output("probs").shape[-1]), batch)
        rows = max(batch, PIPELINE_ROWS // batch * batch)
        x = np.ascontiguousarray(np.resize(x, (rows,) + x.shape[1:]).astype(np.float32))
        self.batches = [x[i:i + batch] for i in range(0, rows, batch)]
        self.rows = rows
        reach = np.zeros(len(stages))
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


PIPELINE_ROUNDS = 16  # rounds of the check; the gain is the median of per-round ratios (a ~95% interval from 16)


def compare_pipelines(pipelines: Sequence[Pipeline], rounds: int = PIPELINE_ROUNDS) -> List[List[float]]:
    """Seconds per row of each pipeline in every round, timed interleaved (the order alternating
    per round), so that per-round ratios compare runs made next to each other."""
    from jei_edge.profile.measure import alternating

    out: List[List[float]] = [[] for _ in pipelines]
    for _, order in alternating(len(pipelines), rounds):
        for j in order:
            out[j].append(pipelines[j].seconds_per_row())
    return out


def confident_choice(per_round: Dict[str, List[float]], every_key: str) -> Tuple[str, Dict[str, float]]:
    """The grouping to keep, from each pipeline's seconds per row in every round: the fastest
    (median) of those measured **faster than a stage per exit with confidence** (the interval of
    the median per-round ratio every / it lies wholly above 1), else a stage per exit: a merge
    whose gain cannot be told from noise only coarsens the exits. Returns ``(key, gain)``, the
    gain over a stage per exit being the median of per-round ratios (each round runs the
    pipelines next to each other, so the host's drift cancels) with its interval."""
    from jei_edge.profile.measure import median_ci, ratios

    gains = {k: median_ci(ratios(per_round[every_key], v)) for k, v in per_round.items()}
    sure = [k for k in per_round if k != every_key and gains[k]["low"] > 1.0]
    chosen = min(sure, key=lambda k: float(np.median(per_round[k]))) if sure else every_key
    return chosen, gains[chosen]


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
                progress: Optional[Callable[[str], None]] = None, fuse_attention: bool = False,
                quantize=None):
    """Measure and choose (see the module docstring; ``quantize``: see ``Candidates``). Returns
    ``(groups, report)``."""
    from jei_edge.model.jei import exit_decisions

    n = len(model.stage_ranges())
    reach = exit_decisions(model, x_real).reach(n)
    cands = Candidates(model, x_real, work, settings, opset, batch=batch, progress=progress,
                       fuse_attention=fuse_attention, quantize=quantize)
    every = [(i,) for i in range(n)]
    every_pipe = cands.pipeline(every, x_real)
    times, piped = cands.time_spans(pipeline=every_pipe, progress=progress)
    b_s = boundary_seconds({"seconds_per_row": piped, "reach": every_pipe.reach}, times, batch)
    planned, cost = best_groups(reach, times, b_s)
    # the check: the plan, a stage per exit and one single stage, each run as a pipeline
    options = {"every_exit": every, "one_stage": [tuple(range(n))]}
    options = {"planned": planned, **{k: g for k, g in options.items() if g != planned}}
    if progress:
        progress(f"planning: running the plan {[list(g) for g in planned]}, a stage per exit and one stage "
                 f"as pipelines at batch {batch}")
    names = list(options)
    pipes = [every_pipe if options[k] == every else cands.pipeline(options[k], x_real) for k in names]
    per_round = dict(zip(names, compare_pipelines(pipes)))
    measured = {k: float(np.median(v)) for k, v in per_round.items()}
    every_key = next(k for k in names if options[k] == every)
    chosen, gain = confident_choice(per_round, every_key)
    groups = list(options[chosen])

    def ms(groups_) -> float:
        key = next(k for k in names if options[k] == groups_)
        return round(1e3 * measured[key], 4)

    report = {
        "mode": "auto", "batch": int(batch), "boundary_us": round(float(b_s * 1e6), 3), "samples": int(len(x_real)),
        # what the candidates were timed as: FP32, or the build's INT8 graphs and stage edges
        "timed_as": quantize.description if quantize is not None else "fp32",
        "boundary": "measured (stage-per-exit pipeline vs its stages timed alone)",
        "reach": [round(float(r), 6) for r in reach],
        "span_ms": {f"{a}-{b}": round(1e3 * t, 4) for (a, b), t in sorted(times.items())},  # per run of `batch` rows
        "groups": [list(g) for g in groups],
        "modelled_groups": [list(g) for g in planned],
        "modelled_ms_per_sample": round(1e3 * cost / batch, 4),
        # measured: each grouping run as a pipeline on the same real rows, interleaved
        "expected": "measured pipelines (planned, every exit, one stage) on the build's real inputs",
        "pipeline_rows": int(every_pipe.rows),
        "expected_ms_per_sample": ms(groups),
        "expected_ms_per_sample_every_exit": ms(every),
        "expected_ms_per_sample_one_stage": ms([tuple(range(n))]),
        "pipeline_rounds": len(per_round[chosen]),
        "choice": ("measured faster than a stage per exit with confidence" if groups != every else
                   "a stage per exit: no other grouping measured faster with confidence"),
        "expected_speedup_over_every_exit": round(gain["median"], 4),
        "expected_speedup_ci": {k: round(v, 4) for k, v in gain.items()},
    }
    return groups, report


def choose_groups(model, plan: str, plan_batch: int, x_real: Optional[np.ndarray], work: Path, backend_options: Dict,
                  opset: int, progress: Optional[Callable[[str], None]] = None, fuse_attention: bool = False,
                  quantize=None):
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
        fuse_attention: time candidates with their attention blocks fused, as the build exports them.
        quantize: time candidates as INT8 graphs (``Candidates``; an INT8 build passes its
            ``CandidateQuantizer``).
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
                                     batch=plan_batch, progress=progress, fuse_attention=fuse_attention,
                                     quantize=quantize)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if progress:
        progress(f"plan: exits grouped {[list(g) for g in groups]} (expected {report['expected_ms_per_sample']:.3f} "
                 f"ms/sample at batch {plan_batch} vs {report['expected_ms_per_sample_every_exit']:.3f} with a stage "
                 "per exit)")
    return groups, report
