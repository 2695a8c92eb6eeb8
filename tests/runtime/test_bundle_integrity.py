"""Runtime.load refuses damaged, altered, escaping or incompatible bundles with a clear BundleError."""

import json
import os
import shutil

import numpy as np
import pytest

from jei_edge.errors import BundleError, JeiEdgeError
from jei_edge.runtime import Bundle, Runtime
from jei_edge.bundle import MANIFEST
from jei_edge.bundle.onnx_scan import scan_onnx_bytes, scan_onnx_file
from tests.runtime.helpers import model_inputs, rehash


@pytest.fixture
def copy(vit_bundle, tmp_path):
    dst = tmp_path / "b.jei"
    shutil.copytree(vit_bundle, dst)
    return dst


def _manifest(b):
    return json.loads((b / MANIFEST).read_text())


def _write_manifest(b, m):
    (b / MANIFEST).write_text(json.dumps(m))


def test_intact_copy_loads_and_runs(copy):
    rt = Runtime.load(copy)
    assert rt.run(model_inputs(3)).probs.shape == (3, 5)
    assert Bundle.open(copy).verify() == []


def test_altered_file(copy):
    p = copy / "stages" / "stage1.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"stages/stage1.onnx' does not match its sha256"):
        Runtime.load(copy)


def test_truncated_missing_and_extra_files(copy):
    (copy / "plain.onnx").write_bytes(b"")
    with pytest.raises(BundleError, match="plain.onnx' has size 0"):
        Runtime.load(copy)
    (copy / "plain.onnx").unlink()
    with pytest.raises(BundleError, match="plain.onnx' listed in the manifest is missing"):
        Runtime.load(copy)


