"""Build: stage export, manifest, parity report, plain backbone, model.pt, output handling."""

import json

import numpy as np
import pytest

from jei_edge.compile import BuildOptions, build_bundle
from jei_edge.errors import BuildError, CheckpointError, JeiEdgeError
from jei_edge.bundle import MANIFEST, SCHEMA, SCHEMA_VERSION, sha256_file
from tests.runtime.helpers import KWARGS, save_spread

FAST = dict(parity_samples=300, stage_samples=64)


def test_parity_report_on_10000_inputs(parity_bundle):
    rep = json.loads((parity_bundle / "report.json").read_text())
    d = rep["decisions"]
    assert d["samples"] == 10_000 and sum(rep["parity_inputs"].values()) == 10_000
    assert set(rep["parity_inputs"]) >= {"uniform_noise", "smooth_noise"}
    # decisions may differ only inside the tie band (the build would have failed otherwise)
    assert d["disagreements"] == d["disagreements_within_tie_band"]
    assert d["agreement"] >= 0.999
    # every disagreement moves one input between two exits of the histogram
    moved = np.abs(np.subtract(d["exit_histogram_pytorch"], d["exit_histogram_bundle"])).sum()
    assert moved <= 2 * d["disagreements"] and sum(d["exit_histogram_bundle"]) == 10_000
    assert d["rate_bound"] == {"counted": "disagreements beyond the tie band", "k": 0, "n": 10_000,
                               "confidence": 0.95, "upper": pytest.approx(3e-4, rel=0.01)}
    assert rep["references"]["samples"] == 10_000 and rep["check"] == {"mode": "explicit", "samples": 10_000}
    assert sum(v > 0 for v in d["exit_histogram_bundle"]) >= 3, "the test model must spread its exits"
    for row in rep["stage_parity"]["stages"]:
        assert row["max_abs_error"]["probs"] <= 1e-5
        if "gate" in row["max_abs_error"]:
            assert row["max_abs_error"]["gate"] <= 1e-5
    assert d["exit_probs_max_abs_error"] <= 1e-4 and d["full_mode_probs_max_abs_error"] <= 1e-4
    assert "decisions" in (parity_bundle / "report.txt").read_text()


