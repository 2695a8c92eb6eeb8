"""Batch-only shape arithmetic folded out of exported graphs (jei_edge.compile.shapes)."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from tests.runtime.helpers import model_inputs, spread_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from jei_edge.compile import shapes  # noqa: E402
from jei_edge.compile.shapes import B, fold_static_shapes  # noqa: E402


def _optimized_ops(model) -> collections.Counter:
    """Op types onnxruntime runs (``all`` optimizations, as the runtime's default settings)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = f"{d}/opt.onnx"
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(f"{d}/opt.onnx").graph.node)


def _run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_vit_stage_0_and_plain_keep_only_the_batch_shape(tmp_path):
    """A ViT's stem (flatten + cls-token expand) and attention reshapes are exported as Shape /
    Gather / Concat chains; folded, onnxruntime runs one Shape (the batch) in stage 0 and the plain
    graph instead of 30 and 110 shape nodes, and every output equals the torch module's at batch
    sizes the fold's own check did not use."""
    import torch

    from jei_edge.compile.export import _export

    model = spread_model("vit")
    model.requires_grad_(False)
    example = torch.from_numpy(model_inputs(2))
    graphs = {"stage0": (model.stage(0).eval(), "x", ("hidden_out", "probs", "gate")),
              "plain": (model.plain_backbone().eval(), "x", ("probs",))}
    for name, (module, inp, outs) in graphs.items():
        path = tmp_path / f"{name}.onnx"
        result = _export(module, example, path, inp, outs, 17, name).fold
        assert result.kept_original == "" and result.removed > 0, result
        folded = onnx.load(str(path))
        ops = _optimized_ops(folded)
        assert ops["Shape"] == 1 and ops["Where"] == 0 and ops["Unsqueeze"] <= 1, ops
        for n in (1, 2, 5, 7):
            x = model_inputs(n, seed=n)
            got = _run(folded, {inp: x})
            with torch.no_grad():
                want = module(torch.from_numpy(x))
            want = (want,) if not isinstance(want, tuple) else want
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)


def _reshape_graph(target, x_dims=(B, 4, 6), y_dims=None):
    """x -> Shape -> Gather(0) -> Unsqueeze -> Concat(target pieces) -> Reshape(x), the exporter's pattern."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
             helper.make_node("Concat", ["b1", "rest"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [], [0]),
             helper.make_tensor("axes", TensorProto.INT64, [1], [0]),
             helper.make_tensor("rest", TensorProto.INT64, [len(target)], list(target))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_dims))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_dims or [B, 2, 12])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("rest, want, y", [((2, 12), [0, 2, 12], [B, 2, 12]), ((-1,), [0, -1], [B, 24]),
                                           ((3, -1), [0, 3, -1], [B, 3, 8])])
def test_reshape_target_becomes_a_constant_with_the_batch_copied(rest, want, y):
    m = _reshape_graph(rest, y_dims=y)
    folded, result = fold_static_shapes(m)
    assert result.kept_original == "" and [n.op_type for n in folded.graph.node] == ["Reshape"]
    const = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert const[folded.graph.node[0].input[1]].tolist() == want
    x = np.arange(3 * 24, dtype=np.float32).reshape(3, 4, 6)
    np.testing.assert_array_equal(_run(folded, {"x": x})[0], _run(m, {"x": x})[0])


def test_batch_not_in_front_is_written_as_minus_one():
    """``reshape(24, B)``: the batch moves, so ``0`` (copy dim 1 of the input) would be wrong."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
             helper.make_node("Concat", ["rest", "s"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, 4, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [24, B])],
                          [helper.make_tensor("rest", TensorProto.INT64, [1], [24])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folded, result = fold_static_shapes(m)
    assert result.kept_original == ""
    const = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert const[folded.graph.node[-1].input[1]].tolist() == [24, -1]
    x = np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, {"x": x})[0], x.reshape(24, 3))


def test_a_wrong_fold_keeps_the_exported_graph(monkeypatch):
    """The pass is checked, not trusted: a fold that changes an output (here a test double of a
    round that writes a wrong target shape) is refused and the exported graph is returned."""
    m = _reshape_graph((2, 12))

    def bad_round(model):
        model.graph.node[-1].input[1] = "wrong"
        model.graph.initializer.append(helper.make_tensor("wrong", TensorProto.INT64, [3], [0, 12, 2]))
        shapes.drop_dead(model.graph)
        return False

    monkeypatch.setattr(shapes, "_fold_round", bad_round)
    folded, result = fold_static_shapes(m)
    assert folded is m and result.kept_original == "the rewritten graph's outputs differed"
    assert result.removed == 0


def test_graphs_with_other_dynamic_dims_are_left_alone():
    m = _reshape_graph((2, 12), x_dims=(B, "h", 6))
    folded, result = fold_static_shapes(m)
    assert folded is m and result.kept_original == "inputs not static apart from the batch"


