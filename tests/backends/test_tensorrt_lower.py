"""`jei-edge build --target <rtx>` and `jei-edge lower`: real TensorRT-RTX engines in bundles, built
on this CPU-only host (TensorRT-RTX builds ahead of time without a GPU).

Covered: every stage of a small ViT and ResNet for two RTX compute capabilities in fp32, fp16 and
int8 (symmetric Q/DQ), the manifest's lowering plan and engine entries, the engine cache (a second
build reuses every engine), FP16 stage graphs (types, the FP32 input guard), the Jetson path
(host build -> `jei-edge lower` with torch and onnxruntime blocked, TensorRT-RTX standing in for
JetPack's TensorRT -> `jei-edge verify` refusing to run engines here), and the refusal of engines
from another toolchain version. None of this runs an engine: no GPU here can (docs/tensorrt.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jei_edge.bundle import Bundle
from jei_edge.errors import BuildError, BundleError
from tests.runtime.helpers import cli_blocked, rehash, save_spread

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'jei-edge[rtx]')")

DATA = "synthetic:size=8,n=600,classes=5"  # INT8 calibration inputs (the spread checkpoints record none)
TARGETS = {"rtx-ampere": "8.6", "rtx-ada": "8.9"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A private engine cache for this module (never the user's ~/.cache)."""
    path = tmp_path_factory.mktemp("engine-cache")
    old = os.environ.get("JEI_EDGE_ENGINE_CACHE")
    os.environ["JEI_EDGE_ENGINE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("JEI_EDGE_ENGINE_CACHE", None)
    else:
        os.environ["JEI_EDGE_ENGINE_CACHE"] = old


def _build(tmp: Path, family: str, target: str, precision: str, name: str = None, **kw):
    from jei_edge.compile import BuildOptions, build_bundle

    ckpt = tmp / f"{family}.pt"
    if not ckpt.exists():
        save_spread(ckpt, family)
    out = tmp / (name or f"{family}-{target}-{precision}.jei")
    opts = dict(target=target, precision=precision, parity_samples=300, stage_samples=64, force=True)
    if precision == "int8":
        opts.update(data=DATA, min_agreement=0.0)
    opts.update(kw)
    return out, build_bundle(ckpt, out, BuildOptions(**opts))


@pytest.fixture(scope="module")
def builds(tmp_path_factory, cache_dir):
    """Every (family, target, precision) built once: {key: (bundle path, report)}."""
    tmp = tmp_path_factory.mktemp("rtx")
    return {(f, t, p): _build(tmp, f, t, p)
            for f in ("vit", "resnet") for t in TARGETS for p in ("fp32", "fp16", "int8")}


_LAYER_TYPE = {"fp32": "float", "fp16": "half", "int8": "int8"}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_every_stage_has_an_engine(builds, family, target, precision):
    path, report = builds[(family, target, precision)]
    b = Bundle.open(path)  # sha256 of every file, engines included
    m = b.manifest
    low = m.lowering
    assert (low.backend, low.precision, low.compute_capability, low.profile) == \
        ("tensorrt_rtx", precision, TARGETS[target], (1, 8, 256))
    assert low.int8 == ("qdq" if precision == "int8" else None) and low.toolchain == ("1.7",)
    assert report["lowering"]["engines"] == len(m.stages) == len(report["lowering"]["stages"])
    for s, row in zip(m.stages, report["lowering"]["stages"]):
        (e,) = s.engines
        assert (e.backend, e.toolchain, e.compute_capability, e.precision, e.profile) == \
            ("tensorrt_rtx", trt.__version__, TARGETS[target], precision, (1, 8, 256))
        assert e.file in m.files and b.file(e.file).stat().st_size == row["bytes"] > 100_000
        if not row["cached"]:  # the parsed network computes in the precision asked for
            assert row["layers"].get(_LAYER_TYPE[precision], 0) > 0
    assert "engines" in (path / "report.txt").read_text()
    assert any("not run here" in n for n in report["notes"])  # verified on the graphs, and says so
    assert not any(".building-" in n for n in report["notes"])  # naming the bundle, not its staging directory
    if precision == "int8":  # the floor (0) holds fully quantized: every engine INT8
        fb = report["quantization"]["fallback"]
        assert fb["mode"] == "auto" and fb["fp32_stages"] == []
        assert {e.precision for s in m.stages for e in s.engines} == {"int8"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_merged_stages_build_engines(tmp_path_factory, cache_dir, precision):
    """A --plan bundle for an RTX target: one engine per merged stage (the CUDA exit kernel decides a
    merged stage's gates in order); --plan auto is refused for GPU targets (it times on this CPU)."""
    tmp = tmp_path_factory.mktemp("merged")
    path, report = _build(tmp, "vit", "rtx-ada", precision, plan="0-1,2-3")
    m = Bundle.open(path).manifest
    assert [s.exits for s in m.stages] == [(0, 1), (2, 3)] and all(s.merged for s in m.stages)
    assert report["lowering"]["engines"] == 2 and all(len(s.engines) == 1 for s in m.stages)
    for s in m.stages:  # what the engines were built from: the exit path stays FP32 in either precision
        assert s.output("probs").shape == (2, m.num_classes) and s.output("probs").dtype == "float32"
        assert s.output("gate").dtype == "float32"
    assert m.stages[1].output("gate").shape == (1,) and m.stages[0].output("gate").shape == (2,)
    with pytest.raises(BuildError, match="--plan auto times the stages with onnxruntime on this CPU"):
        _build(tmp, "vit", "rtx-ada", precision, name="auto.jei", plan="auto")
    assert not (tmp / "auto.jei").exists()


def test_a_second_build_reuses_every_engine(builds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("again")
    first_path, first = builds[("vit", "rtx-ada", "fp16")]
    path, report = _build(tmp, "vit", "rtx-ada", "fp16")
    rows = report["lowering"]["stages"]
    assert all(r["cached"] for r in rows) and report["lowering"]["cache"]["misses"] == 0
    a, b = Bundle.open(first_path), Bundle.open(path)
    for sa, sb in zip(a.manifest.stages, b.manifest.stages):
        assert a.file(sa.engines[0].file).read_bytes() == b.file(sb.engines[0].file).read_bytes()


def test_fp16_stage_graphs_keep_the_exit_path_in_fp32(builds):
    import onnx

    path, _ = builds[("vit", "rtx-ampere", "fp16")]
    m = Bundle.open(path).manifest
    types = {t.name: t.dtype for s in m.stages for t in s.inputs + s.outputs}
    assert types == {"x": "float32", "hidden_in": "float16", "hidden_out": "float16", "probs": "float32",
                     "gate": "float32"}
    g = onnx.load(str(path / m.stages[0].file)).graph
    # the input guard sums the float32 input itself; the network computes on a float16 cast of it
    readers = [n for n in g.node if "x" in n.input]
    assert {n.op_type for n in readers} >= {"Cast", "ReduceSum"} or {n.op_type for n in readers} >= {"Cast", "Flatten"}
    assert any(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16 for n in readers)
    assert not any(n.op_type in ("MatMul", "Gemm") and "gates" in n.name for n in g.node)  # gate: multiply-add


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_fp16_input_guard_still_catches_non_finite_inputs(builds, value):
    from jei_edge.errors import InputError
    from jei_edge.runtime import Runtime

    import onnxruntime as ort

    path, _ = builds[("resnet", "rtx-ampere", "fp16")]
    stage0 = Bundle.open(path).manifest.stages[0]
    assert stage0.input_guard
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    x[1, 0, 0, 0] = 60000.0  # large but finite (and within FP16's range): not flagged
    sess = ort.InferenceSession(str(path / stage0.file), providers=["CPUExecutionProvider"])
    assert np.isfinite(sess.run(["gate"], {"x": x})[0]).all()
    with Runtime.load(path, device="cpu") as rt:  # the FP16 stage graphs through onnxruntime
        assert np.isfinite(rt.run(x).probs).all()
        x[3, 0, 2, 5] = value
        gate = sess.run(["gate"], {"x": x})[0]  # the graph's own guard: NaN on that row only
        assert np.isnan(gate[3]) and np.isfinite(np.delete(gate, 3)).all()
        with pytest.raises(InputError, match=r"NaN or infinite values in 1 row\(s\) \(rows 3\)"):
            rt.run(x)


def test_turing_builds_fp16_and_refuses_what_it_cannot(tmp_path, cache_dir):
    path, report = _build(tmp_path, "vit", "rtx-turing", "fp16")
    assert all(s.engines[0].compute_capability == "7.5" for s in Bundle.open(path).manifest.stages)
    for precision in ("fp32", "int8"):
        with pytest.raises(BuildError, match=f"precision '{precision}' is not available for target 'rtx-turing'"):
            _build(tmp_path, "vit", "rtx-turing", precision)
    assert not (tmp_path / "vit-rtx-turing-fp32.jei").exists()


_cli = cli_blocked


def test_jetson_path_host_build_then_lower_on_the_board(tmp_path, cache_dir):
    path, report = _build(tmp_path, "resnet", "orin-nx-jp6", "fp16")
    m = Bundle.open(path).manifest
    assert m.lowering.backend == "tensorrt" and m.lowering.compute_capability == "8.7"
    assert not any(s.engines for s in m.stages) and report["lowering"]["engines"] == 0
    assert "jei-edge lower" in report["lowering"]["note"]
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}

    # no TensorRT here: the board's command says where it comes from, and leaves the bundle as it was
    r = _cli("lower", str(path))
    assert r.returncode != 0 and "TensorRT comes with JetPack" in r.stderr and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before

    # TensorRT-RTX stands in for JetPack's TensorRT: same lowering code, torch and onnx(runtime) blocked
    r = _cli("lower", str(path), "--toolchain", "tensorrt_rtx", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["lowering"]["engines"] == 3 and "stood in" in out["lowering"]["note"]
    assert out["verify"] is None and "onnxruntime" in out["note"]  # nothing here can verify it
    b = Bundle.open(path)  # rewritten atomically, every file hashed
    assert all(s.engines[0].backend == "tensorrt_rtx" and s.engines[0].compute_capability == "8.6"
               for s in b.manifest.stages)
    assert "stood in" in (path / "report.txt").read_text()

    # verify refuses to run engines it cannot run here, naming why and what to do
    r = _cli("verify", str(path), block=("torch",))
    assert r.returncode == 2 and "standing in for the target's tensorrt" in r.stderr
    assert "jei-edge lower" in r.stderr and "Traceback" not in r.stderr
    r = _cli("lower", str(path), "--toolchain", "tensorrt_rtx")  # engines present: --force to rebuild
    assert r.returncode == 2 and "--force" in r.stderr


def test_rtx_bundle_verify_says_why_it_cannot_run_engines_here(builds):
    from tests.runtime.helpers import has_cuda_driver

    if has_cuda_driver():
        pytest.skip("a CUDA driver is present: the refusal tested here is for machines without one")
    path, _ = builds[("vit", "rtx-ada", "fp16")]
    r = _cli("verify", str(path), block=("torch",))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "compute capability 8.9" in r.stderr and "--device cpu" in r.stderr
    r = _cli("verify", str(path), "--device", "cpu", block=("torch",))
    assert r.returncode == 0 and "(fp16)" in r.stdout


def test_engines_from_another_toolchain_version_are_refused(builds, tmp_path):
    import shutil

    from jei_edge.runtime import Runtime

    src, _ = builds[("resnet", "rtx-ampere", "fp32")]
    path = tmp_path / "old.jei"
    shutil.copytree(src, path)
    raw = json.loads((path / "manifest.json").read_text())
    for s in raw["stages"]:
        s["engines"][0]["toolchain"] = "1.6.0.28"
    (path / "manifest.json").write_text(json.dumps(raw))
    rehash(path)
    with pytest.raises(BundleError, match=r"built by tensorrt_rtx 1\.6\.0\.28, this machine has 1\.7.*do not cross"):
        Runtime.load(path)
    r = _cli("run", str(path), "nothing.npy", block=("torch",))
    assert r.returncode == 2 and "1.6.0.28" in r.stderr and f"jei-edge lower {path} --force" in r.stderr
    # the rebuild command it names works, torch-free
    r = _cli("lower", str(path), "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert {s.engines[0].toolchain for s in Bundle.open(path).manifest.stages} == {trt.__version__}


def test_int8_fallback_builds_fp32_engines_for_the_stages_it_keeps(tmp_path_factory, cache_dir, capsys):
    """The spread ViT's symmetric INT8 stages keep 96.1% of the calibration inputs' decisions: at a
    floor of 0.96 the fallback keeps stage(s) in FP32, whose engines are then FP32 (strongly typed:
    no int8 layer), the others INT8; the manifest and `inspect` say so."""
    from jei_edge.cli import main as cli_main

    path, report = _build(tmp_path_factory.mktemp("fallback"), "vit", "rtx-ada", "int8", min_agreement=0.96)
    kept = report["quantization"]["fallback"]["fp32_stages"]
    assert kept and report["lowering"]["precision"] == "int8"
    m = Bundle.open(path).manifest
    for s, row in zip(m.stages, report["lowering"]["stages"]):
        (e,) = s.engines
        want = "fp32" if s.index in kept else "int8"
        assert e.precision == row["precision"] == want and e.file.endswith(f".{want}.engine")
        if not row["cached"]:
            assert (row["layers"].get("int8", 0) > 0) == (want == "int8"), row["layers"]
    capsys.readouterr()
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"(stage(s) {', '.join(map(str, kept))}: fp32)" in out and "kept in FP32" in out


def test_lowering_plan_and_engines_must_agree(builds, tmp_path):
    from jei_edge.bundle import parse_manifest

    path, _ = builds[("vit", "rtx-ada", "fp32")]
    raw = json.loads((path / "manifest.json").read_text())
    bad = json.loads(json.dumps(raw))
    bad["stages"][1]["engines"][0]["precision"] = "fp16"
    with pytest.raises(BundleError, match="stage 1's engine .* is fp16"):
        parse_manifest(bad)
    # an INT8 plan accepts an FP32 engine (a stage the fallback kept FP32), nothing else
    raw8 = json.loads((builds[("vit", "rtx-ada", "int8")][0] / "manifest.json").read_text())
    ok = json.loads(json.dumps(raw8))
    ok["stages"][1]["engines"][0]["precision"] = "fp32"
    parse_manifest(ok)
    bad = json.loads(json.dumps(raw8))
    bad["stages"][1]["engines"][0]["precision"] = "fp16"
    with pytest.raises(BundleError, match=r"stage 1's engine .* is fp16 .*not the plan's int8 .*\(or fp32 for a stage"):
        parse_manifest(bad)
    bad = json.loads(json.dumps(raw))
    bad["stages"][2]["engines"] = []
    with pytest.raises(BundleError, match=r"engines for every stage; stages \[2\] have none"):
        parse_manifest(bad)
    bad = json.loads(json.dumps(raw))
    bad["lowering"] = None
    with pytest.raises(BundleError, match="lowering.*must describe how"):
        parse_manifest(bad)
    bad = json.loads(json.dumps(raw))
    bad["lowering"]["backend"] = "tensorrt"
    with pytest.raises(BundleError, match="must be the target's backend 'tensorrt_rtx'"):
        parse_manifest(bad)


def test_lower_refuses_bundles_without_engines_to_build(tmp_path, cache_dir):
    from jei_edge.compile.lower import lower_existing

    path, _ = _build(tmp_path, "resnet", "cpu", "fp32")
    with pytest.raises(BuildError, match="target 'cpu' .*no engines to build"):
        lower_existing(path)
    r = _cli("lower", str(tmp_path / "missing.jei"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
