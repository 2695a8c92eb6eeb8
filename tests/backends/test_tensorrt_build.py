"""Real TensorRT-RTX engine builds on the CPU-only host (no GPU needed to build ahead of time).

Builds every stage of a small ViT and ResNet bundle for two RTX compute capabilities, checks the
engine cache, and the clear errors for what the toolchain or graph cannot do. Running the engines
needs a GPU TensorRT-RTX supports (not this host, not the Hopper GPUs we can borrow)."""

from __future__ import annotations

import pytest

from jei_edge.errors import BuildError

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install 'jei-edge[rtx]')")

from jei_edge.backends.tensorrt.builder import EngineCache, EngineRequest, build_engine  # noqa: E402


@pytest.fixture(scope="module")
def stage_graphs(tmp_path_factory):
    """``family -> stage graph files`` exported as for an engine target: standard ONNX ops only (a
    ``cpu`` FP32 bundle's graphs run self-attention on onnxruntime's contrib Attention kernel)."""
    import torch

    from jei_edge.compile.export import _export
    from tests.runtime.helpers import model_inputs, spread_model

    out = {}
    for family in ("vit", "resnet"):
        model = spread_model(family)
        model.requires_grad_(False)
        h, files, n = torch.from_numpy(model_inputs(2)), [], len(model.stage_ranges())
        for k in range(n):
            last = k == n - 1
            path = tmp_path_factory.mktemp(family) / f"stage{k}.onnx"
            with torch.no_grad():
                _export(model.stage(k).eval(), h, path, "x" if k == 0 else "hidden_in",
                        ("probs",) if last else ("hidden_out", "probs", "gate"), 17, f"stage {k}")
                if not last:
                    h = model.stage(k).eval()(h)[0]
            files.append(path)
        out[family] = files
    return out


def _requests(files, cc, precision="fp32"):
    return [EngineRequest(f, f"stage {k}", (1, 8, 64), cc, precision) for k, f in enumerate(files)]


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_every_stage_builds_for_two_compute_capabilities_and_caches(stage_graphs, family, tmp_path):
    bundle = stage_graphs[family]
    cache = EngineCache(tmp_path / "cache")
    for cc in ("8.6", "8.9"):
        built = [build_engine(trt, r, "rtx-test", cache) for r in _requests(bundle, cc)]
        assert all(e.data[:4] and len(e.data) > 10_000 and not e.cached for e in built)
        assert all(e.layers.get("float", 0) > 0 for e in built)
    assert cache.misses == 2 * len(built) and cache.hits == 0
    again = [build_engine(trt, r, "rtx-test", cache) for r in _requests(bundle, "8.9")]
    assert all(e.cached for e in again) and cache.hits == len(again)
    assert [e.data for e in again] == [e.data for e in built]  # the same engine bytes come back
    other = build_engine(trt, _requests(bundle, "8.9")[0], "another-target", cache)
    assert not other.cached  # the key includes the target


def test_what_cannot_be_built_is_a_clear_error(stage_graphs, tmp_path):
    vit_bundle = stage_graphs["vit"]
    (req,) = _requests(vit_bundle, "7.5")[:1]
    with pytest.raises(BuildError, match=r"stage 0: tensorrt_rtx .* compute capability 7.5 in fp32.*FP32 GEMM"):
        build_engine(trt, req, "rtx-turing")
    with pytest.raises(BuildError, match="cannot build for compute capability 8.7.*it builds for 7.5, 8.0"):
        build_engine(trt, _requests(vit_bundle, "8.7")[0], "orin")
    with pytest.raises(BuildError, match="fp16 engine needs a fp16 stage graph"):
        build_engine(trt, _requests(vit_bundle, "8.9", "fp16")[0], "rtx-ada")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(BuildError, match="cannot parse 'bad.onnx'"):
        build_engine(trt, EngineRequest(bad, "stage 0", (1, 8, 64), "8.9"), "rtx-ada")


class _FakeTimingCache:
    """Test double of TensorRT's ITimingCache (host logic only; no TensorRT here)."""

    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return self.data + b"+timings"


class _FakeConfig:
    """Test double of an IBuilderConfig's timing-cache calls."""

    def __init__(self):
        self.created_from, self.set = None, None

    def create_timing_cache(self, data):
        self.created_from = data
        return _FakeTimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.set = (cache, ignore_mismatch)

    def get_timing_cache(self):
        return self.set[0]


def test_timing_cache_is_kept_between_full_tensorrt_builds(tmp_path):
    import types

    from jei_edge.backends.tensorrt.builder import timing_cache

    cache = EngineCache(tmp_path)
    fake_trt = types.SimpleNamespace(__name__="tensorrt")  # stands in for JetPack's module
    first = _FakeConfig()
    timing_cache(fake_trt, first, cache, "10.3.0.30")()
    assert first.created_from == b"" and first.set[1] is False
    second = _FakeConfig()
    timing_cache(fake_trt, second, cache, "10.3.0.30")()
    assert second.created_from == b"+timings"  # the first build's timings, read back
    assert timing_cache(fake_trt, _FakeConfig(), None, "10.3.0.30") is None  # no cache, no timing cache
    # TensorRT-RTX: its timing cache is a no-op, never attached
    assert timing_cache(trt, _FakeConfig(), cache, trt.__version__) is None


def test_engine_host_code_is_never_allowed():
    from pathlib import Path

    import jei_edge

    root = Path(jei_edge.__file__).parent
    uses = [p for p in root.rglob("*.py") for line in p.read_text().splitlines()
            if "engine_host_code_allowed" in line and not line.lstrip().startswith(("#", "\"", "'"))
            and "never" not in line]
    assert uses == []