def test_nothing_to_fold():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folded, result = fold_static_shapes(m)
    assert folded is m and result.kept_original == "nothing to fold"


def test_topological_order_and_cycles():
    a = helper.make_node("Relu", ["x"], ["a"])
    b = helper.make_node("Relu", ["a"], ["b"])
    c = helper.make_node("Add", ["a", "b"], ["c"])
    assert [n.output[0] for n in shapes.topological([c, b, a])] == ["a", "b", "c"]
    loop = [helper.make_node("Relu", ["q"], ["p"]), helper.make_node("Relu", ["p"], ["q"])]
    with pytest.raises(ValueError, match="cycle"):
        shapes.topological(loop)


def test_build_report_records_the_fold(vit_bundle):
    import json

    report = json.loads((vit_bundle / "report.json").read_text())
    fold = report["shape_folding"]
    assert fold["graphs"] == report["num_stages"] + 1 and fold["nodes_after"] < fold["nodes_before"]
    assert "shape arithmetic folded" in (vit_bundle / "report.txt").read_text()


# --- attention blocks fused into onnxruntime's Attention kernel (jei_edge.compile.attention) ---

def _vit_graph(tmp_path, which: str, fuse: bool):
    import torch

    from jei_edge.compile.export import _export

    model = spread_model("vit")
    model.requires_grad_(False)
    module = model.stage(1).eval() if which == "stage1" else model.plain_backbone().eval()
    x = torch.from_numpy(model_inputs(2))
    example = model.stage(0)(x)[0] if which == "stage1" else x
    inp, outs = ("hidden_in", ("hidden_out", "probs", "gate")) if which == "stage1" else ("x", ("probs",))
    path = tmp_path / f"{which}_{fuse}.onnx"
    done = _export(module, example, path, inp, outs, 17, which, fuse_attention=fuse)
    return model, module, onnx.load(str(path)), done, inp


@pytest.mark.parametrize("which", ["stage1", "plain"])
def test_attention_blocks_fuse_and_match_torch(tmp_path, which):
    """Every block of the spread ViT's stage 1 / plain graph becomes one Attention node; outputs
    equal the torch module's at batch sizes the fusion's own check did not use."""
    import torch

    model, module, graph, done, inp = _vit_graph(tmp_path, which, fuse=True)
    blocks = 1 if which == "stage1" else len(model.blocks)
    assert done.attention.fused == blocks and done.attention.kept_original == ""
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert ops["Attention"] == blocks and ops["Softmax"] == (1 if which == "plain" else 0)
    assert any(o.domain == "com.microsoft" for o in graph.opset_import)
    for n in (1, 2, 5):
        x = torch.from_numpy(model_inputs(n, seed=n))
        with torch.no_grad():
            feed = model.stage(0)(x)[0] if which == "stage1" else x
            want = module(feed)
        want = (want,) if not isinstance(want, tuple) else want
        for g, w in zip(_run(graph, {inp: feed.numpy()}), want):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)


def test_attention_not_asked_leaves_standard_ops(tmp_path):
    _, _, graph, done, _ = _vit_graph(tmp_path, "stage1", fuse=False)
    assert done.attention is None
    assert all(n.domain in ("", "ai.onnx") for n in graph.graph.node)


def test_attention_with_a_second_reader_is_not_fused(tmp_path):
    """An internal tensor read elsewhere (here: the attention probabilities made a graph output)
    cannot be fused away."""
    from jei_edge.compile.attention import fuse_attention

    _, _, graph, _, _ = _vit_graph(tmp_path, "stage1", fuse=False)
    soft = next(n for n in graph.graph.node if n.op_type == "Softmax")
    graph.graph.output.append(helper.make_tensor_value_info(soft.output[0], TensorProto.FLOAT, None))
    fused, result = fuse_attention(graph)
    assert fused is graph and result.fused == 0 and result.kept_original == "nothing to fuse"


def test_a_wrong_attention_rewrite_is_refused(tmp_path, monkeypatch):
    """Checked, not trusted: a test double of the matcher that reads the block with the wrong head
    count gives other outputs, and the exported graph is kept."""
    from jei_edge.compile import attention
    from jei_edge.compile.attention import fuse_attention

    real = attention._match

    def wrong_heads(*args):
        m = real(*args)
        return None if m is None else (m[0], {**m[1], "heads": 1})

    monkeypatch.setattr(attention, "_match", wrong_heads)
    _, _, graph, _, _ = _vit_graph(tmp_path, "stage1", fuse=False)
    fused, result = fuse_attention(graph)
    assert fused is graph and result.kept_original == "the rewritten graph's outputs differed"


