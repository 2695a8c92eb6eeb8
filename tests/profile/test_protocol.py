"""``jei_edge.profile``'s timing protocol, the one ``benchmarks/`` imports: interleaved repeats,
device synchronisation around every clock reading, and the per-step ``Breakdown`` of ``Runtime.run``."""

from types import SimpleNamespace

import numpy as np
import pytest

from jei_edge.errors import InputError
from jei_edge.profile import (Breakdown, Passes, interleaved, median, median_ci, median_ratio, median_time,
                              ratio_verdict, ratios)
from jei_edge.profile.measure import TimedWorkspace
from jei_edge.runtime import Runtime
from tests.runtime.helpers import model_inputs


def test_interleaved_times_every_pass_of_every_runtime(bundle):
    rts = [Runtime.load(bundle, max_batch=4), Runtime.load(bundle, max_batch=4)]
    passes = [Passes.for_runtime(rt, 4) for rt in rts]
    xs = Passes.batches(model_inputs(16, seed=5), 4)
    reaches = [p.reaches(xs) for p in passes]
    seen = []
    out = interleaved(passes, xs, reaches, 3, per_call=True, each_repeat=seen.append)
    assert seen == [0, 1, 2] and len(out) == 2
    for t in out:
        assert all(len(t[m]) == 3 and min(t[m]) > 0 for m in ("exit", "ideal", "full", "plain"))
        assert len(t["calls"]) == 3 * len(xs)
    with pytest.raises(InputError, match="repeats must be >= 1"):
        interleaved(passes, xs, reaches, 0)


def test_rivals_are_timed_next_to_the_exit_pass_in_alternating_order(bundle):
    rt = Runtime.load(bundle, max_batch=4)
    xs = Passes.batches(model_inputs(8, seed=7), 4)
    order = []
    p = Passes.for_runtime(rt, 4, rivals={"hand": lambda b: order.append("hand"), "other": lambda b: order.append("other")})
    run, ideal = rt.run, p.ideal_pass

    def logged_run(b, **kw):
        order.append("exit" if kw.get("mode", "exit") == "exit" else "full")
        return run(b, **kw)

    def logged_ideal(xs_, reaches):
        order.append("ideal")
        return ideal(xs_, reaches)

    rt.run, p.ideal_pass = logged_run, logged_ideal
    reaches = p.reaches(xs)
    order.clear()
    for i in range(2):
        t = p.repeat(i, xs, reaches)
        assert set(t) == {"ideal", "exit", "hand", "other", "full", "plain"} and min(t.values()) > 0
    once = lambda seq: [s for j, s in enumerate(seq) if j == 0 or seq[j - 1] != s]  # noqa: E731
    # "full" before "ideal": ``prime`` (a full-mode run filling the buffers)
    assert once(order) == ["full", "ideal", "exit", "hand", "other", "full",
                           "other", "hand", "exit", "full", "ideal", "full"]
    out = interleaved([p], xs, [reaches], 3)[0]
    assert len(out["hand"]) == len(out["other"]) == 3
    with pytest.raises(ValueError, match="taken by the passes"):
        Passes(rt, rivals={"exit": print})


def test_median_ci_is_the_order_statistic_interval():
    # n = 7: j = 1 is the only interval with >= 95% (98.4%); j = 2 covers 87.5%
    ci = median_ci([5, 1, 7, 3, 2, 6, 4])
    assert (ci["median"], ci["low"], ci["high"]) == (4.0, 1.0, 7.0) and ci["coverage"] == pytest.approx(1 - 2 / 128)
    assert median_ci([5, 1, 7, 3, 2, 6, 4], level=0.8)["low"] == 2.0
    # n = 21: j = 6 (coverage 97.3%; j = 7 would be 92.2%)
    ci = median_ci(np.arange(21.0))
    assert (ci["low"], ci["high"]) == (5.0, 15.0) and 0.95 <= ci["coverage"] < 0.98
    # too few values for 95%: min-max with its real coverage
    ci = median_ci([1.0, 3.0, 2.0])
    assert (ci["low"], ci["high"], ci["coverage"]) == (1.0, 3.0, 0.75)
    assert ratio_verdict(median_ci([1.02, 1.05, 1.1])) == "faster"
    assert ratio_verdict(median_ci([0.9, 0.95, 0.97])) == "slower"
    assert ratio_verdict(median_ci([0.9, 1.05, 1.0])) == "parity"
    assert ratios([2, 6], [1, 3]).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError):
        median_ci([])


def test_summaries():
    assert median([3, 1, 2]) == 2.0
    assert median_ratio([2, 4, 9], [1, 1, 3]) == 3.0
    calls = []
    assert median_time(lambda: calls.append(1), 4, sync=lambda: calls.append(0), warmup=2) >= 0
    assert calls.count(1) == 6 and calls.count(0) == 8


def test_passes_synchronise_the_device_around_each_clock_reading(bundle):
    rt = Runtime.load(bundle, max_batch=4)
    syncs = []

    class Counting(TimedWorkspace):
        def synchronize(self):
            syncs.append(1)

    ws = Counting(rt.workspace, {})
    p = Passes(SimpleNamespace(executor=rt.executor, workspace=ws, bundle=rt.bundle, run=rt.run, manifest=rt.manifest))
    xs = Passes.batches(model_inputs(8, seed=6), 4)
    p.ideal_pass(xs, p.reaches(xs))
    assert len(syncs) == 2  # before the start and before the end of the clock
    p.prime(xs[0])
    p.stage_time(1, 4)
    p.exit_pass(xs, per_call=[])
    assert len(syncs) == 2 + 2 + 2 * len(xs)


def test_breakdown_times_the_runtime_s_own_steps(bundle):
    rt = Runtime.load(bundle, max_batch=4)
    p = Passes.for_runtime(rt, 4)
    xs = Passes.batches(model_inputs(16, seed=7), 4)
    reaches = p.reaches(xs)
    bd = Breakdown(rt)
    for b in xs:
        got, want = bd.run(b), rt.run(b)
        assert np.array_equal(got.exit_index, want.exit_index) and np.array_equal(got.probs, want.probs)
    t = bd.times
    assert len(t["begin"]) == len(t["collect"]) == len(t["stage_0"]) == len(xs)
    assert len(t["boundary"]) == p.boundaries(reaches)
    assert len(t.get("finish", [])) == sum(len(r) == p.num_stages for r in reaches)
    assert [len(t.get(f"stage_{k}", [])) for k in range(p.num_stages)] == [sum(len(r) > k for r in reaches)
                                                                          for k in range(p.num_stages)]
    assert bd.mean("boundary") > 0 and bd.mean("nothing") == 0.0
    assert rt.run(xs[0]).reach == reaches[0]  # the runtime itself is untouched
