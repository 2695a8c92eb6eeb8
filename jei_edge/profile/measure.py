"""Timed passes of a loaded ``Runtime`` over a list of batches, with DESIGN.md's definitions.

``Passes`` is the one implementation of the measurements; ``profile_bundle`` (``jei-edge
profile``) and ``benchmarks/realized_speedup.py`` both use it:

- **exit** / **full** pass: ``Runtime.run`` on every batch, in ``exit`` or ``full`` mode (input
  check, decisions, compaction and result objects included);
- **ideal** pass: the very stage runs of the exit pass (stage k on the real reach count n_k of the
  same batch's data) back to back, without decisions or compaction: the sum of t_k(n_k) with the
  same executor, buffers and session settings;
- **plain** pass: the plain backbone (one graph, no IMs, no gates) on the same batches, with the
  runtime's session settings;
- **stage** time: stage k alone on m rows (standalone t_k(m)).

Torch-free: needs only the runtime (numpy + the bundle's backend).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from jei_edge.errors import InputError


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


class Passes:
    """Timing primitives over one runtime (see the module docstring)."""

    def __init__(self, rt, plain: Optional[Any] = None):
        self.rt = rt
        self.ex = rt.executor
        self.ws = rt.workspace
        self.num_stages = rt.bundle.num_stages
        self.plain = plain  # an onnxruntime session of the plain backbone (or None)

    @classmethod
    def for_runtime(cls, rt, batch_size: Optional[int] = None) -> "Passes":
        """With the bundle's plain backbone on the runtime's settings (CPU runtimes only; the
        small-batch settings when ``batch_size`` is small enough for them, as the stages do)."""
        plain = None
        entry = rt.manifest.plain
        if entry is not None and rt.backend == "onnxruntime":
            from jei_edge.backends.onnxruntime.executor import create_session

            settings = rt.executor.settings
            small = settings.small_batch
            use = small if small is not None and batch_size is not None and batch_size <= settings.small_batch_rows \
                else settings
            plain = create_session(rt.bundle.file(entry.file), use, "plain backbone", built_with=rt.manifest.toolchain)
        return cls(rt, plain)

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

    def prime(self, batch: np.ndarray) -> None:
        """Fill every stage's buffers with valid rows (a full pass over ``batch``) for standalone stage runs."""
        ws, ex = self.ws, self.ex
        n = ws.begin(batch)
        for k in range(self.num_stages):
            ex.execute(k, n, ws)
            if k < self.num_stages - 1:
                ws.exit_and_compact(k, n, 0.0, False)

    def exit_pass(self, xs, offsets=None, per_call: Optional[list] = None) -> float:
        run = self.rt.run
        if per_call is None:
            t = time.perf_counter()
            for b in xs:
                run(b, offsets=offsets)
            return time.perf_counter() - t
        total = 0.0
        for b in xs:
            t = time.perf_counter()
            run(b, offsets=offsets)
            dt = time.perf_counter() - t
            per_call.append(dt)
            total += dt
        return total

    def full_pass(self, xs) -> float:
        run = self.rt.run
        t = time.perf_counter()
        for b in xs:
            run(b, mode="full")
        return time.perf_counter() - t

    def ideal_pass(self, xs, reaches) -> float:
        # begin() only points stage 0 at the batch (and resets S); every later stage reads the
        # rows the previous stage left in its buffer
        ws, ex = self.ws, self.ex
        t = time.perf_counter()
        for b, r in zip(xs, reaches):
            ws.begin(b)
            for k, m in enumerate(r):
                ex.execute(k, m, ws)
        return time.perf_counter() - t

    def plain_pass(self, xs) -> float:
        if self.plain is None:
            raise RuntimeError("no plain-backbone session")
        run = self.plain.run
        t = time.perf_counter()
        for b in xs:
            run(["probs"], {"x": b})
        return time.perf_counter() - t

    def stage_time(self, k: int, m: int) -> float:
        """One standalone run of stage ``k`` on ``m`` rows of its (primed) input buffer."""
        t = time.perf_counter()
        self.ex.execute(k, m, self.ws)
        return time.perf_counter() - t