@pytest.mark.parametrize("backend, precision, want", [("onnxruntime", "fp32", True), ("onnxruntime", "int8", False),
                                                      ("tensorrt-rtx", "fp32", False), ("tensorrt", "fp16", False)])
def test_attention_fusion_only_where_onnxruntime_runs_fp32(backend, precision, want):
    from types import SimpleNamespace

    from jei_edge.compile.build import _fuses_attention

    job = SimpleNamespace(target=SimpleNamespace(backend=backend), precision=precision)
    assert _fuses_attention(job) is want


def test_cpu_bundle_runs_fused_attention(vit_bundle):
    import json

    report = json.loads((vit_bundle / "report.json").read_text())
    assert report["attention_fusion"]["asked"] and report["attention_fusion"]["blocks"] > 0
    stage = onnx.load(str(next((vit_bundle / "stages").glob("stage1*.onnx"))))
    assert any(n.op_type == "Attention" for n in stage.graph.node)


def test_onnxruntime_without_the_contrib_kernel_gets_a_clear_hint(tmp_path):
    """A graph whose com.microsoft kernel this onnxruntime lacks (a minimal build lacks Attention;
    stood in for here by an unknown contrib op): one BundleError naming the file and the fix."""
    from jei_edge.backends.onnxruntime import OrtSettings
    from jei_edge.backends.onnxruntime.executor import create_session
    from jei_edge.errors import BundleError

    g = helper.make_graph([helper.make_node("NoSuchAttention", ["x"], ["y"], domain="com.microsoft")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "stage1.onnx"
    onnx.save(m, str(path))
    with pytest.raises(BundleError, match=r"stage 1 \('.*stage1.onnx'\) cannot be loaded") as err:
        create_session(path, OrtSettings(), "stage 1")
    assert "com.microsoft.Attention" in err.value.hint and "standard onnxruntime build" in err.value.hint


def test_graphs_the_passes_leave_alone():
    """Two inputs (the batch symbol would name two tensors' batches, which onnxruntime does not tie
    together) and subgraphs (dead-node removal does not look inside them) are not rewritten."""
    from jei_edge.compile.attention import fuse_attention

    two = _reshape_graph((2, 12))
    two.graph.input.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [B, 4]))
    for fn in (fold_static_shapes, fuse_attention):
        out, result = fn(two)
        assert out is two and result.kept_original == "not a single-input graph"
    sub = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "body", [],
                            [helper.make_tensor_value_info("z", TensorProto.FLOAT, [B, 4, 6])])
    m = _reshape_graph((2, 12))
    m.graph.node.append(helper.make_node("If", ["cond"], ["w"], then_branch=sub, else_branch=sub))
    m.graph.initializer.append(helper.make_tensor("cond", TensorProto.BOOL, [], [True]))
    out, result = fold_static_shapes(m)
    assert out is m and "subgraphs" in result.kept_original


def test_symbolic_rules_at_the_edges():
    """Equal of the batch with itself; ONNX Slice clamping (not Python's) for a negative step."""
    assert shapes._binary("Equal", B, B) is True
    assert shapes._binary("Equal", B, -1) is False and shapes._binary("Equal", B, 3) is None
    v = shapes._Value((5,), [10, 11, 12, 13, 14])
    assert shapes._sliced(v, -10, -100, -1).items == [10]  # start clamps to 0 (Python: empty)
    assert shapes._sliced(v, 1, 100, 2).items == [11, 13]
    assert shapes._sliced(v, -1, -6, -2).items == [14, 12, 10]


def test_attention_reshapes_must_keep_rows_and_tokens():
    """A reshape into windows ([-1, 2, 3, H, D] with N = 4) is attention within windows, not the
    block Attention computes: the matcher refuses it."""
    from jei_edge.compile.attention import _rows_and_tokens

    assert _rows_and_tokens(np.array([0, 17, 3, 4, 16]), 17)
    assert _rows_and_tokens(np.array([-1, 0, 3, 4, 16]), 17)
    assert not _rows_and_tokens(np.array([-1, 2, 3, 4, 16]), 4)
    assert not _rows_and_tokens(np.array([0, -1, 3, -1, 16]), 17)


def test_a_graph_with_external_data_stays_as_exported(tmp_path):
    """A graph whose weights live in external data (> 2 GiB models) is not rewritten: the passes
    would write it back with its weights inline."""
    from jei_edge.compile.export import _graph_passes

    m = _reshape_graph((2, 12))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "w"))
    m.graph.node.append(helper.make_node("Identity", ["w"], ["w_copy"]))
    m.graph.output.append(helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, [64, 64]))
    path = tmp_path / "stage0.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="stage0.data", size_threshold=0)
    before = path.read_bytes()
    done = _graph_passes(path, fuse_attention=True)
    assert done.fold.kept_original == done.attention.kept_original == "weights in external data"
    assert path.read_bytes() == before
