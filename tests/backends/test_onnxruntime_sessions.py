"""onnxruntime session creation: the graph transformers turned off per graph (``qdq_propagation``)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from jei_edge.backends.onnxruntime.executor import (QDQ_PROPAGATION, create_session,  # noqa: E402
                                                    disabled_optimizers, float_pool_feeds_quantize,
                                                    session_kwargs)
from jei_edge.backends.onnxruntime.settings import OrtSettings  # noqa: E402
from jei_edge.bundle.onnx_scan import OnnxNode, scan_onnx_file  # noqa: E402


def _stem_graph(path, pool_reads_dequantized: bool = False):
    """x -> Relu -> MaxPool -> Q -> DQ -> Conv (int8 weights through DQ) -> y: an INT8 ResNet
    whose stem stayed FP32. With ``pool_reads_dequantized`` the pool reads a DQ output instead."""
    rng = np.random.default_rng(0)
    w = rng.integers(-100, 100, size=(8, 4, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "zp"),
             numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.array(0.01, np.float32), "w_s"),
             numpy_helper.from_array(np.array(0, np.int8), "w_zp")]
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    pool_in = "r"
    if pool_reads_dequantized:
        nodes += [helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["r_q"]),
                  helper.make_node("DequantizeLinear", ["r_q", "s", "zp"], ["r_dq"])]
        pool_in = "r_dq"
    nodes += [helper.make_node("MaxPool", [pool_in], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("QuantizeLinear", ["p", "s", "zp"], ["p_q"]),
              helper.make_node("DequantizeLinear", ["p_q", "s", "zp"], ["p_dq"]),
              helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"]),
              helper.make_node("Conv", ["p_dq", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _pool_input_types(path, settings, tmp_path):
    """Element types of every MaxPool input in onnxruntime's optimized graph of ``path``."""
    kwargs = session_kwargs(path, settings)
    optimized = tmp_path / f"optimized_{settings.qdq_propagation}.onnx"
    kwargs["sess_options"].optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), **kwargs)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(optimized)))
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    return [types.get(n.input[0]) for n in model.graph.node if n.op_type == "MaxPool"]


def test_pattern_rule():
    def node(op, ins, outs):
        return OnnxNode(op, "", tuple(ins), tuple(outs))

    stem = [node("Relu", ["x"], ["r"]), node("MaxPool", ["r"], ["p"]), node("QuantizeLinear", ["p", "s"], ["q"])]
    assert float_pool_feeds_quantize(stem)
    # the pool already reads dequantized values: propagation cannot make it slower
    assert not float_pool_feeds_quantize([node("DequantizeLinear", ["a", "s"], ["r"])] + stem[1:])
    assert not float_pool_feeds_quantize(stem[:2])  # FP32 graph: no QuantizeLinear
    assert not float_pool_feeds_quantize([node("Relu", ["x"], ["r"]), node("QuantizeLinear", ["r", "s"], ["q"])])


def test_auto_keeps_an_fp32_pool_in_fp32(tmp_path):
    path = _stem_graph(tmp_path / "stem.onnx")
    assert float_pool_feeds_quantize(scan_onnx_file(path).nodes)
    assert disabled_optimizers(path, OrtSettings()) == [QDQ_PROPAGATION]
    # the control: with propagation on, onnxruntime moves the QuantizeLinear above the pool and
    # runs it on uint8 (the slow path this setting avoids); with auto the pool stays float
    assert _pool_input_types(path, OrtSettings(qdq_propagation="on"), tmp_path) == [TensorProto.UINT8]
    assert _pool_input_types(path, OrtSettings(), tmp_path) == [TensorProto.FLOAT]
    x = np.random.default_rng(1).normal(size=(1, 4, 16, 16)).astype(np.float32)
    got = [create_session(path, OrtSettings(qdq_propagation=m), "stem").run(None, {"x": x})[0] for m in ("on", "auto")]
    assert np.array_equal(got[0], got[1])  # the same integers either way


def test_auto_leaves_other_graphs_alone(tmp_path):
    path = _stem_graph(tmp_path / "q_pool.onnx", pool_reads_dequantized=True)
    assert disabled_optimizers(path, OrtSettings()) == []
    assert disabled_optimizers(path, OrtSettings(qdq_propagation="off")) == [QDQ_PROPAGATION]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x0a\xff\xff\xff")
    assert disabled_optimizers(broken, OrtSettings()) == []  # onnxruntime's load names the problem


def test_row_workers_parts_and_errors():
    """RowWorkers: chunks cover the rows in order with sizes differing by at most one and at least
    min_rows each; map returns results in item order and raises a chunk's error only after every
    chunk has finished (they write into the same buffers)."""
    import threading
    import time

    from jei_edge.backends.onnxruntime.executor import RowWorkers, row_split

    w = RowWorkers(3, min_rows=2)
    assert w.parts(1) == [(0, 1)] and w.parts(3) == [(0, 3)] and w.parts(4) == [(0, 2), (2, 2)]
    assert w.parts(7) == [(0, 3), (3, 2), (5, 2)] and w.parts(64) == [(0, 22), (22, 21), (43, 21)]
    assert w.map(lambda v: v * 10, [1, 2, 3]) == [10, 20, 30]
    done = []

    def slow_or_fail(i):
        if i == 0:
            raise RuntimeError("chunk 0 failed")
        time.sleep(0.05)
        done.append(threading.current_thread().name)

    with pytest.raises(RuntimeError, match="chunk 0 failed"):
        w.map(slow_or_fail, [0, 1, 2])
    assert len(done) == 2 and all(n.startswith("jei-edge-rows") for n in done)
    split = row_split(lambda b: [b * 2, b.sum(axis=1)], w)
    b = np.arange(14, dtype=np.float32).reshape(7, 2)
    got = split(b)
    assert np.array_equal(got[0], b * 2) and np.array_equal(got[1], b.sum(axis=1))
    assert row_split(len, None) is len
    w.close()
    with pytest.raises(ValueError):
        RowWorkers(1)
