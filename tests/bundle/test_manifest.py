"""The typed manifest: every malformed manifest becomes a BundleError naming the field, never
another exception; a valid one round-trips; schema v1 bundles load through the same parser."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

from jei_edge.bundle import MANIFEST, Bundle, Manifest, parse_manifest
from jei_edge.bundle.manifest import SCHEMA_VERSION, decode_manifest
from jei_edge.errors import BundleError
from jei_edge.runtime import Runtime


@pytest.fixture(scope="module")
def raw(vit_bundle):
    return json.loads((vit_bundle / MANIFEST).read_text())


def _set(d, path, value):
    """``path`` like ``stages.2.inputs.0.shape.1``; ``value`` ... = delete the key."""
    *head, last = path.split(".") if not path.startswith("files.") else ["files", path[6:]]
    for p in head:
        d = d[int(p)] if isinstance(d, list) else d[p]
    last = int(last) if isinstance(d, list) else last
    if value is ...:
        del d[last]
    else:
        d[last] = value


# the malformed manifests a read of the old code found crashing with tracebacks, and their fields
CASES = [
    ("num_classes", "ten", "num_classes"),
    ("stages.1.inputs", ..., r"stages\[1\].inputs"),
    ("stages.0.outputs.0.shape.1", "17", r"stages\[0\].outputs\[0\].shape\[1\]"),
    ("stages", None, "'stages' must be a list"),
    ("target.max_batch", "lots", "target.max_batch"),
    ("stages.0.gates", [5], r"stages\[0\].gates"),
    ("stages.2.index", 7, r"stages\[2\].index"),
    ("stages.1.inputs.0.shape.1", 99, r"stages\[1\].inputs"),  # no longer matches stage 0's hidden_out
    ("stages.0.outputs.1.dtype", "float16", r"stages\[0\].outputs.*'probs' must be float32"),
    ("stages.0.file", "../../etc/passwd", r"stages\[0\].file.*leaves the bundle"),
    ("stages.0.file", "/etc/passwd", r"stages\[0\].file.*absolute"),
    ("exits.cost", [0.5], "exits.cost"),
    ("exits.qhat", [[0.1]], "exits.qhat"),
    ("precision", "fp8", "precision"),
    ("input.shape", ["batch", 1, 8], "input"),
    ("files", [], "'files' must be an object"),
    ("files.report.json", {"size": 3}, "sha256"),
    ("target.backend_options", [1], "backend_options"),
    ("class_names", ["a"], "class_names"),
    ("preprocessing.std", [0.0], r"preprocessing.std"),
    ("stages.0.outputs.0.shape.1", 10 ** 12, r"shape\[1\]"),
    ("stages.0.outputs.0.shape", ["batch"] + [4096] * 6, r"shape.*more than"),
    ("schema_version", 99, "schema version 99"),
    ("schema_version", "2", "schema_version"),
    ("stages.0.engines", [{"file": "e.plan", "backend": "tensorrt", "toolchain": "10.3", "compute_capability": "8.7",
                           "precision": "fp16", "profile": [4, 1, 8]}], r"engines\[0\].profile"),
    ("plan", json.loads("[" * 40 + "]" * 40), "nested deeper"),
    ("references", {"file": "reference/verify.npz", "samples": -1}, "references.samples"),
]


@pytest.mark.parametrize("path,value,match", CASES, ids=[c[0] + "=" + repr(c[1])[:20] for c in CASES])
def test_malformed_field_is_a_bundle_error_naming_it(raw, path, value, match):
    m = copy.deepcopy(raw)
    _set(m, path, value)
    with pytest.raises(BundleError, match=match):
        parse_manifest(m, "b.jei")


def test_deeply_nested_json_and_huge_files_are_bundle_errors():
    with pytest.raises(BundleError, match="nested too deeply|not valid JSON"):
        decode_manifest(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(BundleError, match="more than any real manifest"):
        decode_manifest(b" " * (17 << 20))
    with pytest.raises(BundleError, match="not valid JSON"):
        decode_manifest(b"\xff\xfe{")
    with pytest.raises(BundleError, match="not a jei-edge bundle manifest"):
        decode_manifest(b"[1, 2]")


def _fuzz(raw, rng):
    """One random corruption: delete a field, change its type, or make a number huge/negative."""
    m = copy.deepcopy(raw)
    paths = []

    def walk(d, prefix):
        items = d.items() if isinstance(d, dict) else enumerate(d)
        for k, v in items:
            p = f"{prefix}.{k}" if prefix else str(k)
            if p.startswith("files.") and p.count(".") > 1:
                continue  # file names contain dots: the fuzz addresses whole entries only
            paths.append(p)
            if isinstance(v, (dict, list)) and not p.startswith("files"):
                walk(v, p)

    walk(m, "")
    path = paths[rng.integers(len(paths))]
    kind = rng.integers(5)
    value = [..., "x", None, 10 ** 30, -7, [], {}, 1.5, True][rng.integers(9)] if kind else ...
    try:
        _set(m, path, value)
    except (KeyError, IndexError, TypeError):
        return None, path
    return m, f"{path}={value!r}"


def _fuzz_parse(raw, seed: int, count: int) -> int:
    """Parse ``count`` fuzzed copies of ``raw``: each gives a BundleError or a valid manifest,
    nothing else may escape (the point of the tests). Returns how many were refused."""
    rng = np.random.default_rng(seed)
    errors = 0
    for _ in range(count):
        m, what = _fuzz(raw, rng)
        if m is None:
            continue
        try:
            parse_manifest(m, "b.jei")
        except BundleError:
            errors += 1
        except Exception as exc:
            pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
    return errors


def test_fuzzed_manifests_give_bundle_error_or_a_valid_manifest(raw):
    assert _fuzz_parse(raw, 0, 3000) > 1000  # most corruptions are caught (the rest change informative fields)


def test_fuzzed_manifest_files_on_disk_never_crash_the_loader(vit_bundle, tmp_path, raw):
    """Through ``Runtime.load``: the CLI's one-line error path."""
    rng = np.random.default_rng(1)
    b = tmp_path / "b.jei"
    shutil.copytree(vit_bundle, b)
    for _ in range(40):
        m, what = _fuzz(raw, rng)
        if m is None:
            continue
        (b / MANIFEST).write_text(json.dumps(m))
        try:
            Runtime.load(b).close()
        except BundleError:
            pass
        except Exception as exc:
            pytest.fail(f"{what}: {type(exc).__name__}: {exc}")


