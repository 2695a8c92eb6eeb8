"""INT8 builds: exit-aware calibration, Q/DQ only in the backbone, the input guard intact, clear errors."""

import json
import re
import shutil

import numpy as np
import pytest

from jei_edge.bundle import MANIFEST, Bundle
from jei_edge.compile import BuildOptions, build_bundle, verify_bundle
from jei_edge.compile.quantize import (
    MIN_ROWS,
    Recipe,
    dequantize_rows,
    load_recipe,
    minmax_params,
    quantize_graph,
    quantize_rows,
    stage_inputs,
)
from jei_edge.errors import BuildError, InputError
from jei_edge.runtime import Runtime
from tests.runtime.helpers import model_inputs, save_spread

DATA = "synthetic:size=8,n=600,classes=5"
# exit-decision agreement of these untrained spread models' INT8 bundles with FP32 (measured: ViT
# 0.593, ResNet 0.943; the ViT's gates sit close to their thresholds by construction)
AGREEMENT_FLOOR = {"vit": 0.5, "resnet": 0.85}


@pytest.fixture(scope="module", params=["vit", "resnet"])
def int8_bundle(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"int8_{request.param}")
    ckpt = save_spread(tmp / "m.pt", request.param)
    out = tmp / "m8.jei"
    # an untrained spread model: agreement is reported, not required, here. The ResNet's edges are
    # quantized by default (its blocks start with convolutions); the ViT's only when asked for (all
    # edges: minmax parameters, LayerNorm and the residual Add read the dequantized edge)
    report = build_bundle(ckpt, out, BuildOptions(precision="int8", data=DATA, parity_samples=600, stage_samples=64,
                                                  min_agreement=0.0, quantized_edges=request.param == "vit" or None))
    return request.param, ckpt, out, report


def _graph(path):
    import onnx

    return onnx.load(str(path)).graph


