"""Stage 0's in-graph input guard: NaN/inf rows are caught by the graph and named like before.

The guard (``StageModule``: ``gate + 0 * sum(x_row)``) replaces the numpy check over every input
value before the run; these tests pin that it misses nothing (any position, any non-finite value,
both families, both modes, batch 1, batches, chunked batches), that it changes no finite result,
and that a bundle claiming a guard its graph lacks is refused.
"""

import json
import shutil

import numpy as np
import pytest

from jei_edge.errors import BundleError, InputError
from jei_edge.runtime import Runtime
from jei_edge.bundle import MANIFEST
from tests.runtime.helpers import model_inputs, rehash, save_spread

FAMILIES = ("vit", "resnet")


@pytest.fixture(scope="module", params=FAMILIES)
def guarded(request, vit_bundle, resnet_bundle):
    bundle = vit_bundle if request.param == "vit" else resnet_bundle
    return bundle, Runtime.load(bundle, max_batch=4)


def test_bundles_carry_a_verified_guard(guarded):
    bundle, rt = guarded
    stages = json.loads((bundle / MANIFEST).read_text())["stages"]
    assert stages[0]["input_guard"] is True
    assert not any(st.get("input_guard") for st in stages[1:])
    assert rt.workspace.input_guard and not rt._check_finite


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, "pair"])
@pytest.mark.parametrize("mode", ["exit", "full"])
def test_every_bad_row_is_named(guarded, value, mode):
    _, rt = guarded
    x = model_inputs(10, seed=3)
    flat = x.reshape(10, -1)
    for row, pos in ((2, 0), (5, flat.shape[1] - 1), (9, flat.shape[1] // 3)):
        if value == "pair":  # +inf and -inf in one row: their sum is NaN, still caught
            flat[row, pos], flat[row, (pos + 1) % flat.shape[1]] = np.inf, -np.inf
        else:
            flat[row, pos] = value
    # 10 rows on max_batch 4: chunks of 4, 4, 2; rows are named in the whole input's numbering
    with pytest.raises(InputError, match=r"in 3 row\(s\) \(rows 2, 5, 9\)"):
        rt.run(x, mode=mode)
    for row, pos in ((0, 0), (0, flat.shape[1] - 1)):  # batch 1: every position of the one row
        y = model_inputs(1, seed=4)
        y.reshape(1, -1)[row, pos] = value if value != "pair" else np.nan
        with pytest.raises(InputError, match=r"rows 0\)"):
            rt.run(y, mode=mode)
    # the runtime is not left in a bad state: the next good batch runs
    good = model_inputs(6, seed=5)
    assert np.array_equal(rt.run(good).exit_index, Runtime.load(guarded[0]).run(good).exit_index)


def test_finite_rows_that_overflow_stage_0_are_refused(guarded):
    _, rt = guarded
    x = model_inputs(3, seed=6)
    x[1] = 1e38  # finite, but the guard's row sum overflows float32: the gate is NaN
    with pytest.raises(InputError, match=r"rows 1 are finite but the model's stage 0 overflows"):
        rt.run(x)


def test_guard_changes_no_finite_result(tmp_path):
    """Guarded and unguarded stage 0 give bit-identical outputs on finite input, NaN gates only on bad rows."""
    import torch

    from jei_edge.model.checkpoint import load_checkpoint

    for family in FAMILIES:
        model, _ = load_checkpoint(save_spread(tmp_path / f"{family}.pt", family))
        x = torch.from_numpy(model_inputs(32, seed=7))
        with torch.no_grad():
            a = model.stage(0).eval()(x)
            b = model.stage(0, input_guard=False).eval()(x)
            assert all(torch.equal(u, v) for u, v in zip(a, b))
            x[4, 0, 0, 0] = -float("inf")
            gate = model.stage(0).eval()(x)[2]
        assert torch.isnan(gate[4]) and torch.isfinite(torch.cat([gate[:4], gate[5:]])).all()


def test_bundle_without_guard_keeps_the_numpy_check(vit_bundle, tmp_path):
    """Bundles built before the guard existed (no ``input_guard`` key) are checked before the run."""
    b = tmp_path / "old.jei"
    shutil.copytree(vit_bundle, b)
    m = json.loads((b / MANIFEST).read_text())
    del m["stages"][0]["input_guard"]
    (b / MANIFEST).write_text(json.dumps(m))
    rt = Runtime.load(b)
    assert not rt.workspace.input_guard and rt._check_finite
    x = model_inputs(5)
    x[3, 0, 2, 2] = np.inf
    with pytest.raises(InputError, match=r"rows 3\)"):
        rt.run(x)


def test_manifest_claiming_a_missing_guard_is_refused(vit_bundle, tmp_path):
    """An altered stage 0 whose gate ignores its input cannot pass the probe at load."""
    import onnx
    from onnx import TensorProto, helper

    b = tmp_path / "altered.jei"
    shutil.copytree(vit_bundle, b)
    nodes = [
        helper.make_node("Shape", ["x"], ["n"], start=0, end=1),
        helper.make_node("ConstantOfShape", ["n"], ["gate"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
        helper.make_node("Concat", ["n", "c5"], ["pshape"], axis=0),
        helper.make_node("ConstantOfShape", ["pshape"], ["probs"], value=helper.make_tensor("p", TensorProto.FLOAT, [1], [0.2])),
        helper.make_node("Concat", ["n", "c5", "c16"], ["hshape"], axis=0),  # the manifest's [batch, 5, 16]
        helper.make_node("ConstantOfShape", ["hshape"], ["hidden_out"], value=helper.make_tensor("h", TensorProto.FLOAT, [1], [0.0])),
    ]
    graph = helper.make_graph(
        nodes, "altered", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("hidden_out", "probs", "gate")],
        initializer=[helper.make_tensor("c5", TensorProto.INT64, [1], [5]),
                     helper.make_tensor("c16", TensorProto.INT64, [1], [16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(b / "stages" / "stage0.onnx"))
    rehash(b)
    with pytest.raises(BundleError, match=r"declares an input guard, but its gate is \[0.5, 0.5, 0.5\]"):
        Runtime.load(b)


def test_guard_survives_export_and_onnxruntime_optimisation(tmp_path):
    """A stem that launders non-finite values (NaN/inf -> 0) hides bad rows from the network;
    only the guard (not optimised away by the exporter or onnxruntime's ``all`` level) flags them."""
    import torch

    from jei_edge.compile.export import _export
    from jei_edge.backends.onnxruntime import OrtSettings
    from jei_edge.backends.onnxruntime.executor import create_session
    from tests.runtime.helpers import spread_model

    class Launder(torch.nn.Module):
        def forward(self, x):
            return torch.where(torch.isnan(x) | torch.isinf(x), torch.zeros_like(x), x)

    model = spread_model("resnet")
    model.stem = torch.nn.Sequential(Launder(), model.stem)
    model.requires_grad_(False)
    example = torch.from_numpy(model_inputs(2))
    names = ("hidden_out", "probs", "gate")
    x = model_inputs(4, seed=8)
    x[1, 0, 0, 0], x[2, 0, 7, 7], x[3, 0, 4, 4] = np.nan, np.inf, -np.inf
    gates = {}
    for guard in (True, False):
        path = tmp_path / f"stage0_{guard}.onnx"
        _export(model.stage(0, input_guard=guard).eval(), example, path, "x", names, 17, "stage 0")
        sess = create_session(path, OrtSettings(graph_optimization="all"), "stage 0")
        gates[guard] = sess.run(["gate"], {"x": x})[0]
    assert np.isfinite(gates[False]).all()  # the network alone would let the bad rows through
    assert np.isfinite(gates[True][0]) and np.isnan(gates[True][1:]).all()
    assert gates[True][0] == gates[False][0]
