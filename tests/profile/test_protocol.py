"""``jei_edge.profile``'s timing protocol, the one ``benchmarks/`` imports: interleaved repeats,
device synchronisation around every clock reading, and the per-step ``Breakdown`` of ``Runtime.run``."""

from types import SimpleNamespace

import numpy as np
import pytest

from jei_edge.errors import InputError
from jei_edge.profile import Breakdown, Passes, interleaved, median, median_ratio, median_time
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