def test_round_trip_and_typed_access(vit_bundle, raw):
    b = Bundle.open(vit_bundle)
    m = b.manifest
    assert isinstance(m, Manifest) and m.schema_version == SCHEMA_VERSION
    assert parse_manifest(m.to_dict(), "again") == m
    st = m.stages[0]
    assert st.input.name == "x" and st.hidden.shape == m.stages[1].input.shape and st.gated
    assert m.stages[-1].hidden is None and m.stage_gates[-1] == ()
    assert m.num_exits == len(m.exits.cost) == len(m.stages)


def test_schema_v1_loads_through_the_same_parser(vit_bundle, tmp_path, raw):
    """A v1 manifest (before the typed manifest: no engines/references, earliest builds without
    per-stage exits/gates) loads and runs like the v2 one."""
    v1 = copy.deepcopy(raw)
    v1["schema_version"] = 1
    for st in v1["stages"]:
        for key in ("engines", "exits", "gates", "gated"):
            st.pop(key, None)
    for key in ("references",):
        v1.pop(key, None)
    b = tmp_path / "v1.jei"
    shutil.copytree(vit_bundle, b)
    if raw.get("references"):
        (b / raw["references"]["file"]).unlink()
        v1["files"].pop(raw["references"]["file"])
    (b / MANIFEST).write_text(json.dumps(v1))
    m1 = Bundle.open(b).manifest
    assert m1.schema_version == 1 and [s.exits for s in m1.stages] == [s.exits for s in Bundle.open(vit_bundle).manifest.stages]
    x = np.random.default_rng(2).normal(size=(20,) + m1.input.shape).astype(np.float32)
    with Runtime.load(b) as r1, Runtime.load(vit_bundle) as r2:
        np.testing.assert_array_equal(r1.run(x).exit_index, r2.run(x).exit_index)