def test_manifest_describes_every_stage_and_file(parity_bundle):
    m = json.loads((parity_bundle / MANIFEST).read_text())
    assert m["schema"] == SCHEMA and m["schema_version"] == SCHEMA_VERSION
    assert m["precision"] == "fp32" and m["target"]["name"] == "cpu" and m["target"]["backend"] == "onnxruntime"
    assert m["toolchain"]["opset"] >= 17 and {"onnxruntime", "onnx", "torch", "numpy"} <= set(m["toolchain"])
    n_blocks = KWARGS["vit"]["depth"]
    assert len(m["stages"]) == n_blocks  # one stage per exit (an exit after every block but the last)
    assert m["stages"][0]["inputs"][0]["name"] == "x"
    assert m["stages"][0]["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    for k, st in enumerate(m["stages"]):
        assert st["index"] == k and st["exit"] == k
        names = [o["name"] for o in st["outputs"]]
        assert names == (["probs"] if k == len(m["stages"]) - 1 else ["hidden_out", "probs", "gate"])
        assert all(o["shape"][0] == "batch" and o["dtype"] == "float32" for o in st["outputs"])
        if k:
            assert st["inputs"][0]["name"] == "hidden_in"
            assert st["inputs"][0]["shape"] == m["stages"][k - 1]["outputs"][0]["shape"]
    assert [s["blocks"] for s in m["stages"]] == [[i, i + 1] for i in range(n_blocks)]
    assert sum(m["costs"]["stage_macs"]) == m["costs"]["full_macs"]
    assert len(m["exits"]["qhat"]) == len(m["stages"]) and m["exits"]["alphas"] == [0.05, 0.1]
    assert m["class_names"] == [f"c{i}" for i in range(5)] and m["preprocessing"]["mean"] == [0.5]
    assert m["model_file"] == "model.pt" and m["plain"]["file"] == "plain.onnx"
    on_disk = sorted(p.relative_to(parity_bundle).as_posix() for p in parity_bundle.rglob("*") if p.is_file())
    assert sorted(m["files"]) == sorted(set(on_disk) - {MANIFEST})
    for rel, entry in m["files"].items():
        assert not rel.startswith("/") and ".." not in rel.split("/")
        assert sha256_file(parity_bundle / rel) == entry["sha256"]
        assert (parity_bundle / rel).stat().st_size == entry["size"]


def test_stage_graphs_have_dynamic_batch_and_in_graph_gate(parity_bundle):
    import onnx
    import onnxruntime as ort

    m = json.loads((parity_bundle / MANIFEST).read_text())
    model = onnx.load(str(parity_bundle / m["stages"][0]["file"]))
    assert {o.domain: o.version for o in model.opset_import}[""] >= 17
    assert {n.op_type for n in model.graph.node} >= {"TopK", "Sigmoid"}  # the gate is inside the graph
    sess = ort.InferenceSession(str(parity_bundle / m["stages"][0]["file"]), providers=["CPUExecutionProvider"])
    for b in (1, 3, 70):
        h, p, g = sess.run(None, {"x": np.zeros((b, 1, 8, 8), np.float32)})
        assert h.shape[0] == p.shape[0] == g.shape[0] == b and g.ndim == 1
        assert np.allclose(p.sum(1), 1, atol=1e-5) and ((g >= 0) & (g <= 1)).all()
    plain = ort.InferenceSession(str(parity_bundle / "plain.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in plain.get_outputs()] == ["probs"]
    assert {n.op_type for n in onnx.load(str(parity_bundle / "plain.onnx")).graph.node}.isdisjoint({"TopK"})


def test_no_model_and_existing_output(tmp_path):
    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    out = tmp_path / "b.jei"
    rep = build_bundle(ckpt, out, BuildOptions(include_model=False, **FAST))
    m = json.loads((out / MANIFEST).read_text())
    assert m["model_file"] is None and not (out / "model.pt").exists()
    assert any("checked on 300 inputs: a rate of disagreements beyond the tie band above 0.99% is excluded" in n
               for n in rep["notes"]), rep["notes"]
    with pytest.raises(BuildError, match="already exists"):
        build_bundle(ckpt, out, BuildOptions(**FAST))
    (out / "stale.txt").write_text("from the old bundle")
    build_bundle(ckpt, out, BuildOptions(force=True, **FAST))
    assert (out / "model.pt").exists() and json.loads((out / MANIFEST).read_text())["model_file"] == "model.pt"
    assert not (out / "stale.txt").exists()  # replaced as a whole, not merged
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers beside it


def test_force_never_replaces_a_non_bundle(tmp_path):
    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not a jei-edge bundle"):
        build_bundle(ckpt, victim, BuildOptions(force=True, **FAST))
    assert (victim / "data.txt").read_text() == "keep me"


def test_default_output_and_bad_options(tmp_path):
    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    with pytest.raises(JeiEdgeError, match="unknown target"):
        build_bundle(ckpt, None, BuildOptions(target="nope", **FAST))
    with pytest.raises(BuildError, match="precision 'fp16'"):
        build_bundle(ckpt, None, BuildOptions(precision="fp16", **FAST))
    with pytest.raises(BuildError, match="opset 13"):
        build_bundle(ckpt, None, BuildOptions(opset=13, **FAST))
    with pytest.raises(CheckpointError):
        build_bundle(tmp_path / "missing.pt", None, BuildOptions(**FAST))
    build_bundle(ckpt, None, BuildOptions(**FAST))
    assert (tmp_path / "m.jei" / MANIFEST).is_file()


def test_real_inputs_from_data_source(tmp_path):
    """--data adds real samples (and their blends) to the parity inputs."""
    from jei_edge.data.transforms import raw_to_model  # noqa: F401  (the data API the build uses)

    ckpt = save_spread(tmp_path / "m.pt", "resnet")
    rng = np.random.default_rng(0)
    npz = tmp_path / "real.npz"
    np.savez(npz, x=rng.random((200, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 5, 200))
    rep = build_bundle(ckpt, tmp_path / "r.jei", BuildOptions(data=str(npz), parity_samples=400, stage_samples=64))
    assert rep["data_source"] == str(npz)
    assert rep["parity_inputs"]["real_held_out"] > 0 and "real_blend" in rep["parity_inputs"]
    with pytest.raises(JeiEdgeError):
        build_bundle(ckpt, tmp_path / "r2.jei", BuildOptions(data=str(tmp_path / "none.npz"), **FAST))
    assert not (tmp_path / "r2.jei").exists()