def test_int8_bundle_is_quantized_in_the_backbone_only(int8_bundle):
    fam, _, out, report = int8_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["quantization"]["method"] == "minmax"
    for st in manifest["stages"] + [manifest["plain"]]:
        g = _graph(out / st["file"])
        ops = [n.op_type for n in g.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops, st["file"]
        # the IM may read the dequantized edge (what the next stage reads), nothing else quantized
        dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"} - {"hidden_out_dequantized"}
        for n in g.node:  # IMs, gates and the guard read FP32 tensors only
            if n.name.startswith(("/outs.", "/gates.", "/head", "/Flatten", "/ReduceSum")):
                assert not set(n.input) & dq_out, (st["file"], n.name)
    d = report["decisions"]
    assert d["min_agreement"] == manifest["quantization"]["min_agreement"] == 0.0  # the floor verify applies
    assert d["agreement"] == pytest.approx(1 - d["disagreements"] / d["samples"]) and d["rate_bound"]["k"] == d["disagreements"]
    assert d["agreement"] >= AGREEMENT_FLOOR[fam], d
    assert "int8" in (out / "report.txt").read_text()
    again = verify_bundle(out)["decisions"]  # the stored references reproduce the build's check
    assert again["agreement"] == d["agreement"] and again["min_agreement"] == 0.0


def test_int8_runtime_runs_and_keeps_the_input_guard(int8_bundle):
    _, _, out, _ = int8_bundle
    rt = Runtime.load(out)
    assert rt.workspace.input_guard
    x = model_inputs(12, seed=4)
    res = rt.run(x)
    assert res.probs.shape == (12, 5) and np.allclose(res.probs.sum(1), 1, atol=1e-5)
    x[3, 0, 0, 0], x[9, 0, 7, 7] = np.nan, np.inf
    with pytest.raises(InputError, match=r"rows 3, 9\)"):
        rt.run(x)


def test_calibration_is_exit_aware(tmp_path):
    from jei_edge.compile.plan import plan_stages
    from jei_edge.model.checkpoint import load_checkpoint
    from jei_edge.model.costs import count_costs
    from tests.runtime.helpers import reference

    model, _ = load_checkpoint(save_spread(tmp_path / "m.pt", "vit"))
    plans = plan_stages(model, count_costs(model).to_dict())
    x = model_inputs(400, seed=9)
    inputs, reach, levels = stage_inputs(model, x, plans)
    ref_levels, _, _ = reference(model, x)
    assert np.array_equal(levels, ref_levels)
    assert reach == [int((levels >= p.exits[0]).sum()) for p in plans]
    for rows, n in zip(inputs, reach):
        assert len(rows) == (n if n >= MIN_ROWS else len(x))
    assert reach[0] == 400 and reach[-1] < 400  # later stages see only the rows that reach them


def test_int8_errors(tmp_path):
    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    with pytest.raises(BuildError, match="INT8 needs calibration data"):
        build_bundle(ckpt, tmp_path / "a.jei", BuildOptions(precision="int8"))
    with pytest.raises(InputError, match="calibration recipe 'nope' not found"):
        build_bundle(ckpt, tmp_path / "a.jei", BuildOptions(precision="int8", data=DATA, calibration="nope"))
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "magic"\n')
    with pytest.raises(InputError, match="method must be one of"):
        load_recipe(str(bad))
    bad.write_text('samples = 10\ncolour = "red"\n')
    with pytest.raises(InputError, match="unknown keys"):
        load_recipe(str(bad))
    with pytest.raises(BuildError, match="min_agreement must be in"):
        build_bundle(ckpt, tmp_path / "a.jei", BuildOptions(precision="int8", data=DATA, min_agreement=1.5))
    with pytest.raises(BuildError, match="calibration set is empty"):
        quantize_graph(tmp_path / "x.onnx", tmp_path / "y.onnx", "x", np.zeros((0, 1, 8, 8), np.float32), Recipe())
    assert not (tmp_path / "a.jei").exists()
    assert load_recipe("default").activations == "u8" and load_recipe("percentile").method == "percentile"
    # every shipped recipe quantizes ReLU with its convolution; only `stem` quantizes the stem
    assert all("Relu" in load_recipe(n).ops for n in ("default", "percentile", "stem"))
    assert "stem" not in load_recipe("stem").exclude and "stem" in load_recipe("default").exclude


def test_int8_parity_floor_fails_cleanly(tmp_path):
    ckpt = save_spread(tmp_path / "m.pt", "vit")
    # every stage quantized by request (the fallback would refuse this floor before writing anything)
    with pytest.raises(BuildError, match="INT8 parity failed: exit decisions agree") as e:
        build_bundle(ckpt, tmp_path / "f.jei", BuildOptions(precision="int8", data=DATA, parity_samples=600,
                                                            stage_samples=64, min_agreement=1.0, int8_fallback="off"))
    assert "--int8-fallback auto" in e.value.hint
    assert not (tmp_path / "f.jei").exists()


def test_int8_build_json_output_is_clean(tmp_path, capsys):
    from jei_edge.cli import main as cli_main

    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    rc = cli_main(["build", str(ckpt), "-o", str(tmp_path / "j.jei"), "--precision", "int8", "--data", DATA,
                   "--parity-samples", "300", "--min-agreement", "0", "--fp32-edges", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)
    assert report["precision"] == "int8" and report["quantization"]["edges"] == "fp32"
    # --fp32-edges: the hidden states cross the edges in FP32, as before quantized edges
    stages = json.loads((tmp_path / "j.jei" / "manifest.json").read_text())["stages"]
    assert {t["dtype"] for s in stages for t in s["inputs"] + s["outputs"]} == {"float32"}
    assert not any("scale" in t for s in stages for t in s["inputs"] + s["outputs"])


# -- quantized stage edges
def _init(graph):
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def test_int8_edges_carry_the_quantized_hidden_state(int8_bundle):
    """Stage k writes QuantizeLinear's output, stage k+1 reads it through DequantizeLinear only, with
    the one scale / zero point the manifest records; the ResNet's convolutions read the integers
    (the quantizer's own parameters), the ViT's forced edges use minmax of the reaching rows."""
    import onnx

    fam, _, out, report = int8_bundle
    m = Bundle.open(out).manifest
    edges = report["quantization"]["edges"]
    assert len(edges) == len(m.stages) - 1 >= 2
    for a, b, e in zip(m.stages[:-1], m.stages[1:], edges):
        assert a.hidden.dtype == b.input.dtype == "uint8" and a.hidden.itemsize == 1
        assert (a.hidden.scale, a.hidden.zero_point) == (b.input.scale, b.input.zero_point) == (e["scale"], e["zero_point"])
        ga, gb = _graph(out / a.file), _graph(out / b.file)
        (q,) = [n for n in ga.node if "hidden_out" in n.output]
        # the ResNet's edges cross channels-last (its convolutions read them), the ViT's in the model's layout
        assert a.hidden.channels_last == b.input.channels_last == (fam == "resnet")
        assert e["layout"] == ("channels_last" if fam == "resnet" else "model")
        if fam == "resnet":
            assert q.op_type == "Transpose" and list(q.attribute[0].ints) == [0, 2, 3, 1]
            (q,) = [n for n in ga.node if q.input[0] in n.output]
            (t,) = [n for n in gb.node if "hidden_in" in n.input]
            assert t.op_type == "Transpose" and list(t.attribute[0].ints) == [0, 3, 1, 2]
            dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                    for v in ([o for o in ga.output if o.name == "hidden_out"] + [gb.input[0]])]
            assert dims == [["batch", *a.hidden.shape]] * 2
            # the IM pools the edge's integers: no FP32 copy of the feature map
            assert e["im_pool"] == "integer" and "MatMulInteger" in {n.op_type for n in ga.node}
            assert not any(n.op_type == "DequantizeLinear" and n.input[0] == q.output[0] for n in ga.node)
            gb = _renamed_input(gb, t)
        assert q.op_type == "QuantizeLinear"
        init = _init(ga)
        assert init[q.input[1]] == np.float32(a.hidden.scale) and init[q.input[2]] == a.hidden.zero_point
        assert init[q.input[2]].dtype == np.uint8
        assert {o.name: o.type.tensor_type.elem_type for o in ga.output}["hidden_out"] == onnx.TensorProto.UINT8
        assert gb.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        readers = [n for n in gb.node if "hidden_in" in n.input]
        assert readers and {n.op_type for n in readers} == {"DequantizeLinear"}
        init = _init(gb)
        for n in readers:
            assert init[n.input[1]] == np.float32(b.input.scale) and init[n.input[2]] == b.input.zero_point
        # nothing re-quantizes the dequantized edge with the edge's own parameters
        dq = {n.output[0] for n in readers}
        for n in gb.node:
            if n.op_type == "QuantizeLinear" and n.input[0] in dq:
                assert (init[n.input[1]], init[n.input[2]]) != (np.float32(b.input.scale), b.input.zero_point)
        if fam == "resnet":  # the block's convolutions read the edge's integers directly
            assert e["quantize_nodes_removed"] >= 1
            assert e["scale"] == float(init["hidden_in_scale"]) and e["zero_point"] == 0  # ReLU output: zp 0
            assert any(n.op_type == "DequantizeLinear" and n.input[0] == "hidden_in"
                       and any(c.op_type == "Conv" and n.output[0] in c.input for c in gb.node) for n in gb.node)


def _renamed_input(graph, transpose):
    """The graph with the channels-last input's Transpose removed (its readers read ``hidden_in``):
    what is left must be the model-layout edge's graph."""
    import onnx

    g = onnx.GraphProto()
    g.CopyFrom(graph)
    g.node.remove([n for n in g.node if n.name == transpose.name][0])
    for n in g.node:
        for j, x in enumerate(n.input):
            if x == transpose.output[0]:
                n.input[j] = "hidden_in"
    return g


def _edge_pair(channels_last: bool, keepdims: int, tmp_path, dtype: str = "uint8", im: str = "pool17"):
    """A two-stage toy (stage 0: Conv -> Relu -> hidden_out, IM = ReduceMean over H, W -> Gemm
    (``pool17``: axes attribute, opset 17; ``pool18``: axes input, opset 18) or Flatten -> Gemm
    (``flatten``); stage 1: Conv on hidden_in -> probs) with its edge quantized by the build's own rewrite."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from jei_edge.compile import quantize as qz
    from jei_edge.compile.export import check_onnx

    rng = np.random.default_rng(1)
    C, H, W, K = 6, 5, 7, 4
    opset = 18 if im == "pool18" else 17
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    head = {"pool17": [helper.make_node("ReduceMean", ["hidden_out"], ["pool"], axes=[-2, -1], keepdims=keepdims)],
            "pool18": [helper.make_node("ReduceMean", ["hidden_out", "axes"], ["pool"], keepdims=keepdims)],
            "flatten": [helper.make_node("Identity", ["hidden_out"], ["pool"])]}[im]
    g0 = helper.make_graph(
        [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c0"], ["hidden_out"]),
         *head, helper.make_node("Flatten", ["pool"], ["flat"]), helper.make_node("Gemm", ["flat", "fc", "fb"], ["probs"], transB=1)],
        "s0", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, H, W])],
        [helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, ["batch", C, H, W]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", K])],
        [numpy_helper.from_array(f32(C, 3, 3, 3), "w0"), numpy_helper.from_array(f32(K, C * (H * W if im == "flatten" else 1)), "fc"),
         numpy_helper.from_array(f32(K), "fb"), numpy_helper.from_array(np.array([2, 3], np.int64), "axes")])
    g1 = helper.make_graph(
        [helper.make_node("Conv", ["hidden_in", "w1"], ["c1"]),
         helper.make_node("ReduceMean", ["c1", "axes"], ["probs"], keepdims=0) if opset >= 18 else
         helper.make_node("ReduceMean", ["c1"], ["probs"], axes=[2, 3], keepdims=0)],
        "s1", [helper.make_tensor_value_info("hidden_in", TensorProto.FLOAT, ["batch", C, H, W])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", K])],
        [numpy_helper.from_array(f32(K, C, 1, 1), "w1"), numpy_helper.from_array(np.array([2, 3], np.int64), "axes")])
    paths = []
    for i, g in enumerate((g0, g1)):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        paths.append(tmp_path / f"s{i}_{channels_last}_{keepdims}_{im}.onnx")
        onnx.save(m, str(paths[-1]))
    scale, zp = (0.02, 3) if dtype == "uint8" else (0.02, 0)
    pooled = qz._quantize_graph_output(paths[0], "hidden_out", scale, zp, dtype,
                                       channels_last=(H, W, C) if channels_last else None)
    qz._quantize_graph_input(paths[1], "hidden_in", scale, zp, dtype, channels_last=(H, W, C) if channels_last else None)
    for p, inp, outs in zip(paths, ("x", "hidden_in"), (["hidden_out", "probs"], ["probs"])):
        check_onnx(p, p.name, inp, outs)
    return paths, pooled, rng.random((9, 3, H, W), dtype=np.float32)


@pytest.mark.parametrize("dtype,keepdims,im", [("uint8", 0, "pool17"), ("uint8", 1, "pool17"), ("int8", 0, "pool17"),
                                              ("int8", 1, "pool18"), ("uint8", 0, "flatten")])
def test_channels_last_edges_compute_the_same_values(keepdims, dtype, im, tmp_path):
    """The channels-last rewrite (stage k writes ``[N, H, W, C]``, stage k+1 transposes it back, the
    IM pools the integers with MatMulInteger, or, for any other IM, reads the dequantized edge in
    the model's layout) gives stage k+1 the same input and the IM the same values as the
    model-layout edge: hidden integers identical after the transpose, probabilities within float
    rounding; both stages of both forms run in onnxruntime on one batch."""
    import onnxruntime as ort

    from jei_edge.bundle.manifest import TensorSpec
    from jei_edge.compile.quantize import dequantize_rows, quantize_rows

    (a0, a1), pooled_a, x = _edge_pair(False, keepdims, tmp_path, dtype, im)
    (b0, b1), pooled_b, _ = _edge_pair(True, keepdims, tmp_path, dtype, im)
    assert (pooled_a, pooled_b) == (False, im != "flatten")
    run = lambda p, feed: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)  # noqa: E731
    ha, pa = run(a0, {"x": x})
    hb, pb = run(b0, {"x": x})
    assert ha.shape == (9, 6, 5, 7) and hb.shape == (9, 5, 7, 6) and hb.dtype == np.dtype(dtype)
    assert np.array_equal(hb, ha.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(pb, pa, rtol=1e-5, atol=1e-5)
    assert np.abs(pa).max() > 0.1  # the pool is not trivially zero
    np.testing.assert_allclose(run(b1, {"hidden_in": hb})[0], run(a1, {"hidden_in": ha})[0], rtol=1e-5, atol=1e-5)
    # the build's numpy Q/DQ (parity) follows the layout
    lo = TensorSpec("hidden_out", (6, 5, 7), dtype, 0.02, 3 if dtype == "uint8" else 0)
    cl = TensorSpec("hidden_out", (5, 7, 6), dtype, 0.02, lo.zero_point, channels_last=True)
    real = dequantize_rows(ha, lo)
    assert np.array_equal(quantize_rows(real, cl), hb) and np.array_equal(dequantize_rows(hb, cl), real)


def test_int8_edges_compact_uint8_rows(int8_bundle):
    """The CPU workspace holds uint8 hidden rows and compacts them: a batch whose rows leave at
    different exits gives the results of the same rows run one at a time (batch 1 never moves rows)."""
    _, _, out, _ = int8_bundle
    with Runtime.load(out, max_batch=64) as rt:
        assert rt.workspace.stage_outputs(0)["hidden_out"].dtype == np.uint8
        assert rt.workspace.stage_input(1).dtype == np.uint8
        x = model_inputs(64, seed=5)
        res = rt.run(x)
        assert any(0 < r < 64 for r in res.reach[1:]), res.reach  # rows left early: survivors were compacted
        assert len(set(res.exit_index.tolist())) >= 2
        one = [rt.run(x[i:i + 1]) for i in range(64)]
    assert np.array_equal(res.exit_index, np.concatenate([r.exit_index for r in one]))
    np.testing.assert_allclose(res.probs, np.concatenate([r.probs for r in one]), atol=1e-5)


def test_quantize_rows_match_onnxruntime():
    """The build's numpy Q/DQ (per-stage parity feeds the PyTorch hidden state through it) is
    onnxruntime's QuantizeLinear / DequantizeLinear: round half to even, saturation."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from jei_edge.bundle.manifest import TensorSpec

    x = np.concatenate([np.linspace(-3, 9, 1001, dtype=np.float32), np.float32([0.25, 0.75, -0.25, 1e6, -1e6])])
    for dtype in ("uint8", "int8"):
        scale, zp = minmax_params(np.float32([-2.0, 7.0]) if dtype == "uint8" else np.float32([-6.0, 5.0]), dtype)
        assert (zp == 0) == (dtype == "int8") and scale > 0
        spec = TensorSpec("hidden_out", (x.size,), dtype, scale, zp)
        elem = TensorProto.UINT8 if dtype == "uint8" else TensorProto.INT8
        g = helper.make_graph(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"])],
            "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, x.size])],
            [helper.make_tensor_value_info("q", elem, [1, x.size]), helper.make_tensor_value_info("d", TensorProto.FLOAT, [1, x.size])],
            [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(np.array(zp, dtype), "z")])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        q, d = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[None]})
        mine = quantize_rows(x[None], spec)
        assert mine.dtype == np.dtype(dtype) and np.array_equal(mine, q)
        assert np.array_equal(dequantize_rows(q, spec), d)
        qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
        lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
        inside = (x >= lo) & (x <= hi)
        assert inside.sum() > 500 and (~inside).sum() >= 2
        err = np.abs(dequantize_rows(mine, spec)[0] - x)
        assert err[inside].max() <= scale / 2 + 1e-6  # rounding error only (float32)
        assert set(mine[0][~inside].tolist()) <= {qmin, qmax}  # saturated


