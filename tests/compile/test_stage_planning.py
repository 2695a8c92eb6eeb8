"""Stage planning: merged stages keep every decision of the unmerged model; the planner is optimal."""

import itertools
import json

import numpy as np
import pytest

from jei_edge.compile import BuildOptions, build_bundle
from jei_edge.compile.plan import parse_groups
from jei_edge.compile.planning import PIPELINE_ROUNDS, best_groups, expected_seconds
from jei_edge.errors import BuildError, InputError
from jei_edge.runtime import Runtime
from tests.runtime.helpers import model_inputs, reference, save_spread


def test_parse_groups():
    assert parse_groups("0-2,3,4", 5) == [(0, 1, 2), (3,), (4,)]
    assert parse_groups("0-4", 5) == [(0, 1, 2, 3, 4)]
    for bad in ("0-2,4", "1-4", "0-2,2-4", "0,1,2,3", "0-a,5", "3-1,4"):
        with pytest.raises(InputError, match="stage plan"):
            parse_groups(bad, 5)


def _all_groupings(n):
    for cuts in itertools.product([False, True], repeat=n - 1):
        groups, cur = [], [0]
        for i, cut in enumerate(cuts, start=1):
            if cut:
                groups.append(tuple(cur))
                cur = []
            cur.append(i)
        groups.append(tuple(cur))
        yield groups


@pytest.mark.parametrize("seed", range(20))
def test_dynamic_programme_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    reach = np.concatenate([[1.0], np.sort(rng.random(n - 1))[::-1]])
    unit = rng.uniform(0.5, 2.0, n)
    times = {(a, b): float(unit[a:b + 1].sum() * rng.uniform(0.6, 1.0) + rng.uniform(0, 0.5))
             for a in range(n) for b in range(a, n)}
    boundary = float(rng.uniform(0, 0.3))
    groups, cost = best_groups(reach, times, boundary)
    brute = min(expected_seconds(g, reach, times, boundary) for g in _all_groupings(n))
    assert cost == pytest.approx(brute) and expected_seconds(groups, reach, times, boundary) == pytest.approx(cost)
    assert [e for g in groups for e in g] == list(range(n))


def test_a_merge_is_kept_only_when_measured_faster_with_confidence():
    from jei_edge.compile.planning import confident_choice

    rng = np.random.default_rng(0)
    every = list(1.0 + 0.01 * rng.standard_normal(16))
    sure = [e * 0.9 for e in every]  # 10% faster in every round
    noisy = [e * f for e, f in zip(every, 0.97 + 0.12 * rng.standard_normal(16))]  # faster median, overlapping
    assert np.median([e / v for e, v in zip(every, noisy)]) > 1.0
    key, gain = confident_choice({"every": every, "merged": sure}, "every")
    assert key == "merged" and gain["low"] > 1.0 and gain["median"] == pytest.approx(1 / 0.9)
    key, gain = confident_choice({"every": every, "merged": noisy}, "every")
    assert key == "every" and gain["median"] == 1.0
    faster = [e * 0.8 for e in every]
    assert confident_choice({"every": every, "a": sure, "b": faster}, "every")[0] == "b"
    assert confident_choice({"every": every, "a": noisy, "b": sure}, "every")[0] == "b"


@pytest.fixture(scope="module", params=["vit", "resnet"])
def family_model(request, tmp_path_factory):
    from jei_edge.model.checkpoint import load_checkpoint

    tmp = tmp_path_factory.mktemp(f"plan_{request.param}")
    ckpt = save_spread(tmp / "m.pt", request.param)
    model, _ = load_checkpoint(ckpt)
    return request.param, ckpt, model, tmp


def _plans(n):
    last = n - 1
    return [f"0-{last}", f"0-1,2-{last}", "0," + ",".join(str(i) for i in range(1, n - 2)) + f",{n - 2}-{last}",
            f"0-{last - 1},{last}"]


def test_merged_bundles_decide_exactly_like_the_model(family_model):
    fam, ckpt, model, tmp = family_model
    n = len(model.stage_ranges())
    x = model_inputs(200, seed=5)
    rng = np.random.default_rng(1)
    offsets = tuple(float(v) for v in rng.uniform(-0.15, 0.15, n - 1))
    for i, plan in enumerate(_plans(n)):
        out = tmp / f"m{i}.jei"
        rep = build_bundle(ckpt, out, BuildOptions(parity_samples=1000, stage_samples=64, plan=plan))
        groups = parse_groups(plan, n)
        assert rep["plan"]["groups"] == [list(g) for g in groups] and rep["num_stages"] == len(groups)
        manifest = json.loads((out / "manifest.json").read_text())
        assert [st["exits"] for st in manifest["stages"]] == [list(g) for g in groups]
        rt = Runtime.load(out, max_batch=16)
        for offs in (None, offsets):
            levels, probs, all_probs = reference(model, x, offs)
            for bs in (1, 5, 16, 200):  # 200 > max_batch: chunks
                parts = [rt.run(x[j:j + bs], offsets=offs) for j in range(0, len(x), bs)]
                got = np.concatenate([p.exit_index for p in parts])
                assert np.array_equal(got, levels), (plan, offs, bs)
                assert np.abs(np.concatenate([p.probs for p in parts]) - probs).max() < 1e-5
            # rows reach a stage only if no earlier stage's gates took them
            reach = rt.run(x, offsets=offs).reach
            starts = [g[0] for g in groups]
            assert reach[:len(reach)] == [int((levels >= s).sum()) for s in starts][:len(reach)]
        full = rt.run(x, mode="full")
        assert (full.exit_index == n - 1).all() and np.abs(full.probs - all_probs[:, -1]).max() < 1e-5
        one = rt.run(x[:1], mode="full")
        assert one.exit_index.tolist() == [n - 1]


