"""Host logic of serving, without Triton: the per-request Handler and the repository writer."""

from __future__ import annotations

import numpy as np
import pytest

from jei_edge.errors import InputError, JeiEdgeError
from jei_edge.runtime import Runtime
from jei_edge.serve.handler import Handler, ModelSpec
from jei_edge.serve.repository import RepositoryOptions, config_text, write_repository
from tests.serve.conftest import samples


@pytest.fixture(scope="module")
def rt(serve_bundle):
    with Runtime.load(serve_bundle, device="cpu", intra_op_threads=1) as r:
        yield r


def test_answers_equal_runtime_run_per_request(rt):
    h = Handler(rt, ModelSpec("jei"))
    x = samples(40, seed=1)
    sizes = [1, 3, 1, 7, 12, 1, 15]
    reqs, start = [], 0
    for s in sizes:
        reqs.append({"x": x[start:start + s]})
        start += s
    answers, stats = h.handle(reqs)
    ref = rt.run(x)
    sets = rt.conformal_sets(ref, 0.05)
    got = {k: np.concatenate([a[k] for a in answers]) for k in answers[0]}
    assert [len(a["class"]) for a in answers] == sizes
    np.testing.assert_array_equal(got["class"][:, 0], ref.pred)
    np.testing.assert_array_equal(got["exit"][:, 0], ref.exit_index)
    np.testing.assert_allclose(got["probs"], ref.probs, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["conformal_set"], sets)
    np.testing.assert_allclose(got["cost"][:, 0], np.asarray(rt.manifest.exits.cost)[ref.exit_index], rtol=1e-6)
    assert len(set(ref.exit_index.tolist())) > 1, "the test bundle should spread exits"
    assert stats.samples == 40 and stats.rejected == 0
    assert stats.exit_counts == ref.exit_histogram(rt.num_exits)
    assert stats.cost_sum == pytest.approx(float(got["cost"].astype(np.float64).sum()))


def test_bad_requests_get_their_own_error_and_good_ones_are_answered(rt):
    h = Handler(rt, ModelSpec("jei"))
    x = samples(6, seed=2)
    nan = x[:2].copy()
    nan[1, 0, 3, 3] = np.nan
    reqs = [{"x": x[:2]}, {"x": nan}, {"x": x[2:3], "x_raw": x[2:3]}, {}, {"x": x[3:3]},
            {"x_raw": np.full((1, 1, 8, 8), 2.0, np.float32)}, {"x": x[3:6]}, {"x": x[0]}]
    answers, stats = h.handle(reqs)
    ref = rt.run(x)
    assert isinstance(answers[0], dict) and isinstance(answers[6], dict)
    np.testing.assert_array_equal(answers[0]["exit"][:, 0], ref.exit_index[:2])
    np.testing.assert_array_equal(answers[6]["class"][:, 0], ref.pred[3:6])
    msgs = [str(a) for a in answers if isinstance(a, InputError)]
    assert len(msgs) == 6 and stats.rejected == 6 and stats.samples == 5
    assert "NaN" in msgs[0] and "rows 1" in msgs[0]
    assert "x and x_raw" in msgs[1] and "neither" in msgs[2]
    assert "empty" in msgs[3]
    assert "outside the raw range" in msgs[4]
    assert "one sample without a batch axis" in msgs[5]


def test_raw_input_applies_the_bundle_preprocessing(rt):
    from jei_edge.data.transforms import raw_to_model

    h = Handler(rt, ModelSpec("jei"))
    raw = np.random.default_rng(3).random((9, 1, 8, 8)).astype(np.float32)
    (ans,), _ = h.handle([{"x_raw": raw}])
    ref = rt.run(raw_to_model(raw, rt.preprocessing))
    np.testing.assert_array_equal(ans["exit"][:, 0], ref.exit_index)
    np.testing.assert_allclose(ans["probs"], ref.probs, rtol=0, atol=1e-6)


def test_overflowing_request_is_refused_alone(rt):
    """A finite request on which stage 0 overflows fails the batched run; only it is refused."""
    h = Handler(rt, ModelSpec("jei"))
    x = samples(4, seed=4)
    huge = np.full((1, 1, 8, 8), 3e38, np.float32)
    answers, stats = h.handle([{"x": x[:2]}, {"x": huge}, {"x": x[2:]}])
    assert isinstance(answers[1], InputError) and "overflow" in str(answers[1])
    ref = rt.run(x)
    np.testing.assert_array_equal(np.concatenate([answers[0]["exit"], answers[2]["exit"]])[:, 0], ref.exit_index)
    assert stats.rejected == 1 and stats.samples == 4