def test_quantized_edge_manifest_errors_are_one_line(int8_bundle, tmp_path, capsys):
    """A manifest whose edge disagrees with its graphs or with itself: one error line, exit code 2."""
    from jei_edge.runtime.cli import main as run_main

    _, _, out, _ = int8_bundle
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32))
    cases = []
    raw = json.loads((out / MANIFEST).read_text())
    m = json.loads(json.dumps(raw))  # the graphs say uint8, the manifest float32 (consistently)
    for t in [m["stages"][0]["outputs"][0], m["stages"][1]["inputs"][0]]:
        t["dtype"] = "float32"
        del t["scale"], t["zero_point"]
        t.pop("channels_last", None)
    cases.append((m, r"stage 0 graph 'stages/stage0.onnx' tensor 'hidden_out' is uint8.*the manifest says float32"))
    m = json.loads(json.dumps(raw))
    m["stages"][1]["inputs"][0]["scale"] *= 2
    cases.append((m, r"stages\[1\].inputs\[0\].scale' and zero_point must equal stage 0's hidden_out"))
    m = json.loads(json.dumps(raw))
    del m["stages"][0]["outputs"][0]["scale"]
    cases.append((m, r"stages\[0\].outputs\[0\].scale' must be a finite number"))
    if "channels_last" in raw["stages"][1]["inputs"][0]:  # the two ends of an edge disagree on its layout
        m = json.loads(json.dumps(raw))
        del m["stages"][1]["inputs"][0]["channels_last"]
        cases.append((m, r"stages\[1\].inputs\[0\].channels_last' must equal stage 0's hidden_out \(true\)"))
        m = json.loads(json.dumps(raw))
        m["stages"][0]["outputs"][1]["channels_last"] = True  # probs [classes]
        cases.append((m, r"stages\[0\].outputs\[1\].channels_last' is only allowed on a quantized hidden state"))
    for i, (m, match) in enumerate(cases):
        b = tmp_path / f"b{i}.jei"
        shutil.copytree(out, b)
        (b / MANIFEST).write_text(json.dumps(m))
        rc = run_main([str(b), str(tmp_path / "a.npy")])
        o, err = capsys.readouterr()
        assert rc == 2 and o == "" and "Traceback" not in err, err
        assert err.startswith("error:") and len(err.strip().splitlines()) <= 2, err  # the error (+ its hint)
        assert re.search(match, err), err