def _percentiles(seconds: Sequence[float]) -> Dict[str, float]:
    a = 1e3 * np.asarray(seconds, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def profile_bundle(rt, x: np.ndarray, y: Optional[np.ndarray] = None, batch_sizes: Sequence[int] = (1, 64),
                   repeats: int = 7, samples: Optional[int] = None, offsets=None,
                   progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Profile a loaded runtime on model inputs ``x`` (``[N, C, H, W]``, preprocessed).

    For each batch size: exit / full / plain / ideal time per sample (medians over ``repeats``
    interleaved repeats; exit and ideal side by side in alternating order), realized speedup,
    speedup vs the plain backbone and realized/ideal efficiency (medians of per-repeat ratios),
    throughput, per-call latency percentiles of the exit pass, the standalone latency of every
    stage on a full batch, reach counts and the per-boundary overhead. Independent of the batch
    size: the exit histogram and the theoretical speedup from the bundle's MAC costs.
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
        "settings": _settings(rt),
        "exits": {"histogram": hist, "fraction": [h / n_all for h in hist], "cost": cost.tolist(),
                  "cost_vs_plain": cost_plain.tolist(), "mean_cost": mean_cost,
                  "mean_cost_vs_plain": mean_cost_plain,
                  # what counted MACs promise: full-model MACs / mean MACs spent per sample
                  "theoretical_speedup": 1.0 / mean_cost, "theoretical_speedup_vs_plain": 1.0 / mean_cost_plain},
        "batches": {},
    }
    if y is not None:
        y = np.asarray(y)[:n_all]
        full = rt.run(x[:n_all], mode="full")
        out["accuracy"] = {"exit": float(np.mean(res.pred == y)), "full": float(np.mean(full.pred == y))}
    for bsz in batch_sizes:
        if bsz < 1:
            raise InputError(f"batch sizes must be >= 1, got {bsz}")
        say(f"batch {bsz}: timing exit, full, plain and ideal passes ({repeats} repeats)")
        p = Passes.for_runtime(rt, bsz)
        xs = p.batches(x, bsz, n_all)
        reaches = p.reaches(xs, offsets)
        boundaries = sum(len(r) - (1 if len(r) == p.num_stages else 0) for r in reaches)
        for _ in range(2 if bsz == 1 else 1):  # warm-up
            p.exit_pass(xs, offsets), p.full_pass(xs)
            if p.plain is not None:
                p.plain_pass(xs)
        t = {"exit": [], "full": [], "ideal": [], "plain": []}
        calls: List[float] = []
        for i in range(repeats):
            p.prime(xs[0])
            if i % 2 == 0:
                t["ideal"].append(p.ideal_pass(xs, reaches))
                t["exit"].append(p.exit_pass(xs, offsets, per_call=calls))
            else:
                t["exit"].append(p.exit_pass(xs, offsets, per_call=calls))
                p.prime(xs[0])
                t["ideal"].append(p.ideal_pass(xs, reaches))
            t["full"].append(p.full_pass(xs))
            if p.plain is not None:
                t["plain"].append(p.plain_pass(xs))
        # standalone latency of every stage on a full batch (buffers primed with valid rows)
        p.prime(xs[0])
        stage_ms = []
        for k in range(p.num_stages):
            ts = [p.stage_time(k, bsz) for _ in range(max(5, repeats) * (5 if bsz <= 8 else 1))]
            stage_ms.append(1e3 * median(ts))
        rows = len(xs) * bsz

        def ratio(a, b):
            return median(np.asarray(t[a]) / np.asarray(t[b]))

        te, tf, ti = median(t["exit"]), median(t["full"]), median(t["ideal"])
        reach_total = np.sum([r + [0] * (p.num_stages - len(r)) for r in reaches], axis=0)
        entry = {
            "batches": len(xs), "samples": rows, "boundaries": int(boundaries),
            "reach_total": [int(v) for v in reach_total],
            "exit_ms_per_sample": 1e3 * te / rows, "full_ms_per_sample": 1e3 * tf / rows,
            "ideal_ms_per_sample": 1e3 * ti / rows,
            "throughput_exit": rows / te, "throughput_full": rows / tf,
            "realized_speedup": ratio("full", "exit"), "efficiency": ratio("ideal", "exit"),
            "overhead_us_per_boundary": 1e6 * (te - ti) / max(boundaries, 1),
            "latency_ms_per_call": _percentiles(calls),
            "stage_ms": stage_ms,  # stage k alone on bsz rows
        }
        if t["plain"]:
            tp = median(t["plain"])
            entry.update({"plain_ms_per_sample": 1e3 * tp / rows, "throughput_plain": rows / tp,
                          "speedup_vs_plain": ratio("plain", "exit")})
        out["batches"][str(bsz)] = entry
    return out


def _settings(rt) -> Dict[str, Any]:
    import dataclasses

    return {"backend": rt.backend, **dataclasses.asdict(rt.settings)} if rt.settings is not None else {}
