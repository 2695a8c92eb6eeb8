"""INT8 builds: exit-aware calibration, Q/DQ only in the backbone, the input guard intact, clear errors."""

import json

import numpy as np
import pytest

from jei_edge.compile import BuildOptions, build_bundle, verify_bundle
from jei_edge.compile.quantize import MIN_ROWS, Recipe, load_recipe, quantize_graph, stage_inputs
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
    # an untrained spread model: agreement is reported, not required, here
    report = build_bundle(ckpt, out, BuildOptions(precision="int8", data=DATA, parity_samples=600, stage_samples=64,
                                                  min_agreement=0.0))
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
        dq_out = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
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


def test_int8_parity_floor_fails_cleanly(tmp_path):
    ckpt = save_spread(tmp_path / "m.pt", "vit")
    with pytest.raises(BuildError, match="INT8 parity failed: exit decisions agree"):
        build_bundle(ckpt, tmp_path / "f.jei", BuildOptions(precision="int8", data=DATA, parity_samples=600,
                                                            stage_samples=64, min_agreement=1.0))
    assert not (tmp_path / "f.jei").exists()


def test_int8_build_json_output_is_clean(tmp_path, capsys):
    from jei_edge.cli import main as cli_main

    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    rc = cli_main(["build", str(ckpt), "-o", str(tmp_path / "j.jei"), "--precision", "int8", "--data", DATA,
                   "--parity-samples", "300", "--min-agreement", "0", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["precision"] == "int8"