# -- quantized stage edges (INT8 bundles: uint8/int8 hidden states with one scale and zero point per edge)
def _quantized(raw, dtype="uint8", scale=0.05, zero_point=3):
    m = copy.deepcopy(raw)
    for k, st in enumerate(m["stages"]):
        for t in st["outputs"][:1] if st["outputs"][0]["name"] == "hidden_out" else []:
            t.update(dtype=dtype, scale=scale * (k + 1), zero_point=zero_point)
        if k:
            st["inputs"][0].update(dtype=dtype, scale=scale * k, zero_point=zero_point)
    return m


@pytest.fixture(scope="module")
def raw_q(raw):
    return _quantized(raw)


def test_quantized_edges_round_trip(raw_q):
    m = parse_manifest(raw_q, "q.jei")
    a, b = m.stages[0].hidden, m.stages[1].input
    assert (a.dtype, a.scale, a.zero_point, a.itemsize) == ("uint8", 0.05, 3, 1) and a.quantized and b == a.__class__(
        "hidden_in", a.shape, "uint8", 0.05, 3)
    assert not m.stages[0].input.quantized and m.stages[0].output("probs").scale is None
    assert parse_manifest(m.to_dict(), "again") == m
    assert parse_manifest(_quantized(raw_q, "int8", 0.5, -128), "s8").stages[1].input.zero_point == -128


QUANT_CASES = [
    ("stages.0.outputs.0.scale", ..., r"stages\[0\].outputs\[0\].scale' must be a finite number"),
    ("stages.1.inputs.0.zero_point", ..., r"stages\[1\].inputs\[0\].zero_point' must be an integer in \[0, 255\]"),
    ("stages.1.inputs.0.zero_point", 256, r"stages\[1\].inputs\[0\].zero_point' must be an integer in \[0, 255\]"),
    ("stages.1.inputs.0.zero_point", 2.5, r"stages\[1\].inputs\[0\].zero_point"),
    ("stages.0.outputs.0.scale", float("nan"), r"stages\[0\].outputs\[0\].scale"),
    ("stages.0.outputs.0.scale", -0.1, r"stages\[0\].outputs\[0\].scale"),
    ("stages.0.outputs.0.scale", 0, r"stages\[0\].outputs\[0\].scale"),
    ("stages.0.outputs.0.scale", True, r"stages\[0\].outputs\[0\].scale"),
    ("stages.0.outputs.0.scale", "0.05", r"stages\[0\].outputs\[0\].scale"),
    ("stages.1.inputs.0.scale", 0.07, r"stages\[1\].inputs\[0\].scale' and zero_point must equal stage 0's hidden_out"),
    ("stages.1.inputs.0.zero_point", 4, r"stages\[1\].inputs\[0\].scale' and zero_point must equal stage 0"),
    ("stages.0.outputs.1.scale", 0.1, r"stages\[0\].outputs\[1\].scale' is only allowed on a quantized tensor"),
    ("stages.0.inputs.0.zero_point", 0, r"stages\[0\].inputs\[0\].zero_point' is only allowed on a quantized"),
    ("stages.1.inputs.0.dtype", "float32", r"stages\[1\].inputs\[0\].scale' is only allowed"),
    ("stages.1.inputs.0.dtype", "int8", r"stages\[1\].inputs\[0\].zero_point|must match stage 0's hidden_out"),
]


@pytest.mark.parametrize("path,value,match", QUANT_CASES, ids=[c[0] + "=" + repr(c[1])[:20] for c in QUANT_CASES])
def test_malformed_quantized_edge_is_a_bundle_error_naming_it(raw_q, path, value, match):
    m = copy.deepcopy(raw_q)
    _set(m, path, value)
    with pytest.raises(BundleError, match=match):
        parse_manifest(m, "q.jei")


def test_quantized_hidden_state_needs_its_scale(raw):
    """A uint8/int8 hidden state without scale and zero point is refused (a float one needs none)."""
    for dtype in ("uint8", "int8"):
        m = copy.deepcopy(raw)
        m["stages"][0]["outputs"][0]["dtype"] = m["stages"][1]["inputs"][0]["dtype"] = dtype
        with pytest.raises(BundleError, match=rf"stages\[0\].outputs\[0\].scale' is required for a {dtype} hidden state"):
            parse_manifest(m, "q.jei")


def test_fuzzed_quantized_manifests_give_bundle_error_or_a_valid_manifest(raw_q):
    assert _fuzz_parse(raw_q, 7, 2000) > 600