def test_unlisted_file(copy):
    (copy / "stages" / "evil.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="evil.onnx' is in the bundle but not in its manifest"):
        Runtime.load(copy)


@pytest.mark.parametrize("version,match", [(99, "schema version 99; this jei-edge reads up to 2"),
                                           (0, "'schema_version' must be an integer in \\[1, 2\\]"),
                                           ("1", "'schema_version' must be an integer")])
def test_schema_version(copy, version, match):
    m = _manifest(copy)
    m["schema_version"] = version
    _write_manifest(copy, m)
    with pytest.raises(BundleError, match=match):
        Runtime.load(copy)


def test_not_a_bundle(tmp_path, copy):
    with pytest.raises(BundleError, match="does not exist"):
        Runtime.load(tmp_path / "nope.jei")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        Runtime.load(tmp_path / "file")
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Runtime.load(copy)
    (copy / MANIFEST).write_text(json.dumps({"schema": "other"}))
    with pytest.raises(BundleError, match="schema tag missing"):
        Runtime.load(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match="has no manifest.json"):
        Runtime.load(copy)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd", "stages/../../x", "a\\b", "./plain.onnx", ""])
def test_paths_escaping_the_bundle(copy, bad):
    m = _manifest(copy)
    m["files"][bad] = {"sha256": "0" * 64, "size": 1}
    _write_manifest(copy, m)
    with pytest.raises(BundleError, match="path|leaves the bundle|absolute"):
        Runtime.load(copy)


def test_stage_reference_not_listed(copy):
    m = _manifest(copy)
    m["stages"][0]["file"] = "stages/other.onnx"
    _write_manifest(copy, m)
    with pytest.raises(BundleError, match="refers to 'stages/other.onnx', which is not in its file list"):
        Runtime.load(copy)


def test_symlink_out_of_the_bundle(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(copy / "stages" / "stage2.onnx", outside)
    (copy / "stages" / "stage2.onnx").unlink()
    os.symlink(outside, copy / "stages" / "stage2.onnx")
    with pytest.raises(BundleError, match="outside the bundle"):
        Runtime.load(copy)


def _with_external_data(copy, location):
    """Rewrite stage 0 so its largest initializer lives in external data at ``location``."""
    import onnx

    path = copy / "stages" / "stage0.onnx"
    model = onnx.load(str(path))
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = big.raw_data
    big.ClearField("raw_data")
    big.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        e = big.external_data.add()
        e.key, e.value = k, v
    onnx.save(model, str(path))
    return data


def test_external_data_outside_the_bundle(copy, tmp_path):
    data = _with_external_data(copy, "../../leak.bin")
    (tmp_path / "leak.bin").write_bytes(data)
    rehash(copy)
    with pytest.raises(BundleError, match=r"external data of 'stages/stage0.onnx'.*leaves the bundle"):
        Runtime.load(copy)


def test_external_data_inside_the_bundle_must_be_listed(copy):
    data = _with_external_data(copy, "weights.bin")
    (copy / "stages" / "weights.bin").write_bytes(data)
    m = _manifest(copy)
    rehash(copy, exclude={"stages/weights.bin"})
    with pytest.raises(BundleError):
        Runtime.load(copy)
    rehash(copy)
    rt = Runtime.load(copy)  # listed and hashed: fine
    assert rt.run(model_inputs(2)).probs.shape == (2, 5)
    assert m["schema"]


def test_unloadable_opset_gives_a_clear_error(copy):
    import onnx

    path = copy / "stages" / "stage1.onnx"
    model = onnx.load(str(path))
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 99
    onnx.save(model, str(path))
    rehash(copy)
    with pytest.raises(BundleError, match=r"stage 1 .*cannot be loaded by onnxruntime .*opset 99.*built with onnxruntime"):
        Runtime.load(copy)


def test_onnx_scan_matches_onnx(vit_bundle, copy, tmp_path):
    import onnx

    p = vit_bundle / "stages" / "stage0.onnx"
    info = scan_onnx_file(p)
    model = onnx.load(str(p))
    assert info.ir_version == model.ir_version
    assert info.opset == {o.domain: o.version for o in model.opset_import}[""]
    assert info.external_locations == []
    # the main graph's nodes, in file order, with their wiring (subgraph nodes are not listed)
    assert [(n.op_type, n.domain, list(n.inputs), list(n.outputs)) for n in info.nodes] == \
        [(n.op_type, n.domain, list(n.input), list(n.output)) for n in model.graph.node]
    _with_external_data(copy, "w.bin")
    assert scan_onnx_file(copy / "stages" / "stage0.onnx").external_locations == ["w.bin"]
    with pytest.raises(ValueError):
        scan_onnx_bytes(b"\x0a\xff\xff\xff")  # a length running past the end


def test_verify_lists_every_problem(copy):
    (copy / "report.txt").write_text("edited")
    (copy / "extra").write_text("x")
    problems = Bundle.open(copy, verify=False).verify()
    assert any("report.txt" in p for p in problems) and any("'extra'" in p for p in problems)
    with pytest.raises(BundleError, match=r"and 1 more problem"):
        Bundle.open(copy)


def test_runtime_settings_from_options(vit_bundle):
    x = model_inputs(20)
    ref = Runtime.load(vit_bundle).run(x)
    for opts in ({"io_binding": False}, {"allow_spinning": False}, {"spin_after_run": True}, {"intra_op_threads": 1}):
        res = Runtime.load(vit_bundle, **opts).run(x)
        assert np.array_equal(res.exit_index, ref.exit_index) and np.abs(res.probs - ref.probs).max() < 1e-6
    with pytest.raises(JeiEdgeError, match="unknown onnxruntime option"):
        Runtime.load(vit_bundle, threads=2)
    with pytest.raises(JeiEdgeError, match="must be true/false"):
        Runtime.load(vit_bundle, io_binding="yes")
    with pytest.raises(JeiEdgeError, match="device must be"):
        Runtime.load(vit_bundle, device="tpu")


def _spy_runs(sessions, record) -> None:
    """Route each session's ``run_with_iobinding`` through ``record(stage index)`` first
    (InferenceSession instances accept attribute assignment)."""
    for k, s in enumerate(sessions):
        def spy(b, _run=s.run_with_iobinding, _k=k):
            record(_k)
            return _run(b)

        s.run_with_iobinding = spy


def _live_rows(ex) -> list:
    """The live-row count of every later ``execute`` call of executor ``ex``, in order."""
    seen, orig = [], ex.execute

    def execute(k, n, ws):
        seen.append(n)
        return orig(k, n, ws)

    ex.execute = execute
    return seen


def test_small_batch_sessions_take_the_small_live_sets(vit_bundle):
    """With small_batch_rows, stage runs on <= that many live rows go to the 1-thread sessions,
    larger ones to the main sessions, and results are the same as without them."""
    x = model_inputs(24)
    ref = Runtime.load(vit_bundle).run(x)
    rt = Runtime.load(vit_bundle, intra_op_threads=2, small_batch_rows=4)
    ex = rt.executor
    assert ex.small_sessions is not None and len(ex.small_sessions) == ex.num_stages
    calls = {"main": [], "small": []}
    for name, sessions in (("main", ex.sessions), ("small", ex.small_sessions)):
        _spy_runs(sessions, calls[name].append)
    seen_n = _live_rows(ex)
    res = rt.run(x)
    one = [rt.run(x[i:i + 1]) for i in range(3)]
    assert np.array_equal(res.exit_index, ref.exit_index) and np.abs(res.probs - ref.probs).max() < 1e-6
    for i, r in enumerate(one):
        assert r.exit_index[0] == ref.exit_index[i] and np.abs(r.probs[0] - ref.probs[i]).max() < 1e-6
    assert len(calls["main"]) == sum(n > 4 for n in seen_n) and len(calls["small"]) == sum(n <= 4 for n in seen_n)
    assert calls["small"] and calls["main"]
    # off when it would change nothing
    assert Runtime.load(vit_bundle, intra_op_threads=1, small_batch_rows=4).executor.small_sessions is None
    assert Runtime.load(vit_bundle).executor.small_sessions is None


def test_row_workers_split_calls_over_threads_and_keep_results(vit_bundle):
    """With row_workers=2 a stage call on >= 2 live rows runs as two chunks, one on the calling
    thread and one on a pool thread, through the same one-thread session; exits and probabilities
    are those of whole calls, with and without IOBinding, and the plain backbone splits too."""
    import threading

    from jei_edge.profile.measure import Passes

    x = model_inputs(24)
    ref = Runtime.load(vit_bundle).run(x)
    rt = Runtime.load(vit_bundle, row_workers=2)
    ex = rt.executor
    assert ex.rows is not None and ex.small_sessions is None
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in ex.sessions)
    threads = []
    _spy_runs(ex.sessions, lambda k: threads.append(threading.current_thread().name))
    seen_n = _live_rows(ex)
    res = rt.run(x)
    assert np.array_equal(res.exit_index, ref.exit_index) and np.abs(res.probs - ref.probs).max() < 1e-5
    assert len(threads) == sum(min(2, n) for n in seen_n)
    assert threads.count("MainThread") == len(seen_n)
    assert any(t.startswith("jei-edge-rows") for t in threads)
    one = rt.run(x[:1])  # batch 1: one call on the calling thread
    assert one.exit_index[0] == ref.exit_index[0] and np.abs(one.probs[0] - ref.probs[0]).max() < 1e-5
    nob = Runtime.load(vit_bundle, row_workers=2, io_binding=False).run(x)
    assert np.array_equal(nob.exit_index, ref.exit_index) and np.abs(nob.probs - ref.probs).max() < 1e-5
    whole = Passes.for_runtime(Runtime.load(vit_bundle)).plain(x)[0]
    split = Passes.for_runtime(rt).plain(x)[0]
    assert split.shape == whole.shape and np.abs(split - whole).max() < 1e-5
    bad = x.copy()
    bad[-1].flat[0] = np.nan  # in the second chunk: the input check still names it
    with pytest.raises(JeiEdgeError, match=f"rows {len(x) - 1}"):
        rt.run(bad)
    rt.close()
    with pytest.raises(JeiEdgeError, match="row_workers=2 .* cannot be combined with intra_op_threads=2"):
        Runtime.load(vit_bundle, row_workers=2, intra_op_threads=2)
    with pytest.raises(JeiEdgeError, match="global_thread_pool=True"):
        Runtime.load(vit_bundle, row_workers=2, global_thread_pool=True)
    # with small-batch sessions the other way round: calls on one live row go to pool sessions
    both = Runtime.load(vit_bundle, row_workers=2, small_batch_rows=1, small_batch_threads=0)
    assert both.executor.small_sessions is not None
    assert all(s.get_session_options().intra_op_num_threads == 0 for s in both.executor.small_sessions)
    used = []
    _spy_runs(both.executor.small_sessions, lambda k: used.append(threading.current_thread().name))
    one = both.run(x[:1])
    assert used and set(used) == {"MainThread"} and np.abs(one.probs[0] - ref.probs[0]).max() < 1e-5
    many = both.run(x)
    assert np.array_equal(many.exit_index, ref.exit_index) and np.abs(many.probs - ref.probs).max() < 1e-5