def test_merged_first_stage_keeps_the_input_guard(family_model):
    fam, ckpt, model, tmp = family_model
    n = len(model.stage_ranges())
    out = tmp / "guard.jei"
    build_bundle(ckpt, out, BuildOptions(parity_samples=500, stage_samples=64, plan=f"0-1,2-{n - 1}"))
    rt = Runtime.load(out, max_batch=4)
    assert rt.workspace.input_guard
    x = model_inputs(9, seed=2)
    x[4, 0, 0, 0], x[8, 0, 7, 7] = np.nan, -np.inf
    for mode in ("exit", "full"):
        with pytest.raises(InputError, match=r"rows 4, 8\)"):
            rt.run(x, mode=mode)
        with pytest.raises(InputError, match=r"rows 0\)"):
            rt.run(x[4:5], mode=mode)


def test_boundary_cost_is_what_the_pipeline_spends_beyond_its_stages():
    from jei_edge.compile.planning import boundary_seconds

    times = {(0, 0): 0.002, (1, 1): 0.004, (2, 2): 0.001}
    reach = [1.0, 0.5, 0.25]
    alone = 0.002 + 0.5 * 0.004 + 0.25 * 0.001
    for batch, extra in ((1, 30e-6), (8, 120e-6)):
        per_row = (alone + sum(reach) * extra) / batch  # the pipeline's measured seconds per input row
        got = boundary_seconds({"seconds_per_row": per_row, "reach": reach}, times, batch)
        assert got == pytest.approx(extra, rel=1e-9)
        assert expected_seconds([(0,), (1,), (2,)], np.array(reach), times, got) == pytest.approx(per_row * batch)
    # a pipeline measured faster than its stages alone (noise) gives no negative cost
    assert boundary_seconds({"seconds_per_row": 0.001, "reach": reach}, times, 1) == 0.0


def test_auto_plan(family_model):
    fam, ckpt, model, tmp = family_model
    n = len(model.stage_ranges())
    out = tmp / "auto.jei"
    rep = build_bundle(ckpt, out, BuildOptions(parity_samples=500, stage_samples=64, plan="auto",
                                               data="synthetic:size=8,n=300,classes=5"))
    plan = rep["plan"]
    assert plan["mode"] == "auto" and [e for g in plan["groups"] for e in g] == list(range(n))
    assert len(plan["span_ms"]) == n * (n + 1) // 2 and plan["reach"][0] == 1.0
    # a grouping other than a stage per exit is kept only when measured faster with confidence
    if plan["groups"] == [[k] for k in range(n)]:
        assert plan["expected_ms_per_sample"] == plan["expected_ms_per_sample_every_exit"]
        assert plan["choice"].startswith("a stage per exit")
    else:
        assert plan["expected_speedup_ci"]["low"] > 1.0 and plan["choice"].startswith("measured faster")
        assert plan["expected_ms_per_sample"] <= plan["expected_ms_per_sample_every_exit"]
    assert not any(p.name.startswith(".planning") for p in out.rglob("*"))
    # the expected gain: the median of per-round ratios every-exit / chosen, inside its interval
    ci = plan["expected_speedup_ci"]
    assert plan["pipeline_rounds"] == PIPELINE_ROUNDS and ci["coverage"] >= 0.95
    assert ci["low"] <= plan["expected_speedup_over_every_exit"] == ci["median"] <= ci["high"]
    if plan["groups"] == [[k] for k in range(n)]:
        assert plan["expected_speedup_over_every_exit"] == 1.0
    from jei_edge.runtime.inspect import describe_bundle, format_bundle

    assert f"({plan['expected_speedup_over_every_exit']:.3f}x, 95% CI [" in format_bundle(describe_bundle(out))
    # the boundary cost is measured on the stage-per-exit pipeline, so that plan's prediction is the
    # measured pipeline time: positive and plausible (a stage run costs more in the pipeline than alone)
    assert plan["boundary"].startswith("measured") and 0.0 <= plan["boundary_us"] < 5000
    assert rep["decisions"]["agreement"] == 1.0 or rep["decisions"]["disagreements_within_tie_band"] == \
        rep["decisions"]["disagreements"]
    with pytest.raises(BuildError, match="needs real inputs"):
        build_bundle(ckpt, tmp / "no_data.jei", BuildOptions(parity_samples=100, plan="auto"))
    assert not (tmp / "no_data.jei").exists()