def test_full_plain_and_offsets(rt):
    x = samples(20, seed=5)
    full, _ = Handler(rt, ModelSpec("f", mode="full")).handle([{"x": x}])
    ref = rt.run(x, mode="full")
    np.testing.assert_array_equal(full[0]["exit"][:, 0], ref.exit_index)
    assert (full[0]["exit"] == rt.num_exits - 1).all()
    (plain,), _ = Handler(rt, ModelSpec("p", mode="plain")).handle([{"x": x}])
    assert "conformal_set" not in plain and plain["probs"].shape == (20, 5)
    np.testing.assert_allclose(plain["probs"].sum(axis=1), 1.0, atol=1e-5)
    early, _ = Handler(rt, ModelSpec("e", offsets=(-0.3,))).handle([{"x": x}])
    ref = rt.run(x, offsets=(-0.3,) * rt.num_gates)
    np.testing.assert_array_equal(early[0]["exit"][:, 0], ref.exit_index)
    with pytest.raises(InputError, match="one value per gated exit"):
        Handler(rt, ModelSpec("e", offsets=(0.1, 0.2) + (0.0,) * rt.num_gates))
    with pytest.raises(InputError, match="mode"):
        Handler(rt, ModelSpec("e", mode="fast"))


def test_repository_layout_and_config(serve_bundle, tmp_path):
    opts = RepositoryOptions(modes=("exit", "full"), instances=2, max_queue_delay_us=250,
                             backend_options=("intra_op_threads=1",))
    out = write_repository(serve_bundle, tmp_path / "models", opts)
    assert sorted(p.name for p in out.iterdir()) == ["jei", "jei_full"]
    assert (out / "jei" / "1" / "model.jei" / "manifest.json").is_file()
    assert not (out / "jei_full" / "1" / "model.jei").exists()
    text = (out / "jei" / "config.pbtxt").read_text()
    for part in ('backend: "python"', "max_queue_delay_microseconds: 250", "count: 2 kind: KIND_CPU",
                 'name: "x" data_type: TYPE_FP32 dims: [ 1, 8, 8 ] optional: true',
                 'name: "conformal_set" data_type: TYPE_BOOL dims: [ 5 ]',
                 '{ key: "bundle" value: { string_value: "1/model.jei" } }'):
        assert part in text
    assert '"../jei/1/model.jei"' in (out / "jei_full" / "config.pbtxt").read_text()
    assert "TritonPythonModel" in (out / "jei" / "1" / "model.py").read_text()
    with pytest.raises(InputError, match="already exists"):
        write_repository(serve_bundle, out, opts)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("kw, match", [({"modes": ("exit", "fast")}, "distinct names"), ({"instances": 0}, "instances"),
                                        ({"name": "a b"}, "model name"), ({"max_batch_size": 0}, "max batch size"),
                                        ({"backend_options": ("threads",)}, "KEY=VALUE"),
                                        ({"backend_options": ("bogus=1",)}, "unknown onnxruntime option")])
def test_bad_repository_options_are_refused_before_writing(serve_bundle, tmp_path, kw, match):
    with pytest.raises(JeiEdgeError, match=match):
        write_repository(serve_bundle, tmp_path / "m", RepositoryOptions(**kw))
    assert not (tmp_path / "m").exists()


def test_config_parameters_round_trip():
    from jei_edge.serve.handler import Output
    from jei_edge.serve.model import spec_from_parameters

    spec = ModelSpec("jei", mode="exit", offsets=(-0.1, 0.05), use_deploy=False, alpha=0.1)
    text = config_text(spec, RepositoryOptions(), "1/model.jei", (1, 8, 8), [Output("class", "int64", (1,))])
    params = dict(line.split('"')[1::2][:2] for line in text.splitlines() if "key:" in line)
    assert spec_from_parameters("jei", params) == spec


def test_serving_modules_import_neither_torch_nor_triton():
    """The serving code runs in .venv-serve (no torch); tritonclient/pytriton load only when used."""
    import subprocess
    import sys

    code = ("import sys; import jei_edge.serve.handler, jei_edge.serve.model, jei_edge.serve.repository, "
            "jei_edge.serve.server, jei_edge.serve.client, jei_edge.cli.serve_cmd, jei_edge.cli.export_cmd; "
            "bad = [m for m in ('torch', 'tensorrt', 'tritonclient', 'pytriton') if m in sys.modules]; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