def test_int8_edges_auto_leaves_fp32_reading_stages_alone(tmp_path):
    """By default an edge is quantized only when the next stage quantizes its input itself: a ViT
    block reads its input in FP32 (LayerNorm, the residual Add), so its edges stay FP32, said in the
    report; a TensorRT target refuses forced quantized edges before any work."""
    ckpt = save_spread(tmp_path / "m.pt", "vit")
    report = build_bundle(ckpt, tmp_path / "v.jei", BuildOptions(precision="int8", data=DATA, parity_samples=300,
                                                                 stage_samples=32, min_agreement=0.0))
    edges = report["quantization"]["edges"]
    assert edges and all(e["dtype"] == "float32" and "reads its input in FP32" in e["why"] for e in edges)
    assert all(not st.input.quantized and st.input.dtype == "float32" for st in Bundle.open(tmp_path / "v.jei").manifest.stages)
    with pytest.raises(BuildError, match="quantized .int8. stage edges are for onnxruntime targets"):
        build_bundle(ckpt, tmp_path / "t.jei", BuildOptions(target="orin-nano-jp6", precision="int8", data=DATA,
                                                            quantized_edges=True))
    assert not (tmp_path / "t.jei").exists()


@pytest.mark.parametrize("fam", ["vit", "resnet"])
def test_the_stem_stays_fp32_unless_the_recipe_quantizes_it(fam, vit_bundle, resnet_bundle):
    """The default recipes exclude the stem (the convolution reading the raw input: quantized, the
    benchmark ResNet's decisions agreed with FP32 on 78.7% of real held-out inputs instead of 99.8%);
    a recipe without "stem" in ``exclude`` quantizes it, as before."""
    from jei_edge.compile.quantize import quantizable_nodes

    fp32 = {"vit": vit_bundle, "resnet": resnet_bundle}[fam]
    for graph in ("stages/stage0.onnx", "plain.onnx"):
        keep, rest = quantizable_nodes(fp32 / graph, load_recipe("default").exclude)
        assert keep and not any(n.startswith("/stem") for n in keep) and any(n.startswith("/stem") for n in rest)
        assert load_recipe("percentile").exclude == load_recipe("default").exclude
        keep_all, _ = quantizable_nodes(fp32 / graph, ("gate", "im"))
        assert set(keep_all) - set(keep) and all(n.startswith("/stem") for n in set(keep_all) - set(keep))