def _edge_scale(g, side):
    """The scale a graph reads its quantized input with (``in``: the DequantizeLinear of the input,
    through its channels-last Transpose) or writes ``hidden_out`` with (``out``); None for a float edge."""
    import onnx

    inits = {t.name: t for t in g.initializer}
    if side == "in":
        names = {g.input[0].name}
        names |= {n.output[0] for n in g.node if n.op_type == "Transpose" and n.input[0] in names}
        node = next((n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in names), None)
    else:
        prod = {o: n for n in g.node for o in n.output}
        node = prod.get("hidden_out")
        if node is not None and node.op_type == "Transpose":
            node = prod.get(node.input[0])
        node = node if node is not None and node.op_type == "QuantizeLinear" else None
    return None if node is None else float(onnx.numpy_helper.to_array(inits[node.input[1]]))


def test_int8_build_plans_on_int8_candidates(tmp_path, monkeypatch):
    """``--plan auto --precision int8``: every candidate stage is timed as the build's INT8 graph
    (quantized with its recipe, calibrated on the rows reaching its first exit), the record says
    so, and the bundle's decisions are those of its merged INT8 stages run one row at a time."""
    import onnx

    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    seen, scales = [], {}
    # planning imports create_session when it builds the candidates: a spy on the executor module sees them
    from jei_edge.backends.onnxruntime import executor

    original = executor.create_session

    def spy(path, settings, what, built_with=None):
        if str(what).startswith("candidate stage"):
            g = onnx.load(str(path)).graph
            ops = {n.op_type for n in g.node}
            seen.append((what, "QuantizeLinear" in ops and "DequantizeLinear" in ops,
                         g.input[0].type.tensor_type.elem_type))
            a, b = (int(v) for v in str(what).split()[-1].split(".."))
            scales[(a, b)] = (_edge_scale(g, "in"), _edge_scale(g, "out"))
        return original(path, settings, what, built_with)

    monkeypatch.setattr(executor, "create_session", spy)
    out = tmp_path / "q.jei"
    rep = build_bundle(ckpt, out, BuildOptions(precision="int8", data="synthetic:size=8,n=300,classes=5",
                                               parity_samples=300, stage_samples=64, min_agreement=0.0, plan="auto"))
    n = 3  # the helper ResNet's exits
    assert len(seen) == n * (n + 1) // 2 and all(q for _, q, _ in seen), seen
    # with the build's stage edges: a candidate starting after exit 0 reads the uint8 edge (2), as the bundle will
    assert all((t == 2) == (not w.startswith("candidate stage 0.")) for w, _, t in seen), seen
    # an edge's integers mean the same on both sides: a candidate ending at exit b writes with the
    # scale every candidate starting at b + 1 reads with
    for (a, b), (_, out_scale) in scales.items():
        readers = {scales[(c, d)][0] for (c, d) in scales if c == b + 1}
        assert (out_scale is None) == (b == n - 1) and (b == n - 1 or readers == {out_scale}), (a, b, scales)
    plan = rep["plan"]
    assert plan["timed_as"].startswith("int8") and [e for g in plan["groups"] for e in g] == list(range(n))
    from jei_edge.runtime.inspect import describe_bundle, format_bundle

    assert "candidates timed as int8" in format_bundle(describe_bundle(out))
    with Runtime.load(out, max_batch=64) as rt:
        x = model_inputs(32, seed=4)
        res = rt.run(x)
        one = [rt.run(x[i:i + 1]) for i in range(32)]
    assert np.array_equal(res.exit_index, np.concatenate([r.exit_index for r in one]))
    # an FP32 build's candidates stay FP32 (the record says so)
    seen.clear()
    rep32 = build_bundle(ckpt, tmp_path / "f.jei", BuildOptions(data="synthetic:size=8,n=300,classes=5",
                                                                parity_samples=300, stage_samples=64, plan="auto"))
    assert rep32["plan"]["timed_as"] == "fp32" and seen and not any(q for _, q, _ in seen)


def test_build_command_reports_the_plan(family_model, capsys):
    from jei_edge.cli import main as cli_main

    fam, ckpt, model, tmp = family_model
    n = len(model.stage_ranges())
    rc = cli_main(["build", str(ckpt), "-o", str(tmp / "cli.jei"), "--parity-samples", "200", "--plan", f"0-1,2-{n - 1}"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    tail = f"2-{n - 1}" if n > 3 else "2"
    assert f"2 stages (exits 0-1, {tail})" in out
    rc = cli_main(["inspect", str(tmp / "cli.jei")])
    out, _ = capsys.readouterr()
    assert rc == 0 and "0-1" in out
    rc = cli_main(["build", str(ckpt), "-o", str(tmp / "bad.jei"), "--plan", "0-1,3"])
    _, err = capsys.readouterr()
    assert rc != 0 and "stage plan" in err and not (tmp / "bad.jei").exists()
