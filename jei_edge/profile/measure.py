"""Timed passes of a loaded ``Runtime`` over a list of batches, with the definitions of docs/architecture.md.

This module is the one implementation of the measurements; ``profile_bundle`` (``jei-edge
profile``) and every script in ``benchmarks/`` use it:

- **exit** / **full** pass: ``Runtime.run`` on every batch, in ``exit`` or ``full`` mode (input
  check, decisions, compaction and result objects included);
- **ideal** pass: the very stage runs of the exit pass (stage k on the real reach count n_k of the
  same batch's data) back to back, without decisions or compaction: the sum of t_k(n_k) with the
  same executor, buffers and session settings;
- **plain** pass: the plain backbone (one graph, no IMs, no gates) on the same batches, with the
  runtime's session settings (or any callable the caller gives, e.g. a plain model on the GPU);
- **stage** time: stage k alone on m rows (standalone t_k(m)).

``interleaved(passes, xs, reaches, repeats)`` is the timing protocol: per repeat, exit and ideal
side by side in alternating order (so that a shared machine's stalls hit both alike), then full and
plain; with several ``Passes`` (bundles compared side by side) their order alternates too.
**Rivals** (``Passes(..., rivals={"hand": fn})``: any other way to run the same batches, e.g. a
hand-written loop) are timed in the same group as exit, on the far side of it from ideal, so that
exit is always next to both. ``median`` / ``median_ratio`` summarise repeats (ratios are taken per
repeat); ``median_ci`` gives the distribution-free confidence interval of a median (order
statistics), so that a ratio can be called faster, slower, or not told apart from 1 on a noisy
machine. ``Breakdown`` times
each step of ``Runtime.run``'s own code path through declared wrappers of the executor and
workspace (``TimedExecutor``, ``TimedWorkspace``).

Device time: every clock reading is preceded by ``Workspace.synchronize()`` (a no-op on the CPU),
so on CUDA a pass measures the work running to completion, not its queueing.

Torch-free: needs only the runtime (numpy + the bundle's backend).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from jei_edge.errors import InputError
from jei_edge.runtime.loop import StageExecutor, Workspace

MODES = ("exit", "ideal", "full", "plain")


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def median_ratio(num, den) -> float:
    """Median over repeats of the per-repeat ratio ``num[i] / den[i]``."""
    return median(ratios(num, den))


def ratios(num, den) -> np.ndarray:
    """The per-repeat ratios ``num[i] / den[i]``."""
    return np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64)


def theoretical_speedup(cost, exit_index) -> float:
    """What counted MACs promise for these rows: 1 / the mean cost of the exits they took
    (``cost``: per-exit costs, ``Exits.cost`` vs the full model or ``Exits.cost_vs_plain``)."""
    return 1.0 / float(np.asarray(cost, dtype=np.float64)[np.asarray(exit_index)].mean())


def median_ci(values, level: float = 0.95) -> Dict[str, float]:
    """Distribution-free confidence interval of the median of ``values`` (independent repeats):
    the order statistics ``(x_(j), x_(n+1-j))`` with the largest ``j`` whose binomial coverage
    ``1 - 2 P(Bin(n, 1/2) < j)`` is still at least ``level``. With too few values for ``level``
    (fewer than 6 at 95%) it is ``(min, max)``. Returns ``{"median", "low", "high", "coverage"}``
    (``coverage``: the interval's actual confidence)."""
    from math import comb

    x = np.sort(np.asarray(values, dtype=np.float64))
    n = int(x.size)
    if n == 0:
        raise ValueError("median_ci of no values")
    below = 0.0  # P(Bin(n, 1/2) < j), growing with j
    j, coverage = 1, 1.0 - 2.0 * 0.5 ** n
    for cand in range(2, n // 2 + 1):
        below += comb(n, cand - 1) * 0.5 ** n
        if 1.0 - 2.0 * below < level:
            break
        j, coverage = cand, 1.0 - 2.0 * below
    return {"median": float(np.median(x)), "low": float(x[j - 1]), "high": float(x[n - j]),
            "coverage": float(coverage)}


def format_interval(ci: Dict[str, float], digits: int = 3) -> str:
    """``[low-high]`` of a ``median_ci`` result (the form every report and benchmark table uses)."""
    return f"[{ci['low']:.{digits}f}-{ci['high']:.{digits}f}]"


def ratio_verdict(ci: Dict[str, float]) -> str:
    """``faster`` (the interval lies above 1), ``slower`` (below 1) or ``parity`` (it holds 1)."""
    return "faster" if ci["low"] > 1.0 else "slower" if ci["high"] < 1.0 else "parity"


def timed_call(fn: Callable[..., Any], *args, sync: Optional[Callable[[], None]] = None):
    """``(fn(*args), seconds)``; ``sync`` (e.g. ``ws.synchronize``) runs before the clock starts and
    before it stops, so device work queued by ``fn`` is counted where it runs."""
    if sync is not None:
        sync()
    t = time.perf_counter()
    result = fn(*args)
    if sync is not None:
        sync()
    return result, time.perf_counter() - t


def median_time(fn: Callable[[], Any], repeats: int, sync: Optional[Callable[[], None]] = None,
                warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (``timed_call``)."""
    for _ in range(warmup):
        fn()
    return median([timed_call(fn, sync=sync)[1] for _ in range(repeats)])


class Passes:
    """Timing primitives over one runtime (see the module docstring).

    Args:
        rt: a loaded ``Runtime``.
        plain: the plain backbone as a callable ``plain(batch)`` (None: no plain pass).
        rivals: other ways to run the same batches, by name (``fn(batch)``, e.g. a hand-written
            loop), timed next to the exit pass in every repeat; names must not be a mode's.
    """

    def __init__(self, rt, plain: Optional[Callable[[np.ndarray], Any]] = None,
                 rivals: Optional[Dict[str, Callable[[np.ndarray], Any]]] = None):
        self.rt = rt
        self.ex = rt.executor
        self.ws = rt.workspace
        self.num_stages = rt.bundle.num_stages
        self.plain = plain
        self.rivals = dict(rivals or {})
        clash = sorted(set(self.rivals) & set(MODES + ("calls",)))
        if clash:
            raise ValueError(f"rival names {clash} are taken by the passes")

    @classmethod
    def for_runtime(cls, rt, batch_size: Optional[int] = None,
                    rivals: Optional[Dict[str, Callable[[np.ndarray], Any]]] = None) -> "Passes":
        """With the bundle's plain backbone on the runtime's settings (onnxruntime runtimes only; the
        small-batch settings when ``batch_size`` is small enough for them, as the stages do; rows
        split over the runtime's row workers when it has them)."""
        plain = None
        entry = rt.manifest.plain
        if entry is not None and rt.backend == "onnxruntime":
            from jei_edge.backends.onnxruntime.executor import create_session, row_split

            settings = rt.executor.settings
            small = settings.small_batch
            use = small if small is not None and batch_size is not None and batch_size <= settings.small_batch_rows \
                else settings
            sess = create_session(rt.bundle.file(entry.file), use, "plain backbone", built_with=rt.manifest.toolchain)
            # with row workers the plain backbone's rows are split over the same threads (a fair rival)
            plain = row_split(lambda b: sess.run(["probs"], {"x": b}),
                              getattr(rt.executor, "rows", None) if use is settings else None)
        return cls(rt, plain, rivals)

    # -- batches and reach counts ------------------------------------------------------------
    @staticmethod
    def batches(x: np.ndarray, batch_size: int, samples: Optional[int] = None) -> List[np.ndarray]:
        """Whole batches of ``batch_size`` rows from the first ``samples`` rows of ``x`` (contiguous copies)."""
        n = len(x) if samples is None else min(int(samples), len(x))
        count = n // batch_size
        if count == 0:
            raise InputError(f"{n} sample(s) are fewer than one batch of {batch_size}",
                             hint="give more samples or a smaller batch size")
        return [np.ascontiguousarray(x[i * batch_size:(i + 1) * batch_size]) for i in range(count)]

    def reaches(self, xs: Sequence[np.ndarray], offsets=None) -> List[List[int]]:
        """The reach counts n_k of every batch (one untimed exit pass)."""
        return [self.rt.run(b, offsets=offsets).reach for b in xs]

    def boundaries(self, reaches: Sequence[Sequence[int]]) -> int:
        """Boundaries crossed by the batches (a batch that reached the last stage crossed one fewer)."""
        return int(sum(len(r) - (1 if len(r) == self.num_stages else 0) for r in reaches))

    def reach_total(self, reaches: Sequence[Sequence[int]]) -> List[int]:
        """Rows that entered each stage, summed over the batches."""
        total = np.zeros(self.num_stages, dtype=np.int64)
        for r in reaches:
            total[:len(r)] += r
        return [int(v) for v in total]

    # -- passes ------------------------------------------------------------------------------
    def _clock(self) -> float:
        self.ws.synchronize()  # queued device work is counted where it runs (no-op on the CPU)
        return time.perf_counter()

    def prime(self, batch: np.ndarray) -> None:
        """Fill every stage's buffers with valid rows (a full pass over ``batch``) for standalone stage runs."""
        self.rt.run(batch, mode="full")
        x0 = self.ws.stage_input(0)
        if isinstance(x0, np.ndarray) and x0 is not batch:  # a host workspace may have read a large batch
            x0[:len(batch)] = batch                           # in place: its own stage-0 buffer gets the rows

    def exit_pass(self, xs, offsets=None, per_call: Optional[list] = None) -> float:
        run = self.rt.run
        if per_call is None:
            t = self._clock()
            for b in xs:
                run(b, offsets=offsets)
            return self._clock() - t
        total = 0.0
        for b in xs:
            t = self._clock()
            run(b, offsets=offsets)
            dt = self._clock() - t
            per_call.append(dt)
            total += dt
        return total

    def full_pass(self, xs) -> float:
        run = self.rt.run
        t = self._clock()
        for b in xs:
            run(b, mode="full")
        return self._clock() - t

    def ideal_pass(self, xs, reaches) -> float:
        # begin() only points stage 0 at the batch (and resets S); every later stage reads the
        # rows the previous stage left in its buffer
        ws, ex = self.ws, self.ex
        t = self._clock()
        for b, r in zip(xs, reaches):
            ws.begin(b)
            for k, m in enumerate(r):
                ex.execute(k, m, ws)
        return self._clock() - t

    def plain_pass(self, xs) -> float:
        if self.plain is None:
            raise RuntimeError("no plain backbone")
        run = self.plain
        t = self._clock()
        for b in xs:
            run(b)
        return self._clock() - t

    def stage_time(self, k: int, m: int) -> float:
        """One standalone run of stage ``k`` on ``m`` rows of its (primed) input buffer."""
        return timed_call(self.ex.execute, k, m, self.ws, sync=self.ws.synchronize)[1]

    def rival_pass(self, name: str, xs) -> float:
        fn = self.rivals[name]
        t = self._clock()
        for b in xs:
            fn(b)
        return self._clock() - t

    def warm_up(self, xs, offsets=None, times: int = 1) -> None:
        for _ in range(times):
            self.exit_pass(xs, offsets)
            for name in self.rivals:
                self.rival_pass(name, xs)
            self.full_pass(xs)
            if self.plain is not None:
                self.plain_pass(xs)

    def repeat(self, i: int, xs, reaches, offsets=None, per_call: Optional[list] = None) -> Dict[str, float]:
        """Repeat ``i`` of the protocol: ideal, exit and the rivals side by side, in that order on
        even ``i`` and reversed on odd ``i`` (exit always next to ideal and to the first rival),
        then full, then plain (when there is one). Seconds per pass."""
        t: Dict[str, float] = {}
        group = ["ideal", "exit"] + list(self.rivals)
        for step in (group if i % 2 == 0 else group[::-1]):
            if step == "ideal":
                self.prime(xs[0])
                t["ideal"] = self.ideal_pass(xs, reaches)
            elif step == "exit":
                t["exit"] = self.exit_pass(xs, offsets, per_call)
            else:
                t[step] = self.rival_pass(step, xs)
        t["full"] = self.full_pass(xs)
        if self.plain is not None:
            t["plain"] = self.plain_pass(xs)
        return t


def interleaved(passes: Sequence[Passes], xs: Sequence[np.ndarray], reaches: Sequence, repeats: int,
                offsets=None, *, warmup: int = 1, per_call: bool = False,
                each_repeat: Optional[Callable[[int], None]] = None) -> List[Dict[str, List[float]]]:
    """The timing protocol (see the module docstring) on the same batches ``xs``.

    Args:
        passes: one ``Passes`` per runtime (several: compared side by side, their order
            alternating between repeats).
        reaches: per ``Passes``, the reach counts of every batch (``Passes.reaches``).
        repeats: interleaved repeats; ``warmup``: untimed exit/full/plain passes before them.
        offsets: per-gate threshold offsets of the exit passes.
        per_call: also record every exit-mode ``Runtime.run`` call (``"calls"``).
        each_repeat: called with ``i`` after every repeat (more measurements interleaved with these).

    Returns:
        Per ``Passes``: ``{"exit", "ideal", "full", "plain"[, "calls"], *rivals: seconds per
        repeat}`` (``plain`` empty without a plain backbone).
    """
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    for p in passes:
        p.warm_up(xs, offsets, warmup)
    out = [{m: [] for m in MODES + (("calls",) if per_call else ()) + tuple(p.rivals)} for p in passes]
    for i, order in alternating(len(passes), repeats):
        for j in order:
            t = passes[j].repeat(i, xs, reaches[j], offsets, out[j]["calls"] if per_call else None)
            for m, v in t.items():
                out[j][m].append(v)
        if each_repeat is not None:
            each_repeat(i)
    return out


def alternating(count: int, repeats: int):
    """``(i, order)`` for each repeat: the ``count`` contestants in order, reversed every other
    repeat (side-by-side timing: neither always goes first)."""
    order = list(range(count))
    for i in range(repeats):
        yield i, (order if i % 2 == 0 else order[::-1])


# -- per-step breakdown of Runtime.run ------------------------------------------------------------
class TimedWorkspace(Workspace):
    """A view of a workspace that times its loop side (``begin``, ``exit_and_compact`` as
    ``boundary``, ``finish``, ``collect``) into ``times[name]`` (seconds per call; completion on
    the device included). The executor side passes through; closing the view closes nothing."""

    def __init__(self, inner: Workspace, times: Dict[str, List[float]]):
        self.inner, self.times = inner, times
        self.capabilities = inner.capabilities
        self.input_guard = inner.input_guard
        self.stream = inner.stream
        self._sync = inner.synchronize if inner.stream is not None else None

    def _timed(self, name: str, fn, *args):
        r, seconds = timed_call(fn, *args, sync=self._sync)
        self.times.setdefault(name, []).append(seconds)
        return r

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def input_owned(self) -> bool:
        return self.inner.input_owned

    def stage_input(self, k: int):
        return self.inner.stage_input(k)

    def stage_outputs(self, k: int):
        return self.inner.stage_outputs(k)

    def bind_outputs(self, k: int, **addresses) -> None:
        self.inner.bind_outputs(k, **addresses)

    def synchronize(self) -> None:
        self.inner.synchronize()

    def begin(self, x) -> int:
        return self._timed("begin", self.inner.begin, x)

    def exit_and_compact(self, k: int, n: int, delta, early_exit: bool) -> int:
        return self._timed("boundary", self.inner.exit_and_compact, k, n, delta, early_exit)

    def finish(self, k: int, n: int, delta=0.0, early_exit: bool = True) -> None:
        self._timed("finish", self.inner.finish, k, n, delta, early_exit)

    def collect(self, reach):
        return self._timed("collect", self.inner.collect, reach)


class TimedExecutor(StageExecutor):
    """A view of an executor that times every stage run into ``times["stage_K"]`` (seconds per
    call, completion on the device included). It runs the wrapped executor on the wrapped
    workspace of a ``TimedWorkspace``, so the executor's per-workspace state is the runtime's own."""

    def __init__(self, inner: StageExecutor, times: Dict[str, List[float]]):
        self.inner, self.times = inner, times
        self.num_stages = inner.num_stages
        self.capabilities = inner.capabilities
        self._names = [f"stage_{k}" for k in range(inner.num_stages)]

    def execute(self, k: int, n: int, ws) -> None:
        inner_ws = ws.inner if isinstance(ws, TimedWorkspace) else ws
        sync = inner_ws.synchronize if inner_ws.stream is not None else None
        self.times.setdefault(self._names[k], []).append(timed_call(self.inner.execute, k, n, inner_ws, sync=sync)[1])


class Breakdown:
    """``Runtime.run`` of ``rt`` with every step timed: the runtime's own code path (input check,
    offsets, the conditional loop) on ``TimedExecutor`` / ``TimedWorkspace`` views of its executor
    and workspace. ``times``: ``begin``, ``stage_K``, ``boundary``, ``finish``, ``collect`` ->
    seconds per call. Closing nothing: the runtime stays ``rt``'s to close."""

    def __init__(self, rt):
        from jei_edge.runtime.runtime import Runtime

        self.times: Dict[str, List[float]] = {}
        self.runtime = Runtime(rt.bundle, TimedExecutor(rt.executor, self.times),
                               TimedWorkspace(rt.workspace, self.times), rt.max_batch, rt.device, rt.backend,
                               rt.settings)

    def run(self, x, mode: str = "exit", offsets=None):
        return self.runtime.run(x, mode, offsets)

    def mean(self, name: str) -> float:
        """Mean seconds per call of step ``name`` (0 when it never ran)."""
        v = self.times.get(name, [])
        return float(np.mean(v)) if v else 0.0


def _percentiles(seconds: Sequence[float]) -> Dict[str, float]:
    a = 1e3 * np.asarray(seconds, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def profile_bundle(rt, x: np.ndarray, y: Optional[np.ndarray] = None, batch_sizes: Sequence[int] = (1, 64),
                   repeats: int = 7, samples: Optional[int] = None, offsets=None,
                   progress: Optional[Callable[[str], None]] = None,
                   compare: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Profile a loaded runtime on model inputs ``x`` (``[N, C, H, W]``, preprocessed).

    For each batch size: exit / full / plain / ideal time per sample (medians over ``repeats``
    repeats of ``interleaved``), realized speedup, speedup vs the plain backbone and
    realized/ideal efficiency (medians of per-repeat ratios), throughput, per-call latency
    percentiles of the exit pass, the standalone latency of every stage on a full batch, reach
    counts and the per-boundary overhead. Independent of the batch size: the exit histogram and
    the theoretical speedup from the bundle's MAC costs.

    ``compare``: other runtimes of the same bundle by label (e.g. other backend settings); each
    one's exit pass is timed next to ``rt``'s in every repeat, on the same batches, and reported
    as ``batches[B]["compare"][label]`` (ms per sample, speedup over ``rt`` with its interval,
    whether its exits are the same), with the fastest per batch size in ``best_settings``.
    """
    say = progress or (lambda msg: None)
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    x = np.asarray(x)
    if len(x) == 0:
        raise InputError("no samples to profile", hint="give input files or --data")
    if offsets is not None:
        offsets = tuple(float(o) for o in offsets)
    m = rt.manifest
    cost = np.asarray(m.exits.cost, dtype=np.float64)
    cost_plain = np.asarray(m.exits.cost_vs_plain, dtype=np.float64)
    n_all = len(x) if samples is None else min(int(samples), len(x))
    say(f"exit pass over {n_all} samples")
    res = rt.run(x[:n_all], offsets=offsets)
    hist = res.exit_histogram(rt.num_exits)
    mean_cost = float(cost[res.exit_index].mean())
    mean_cost_plain = float(cost_plain[res.exit_index].mean())
    out: Dict[str, Any] = {
        "bundle": str(rt.bundle.path), "device": rt.device, "stages": rt.bundle.num_stages,
        "samples": int(n_all), "repeats": int(repeats), "offsets": list(offsets) if offsets else None,
        "offsets_used": rt.offsets_label(offsets),
        "settings": settings_record(rt),
        "exits": {"histogram": hist, "fraction": [h / n_all for h in hist], "cost": cost.tolist(),
                  "cost_vs_plain": cost_plain.tolist(), "mean_cost": mean_cost,
                  "mean_cost_vs_plain": mean_cost_plain,
                  # what counted MACs promise: full-model MACs / mean MACs spent per sample
                  "theoretical_speedup": theoretical_speedup(cost, res.exit_index),
                  "theoretical_speedup_vs_plain": theoretical_speedup(cost_plain, res.exit_index)},
        "batches": {},
    }
    if y is not None:
        y = np.asarray(y)[:n_all]
        full = rt.run(x[:n_all], mode="full")
        out["accuracy"] = {"exit": float(np.mean(res.pred == y)), "full": float(np.mean(full.pred == y))}
    for bsz in batch_sizes:
        if bsz < 1:
            raise InputError(f"batch sizes must be >= 1, got {bsz}")
        say(f"batch {bsz}: timing exit, full, plain and ideal passes ({repeats} repeats)"
            + (f", and {len(compare)} other setting(s) side by side" if compare else ""))
        rivals = {label: (lambda b, _r=other: _r.run(b, offsets=offsets)) for label, other in (compare or {}).items()}
        p = Passes.for_runtime(rt, bsz, rivals=rivals)
        xs = p.batches(x, bsz, n_all)
        reaches = p.reaches(xs, offsets)
        boundaries = p.boundaries(reaches)
        t = interleaved([p], xs, [reaches], repeats, offsets, warmup=2 if bsz == 1 else 1, per_call=True)[0]
        # standalone latency of every stage on a full batch (buffers primed with valid rows)
        p.prime(xs[0])
        stage_ms = []
        for k in range(p.num_stages):
            ts = [p.stage_time(k, bsz) for _ in range(max(5, repeats) * (5 if bsz <= 8 else 1))]
            stage_ms.append(1e3 * median(ts))
        rows = len(xs) * bsz
        te, tf, ti = median(t["exit"]), median(t["full"]), median(t["ideal"])
        entry = {
            "batches": len(xs), "samples": rows, "boundaries": boundaries,
            "reach_total": p.reach_total(reaches),
            "exit_ms_per_sample": 1e3 * te / rows, "full_ms_per_sample": 1e3 * tf / rows,
            "ideal_ms_per_sample": 1e3 * ti / rows,
            "throughput_exit": rows / te, "throughput_full": rows / tf,
            "realized_speedup": median_ratio(t["full"], t["exit"]), "efficiency": median_ratio(t["ideal"], t["exit"]),
            # how far the medians can be trusted on this machine (order-statistic intervals)
            "efficiency_ci": median_ci(ratios(t["ideal"], t["exit"])),
            "realized_speedup_ci": median_ci(ratios(t["full"], t["exit"])),
            "overhead_us_per_boundary": 1e6 * (te - ti) / max(boundaries, 1),
            "latency_ms_per_call": _percentiles(t["calls"]),
            "stage_ms": stage_ms,  # stage k alone on bsz rows
        }
        if t["plain"]:
            tp = median(t["plain"])
            entry.update({"plain_ms_per_sample": 1e3 * tp / rows, "throughput_plain": rows / tp,
                          "speedup_vs_plain": median_ratio(t["plain"], t["exit"]),
                          "speedup_vs_plain_ci": median_ci(ratios(t["plain"], t["exit"]))})
        if compare:
            ref = np.concatenate([rt.run(b, offsets=offsets).exit_index for b in xs])
            entry["compare"] = {
                label: {"ms_per_sample": 1e3 * median(t[label]) / rows,
                        "speedup": median_ratio(t["exit"], t[label]),  # > 1: faster than rt's settings
                        "speedup_ci": median_ci(ratios(t["exit"], t[label])),
                        "same_exits": bool(np.array_equal(
                            ref, np.concatenate([other.run(b, offsets=offsets).exit_index for b in xs])))}
                for label, other in compare.items()}
        out["batches"][str(bsz)] = entry
    if compare:
        out["compare_settings"] = {label: settings_record(other) for label, other in compare.items()}
        out["best_settings"] = {bsz: best_settings(b) for bsz, b in out["batches"].items()}
    return out


def best_settings(entry: Dict[str, Any]) -> Dict[str, Any]:
    """The fastest settings of one batch size's entry: a compared label whose whole interval of
    speedup lies above 1 (the largest median among those), else the runtime's own (``"current"``)."""
    best, speed = "current", 1.0
    for label, c in (entry.get("compare") or {}).items():
        ci = c.get("speedup_ci")
        if ci and ratio_verdict(ci) == "faster" and c["speedup"] > speed:
            best, speed = label, c["speedup"]
    return {"label": best, "speedup": speed}


def settings_record(rt) -> Dict[str, Any]:
    """The runtime's backend and settings as a JSON-ready dict (empty without settings)."""
    import dataclasses

    return {"backend": rt.backend, **dataclasses.asdict(rt.settings)} if rt.settings is not None else {}


def measure_energy(rt, x: np.ndarray, batch_sizes: Sequence[int], sampler, seconds: float = 2.0,
                   idle_seconds: float = 1.0, offsets=None, samples: Optional[int] = None,
                   progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Energy per inference of the exit, full and plain passes (``jei_edge.profile.power``).

    For each batch size and pass: idle power over ``idle_seconds`` of doing nothing, then the pass
    repeated for at least ``seconds`` (the sampler needs several readings), and
    ``(mean power during it - idle power) x time / samples``. The sampler must be running.

    Returns:
        ``{"batches": {"B": {"exit": {...}, "full": {...}, "plain": {...}}}, "exit_vs_full": ...}``.
    """
    from jei_edge.profile.power import energy_per_inference, measure_idle

    say = progress or (lambda msg: None)
    out: Dict[str, Any] = {"batches": {}}
    for bsz in batch_sizes:
        p = Passes.for_runtime(rt, bsz)
        xs = p.batches(x, bsz, samples)
        rows = len(xs) * bsz
        modes = {"exit": lambda: p.exit_pass(xs, offsets), "full": lambda: p.full_pass(xs)}
        if p.plain is not None:
            modes["plain"] = lambda: p.plain_pass(xs)
        entry = {}
        for mode, run in modes.items():
            say(f"power: batch {bsz}, {mode} passes for {seconds:g} s after {idle_seconds:g} s idle")
            run()  # warm
            idle = measure_idle(sampler, idle_seconds)
            t0, n = p._clock(), 0
            while True:
                run()
                n += rows
                t1 = p._clock()
                if t1 - t0 >= seconds:
                    break
            active = sampler.window(t0, t1)
            ok = active.total_mw is not None and idle.total_mw is not None
            entry[mode] = {"mj_per_inference": energy_per_inference(active.total_mw, idle.total_mw, t1 - t0, n)
                           if ok else None, "mean_mw": active.total_mw, "idle_mw": idle.total_mw,
                           "seconds": t1 - t0, "inferences": n, "power_samples": active.samples,
                           "note": "" if ok else (active.note or idle.note or "no total power rail")}
        e = {m: v["mj_per_inference"] for m, v in entry.items()}
        if e.get("exit") and e.get("full"):
            entry["energy_saved_vs_full"] = 1.0 - e["exit"] / e["full"]
        if e.get("exit") and e.get("plain"):
            entry["energy_vs_plain"] = e["exit"] / e["plain"]
        out["batches"][str(bsz)] = entry
    return out