def test_int8_merged_stages_keep_channels_last_edges(tmp_path):
    """A merged stage (exits 0-1 in one graph) ends with the same channels-last edge and integer
    pool as a single-exit stage; the runtime's batch of rows leaving at different exits gives the
    results of the same rows run one at a time."""
    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    out = tmp_path / "p.jei"
    report = build_bundle(ckpt, out, BuildOptions(precision="int8", data=DATA, parity_samples=600, stage_samples=64,
                                                  min_agreement=0.0, plan="0-1,2"))
    m = Bundle.open(out).manifest
    assert [s.exits for s in m.stages] == [(0, 1), (2,)]
    (edge,) = report["quantization"]["edges"]
    assert (edge["layout"], edge["im_pool"]) == ("channels_last", "integer")
    assert m.stages[0].hidden.channels_last and m.stages[1].input.channels_last
    with Runtime.load(out, max_batch=64) as rt:
        x = model_inputs(64, seed=3)
        res = rt.run(x)
        one = [rt.run(x[i:i + 1]) for i in range(64)]
    assert len(set(res.exit_index.tolist())) >= 2
    assert np.array_equal(res.exit_index, np.concatenate([r.exit_index for r in one]))
    np.testing.assert_allclose(res.probs, np.concatenate([r.probs for r in one]), atol=1e-5)
