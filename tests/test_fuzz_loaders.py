"""Property-based fuzzing (hypothesis) of every loader of untrusted input: the bundle manifest,
.npy / .npz files and the stdin stream, image files, target and recipe TOML, checkpoint fields.

Property: the outcome is a result or a ``JeiEdgeError``, never another exception (no traceback
reaches a user). Profiles: ``default`` (every ``make test``: FAST examples per loader) and
``long`` (``HYPOTHESIS_PROFILE=long``, or the slow-marked variants: LONG examples). Each test
counts the examples it ran and checks that hypothesis really ran them.
"""

from __future__ import annotations

import copy
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install 'jei-edge[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jei_edge.errors import JeiEdgeError  # noqa: E402

FAST, LONG = 60, 1000
settings.register_profile("default", max_examples=FAST, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=LONG, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
PREP = {"input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25]}
RAN: dict = {}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _outcome(fn, *args):
    """Run a loader: a result or a JeiEdgeError are fine; anything else fails the property."""
    try:
        return fn(*args)
    except JeiEdgeError:
        return None


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _mutate(obj, paths, data, most: int) -> None:
    """Replace the values at 1..``most`` of ``paths`` (drawn) in ``obj`` by drawn JSON values."""
    for _ in range(data.draw(st.integers(1, most))):
        path = data.draw(st.sampled_from(paths))
        try:
            _set(obj, path, data.draw(json_values))
        except (KeyError, IndexError, TypeError):  # a path an earlier mutation replaced
            pass


# -- the manifest ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest_raw(vit_bundle):
    return json.loads((vit_bundle / "manifest.json").read_text())


@given(data=st.data())
def test_manifest_mutations(manifest_raw, data):
    from jei_edge.bundle import parse_manifest

    raw = copy.deepcopy(manifest_raw)
    _mutate(raw, list(_paths(raw)), data, 3)
    RAN["manifest"] = RAN.get("manifest", 0) + 1
    _outcome(parse_manifest, raw)


@given(blob=st.binary(max_size=300))
def test_manifest_bytes(blob):
    from jei_edge.bundle import decode_manifest

    RAN["manifest_bytes"] = RAN.get("manifest_bytes", 0) + 1
    _outcome(decode_manifest, blob)


# -- arrays: .npy / .npz files and the stdin stream --------------------------------------------
def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


npy_arrays = st.one_of(
    st.tuples(st.integers(0, 3), st.sampled_from(["<f4", "<f8", "<f2", "|u1", "<i8", "|b1", "<c8"]),
              st.integers(0, 9)).map(lambda t: np.zeros((t[0], 1, t[2] or 8, 8), dtype=t[1])),
    st.tuples(st.integers(0, 4), st.integers(0, 5)).map(lambda t: np.ones((t[0], t[1]), np.float32)))


@st.composite
def npy_bytes(draw):
    """Valid arrays, corrupted headers (huge shapes, bad dtypes, object arrays) and random tails."""
    data = bytearray(_npy(draw(npy_arrays)))
    how = draw(st.sampled_from(["keep", "header", "truncate", "flip", "huge"]))
    if how == "header":
        new = draw(st.sampled_from([b"{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
                                    b"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 1, 8, 8), }",
                                    b"{'descr': '<f4', 'fortran_order': True, 'shape': (-1,), }",
                                    b"{'descr': 'garbage', 'shape': (1,), }", b"not a dict at all",
                                    b"__import__('os').system('echo pwned')"]))
        hl = len(new) + 1
        hl += (-(10 + hl)) % 64
        data = bytearray(b"\x93NUMPY\x01\x00" + hl.to_bytes(2, "little") + new.ljust(hl - 1) + b"\n")
    elif how == "truncate" and len(data) > 1:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif how == "huge":
        data[8:10] = (0xFFFF).to_bytes(2, "little")  # header length far beyond the file
    return bytes(data)


@given(blob=npy_bytes())
def test_npy_files(blob):
    from jei_edge.runtime.inputs import load_inputs

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.npy"
        p.write_bytes(blob)
        RAN["npy"] = RAN.get("npy", 0) + 1
        _outcome(load_inputs, [str(p)], PREP)


@given(blobs=st.lists(npy_bytes(), min_size=1, max_size=3))
def test_npz_files(blobs):
    import zipfile

    from jei_edge.runtime.inputs import load_inputs

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.npz"
        with zipfile.ZipFile(p, "w") as z:
            for i, b in enumerate(blobs):
                z.writestr("x.npy" if i == 0 else f"a{i}.npy", b)
        RAN["npz"] = RAN.get("npz", 0) + 1
        _outcome(load_inputs, [str(p)], PREP)


@given(blobs=st.lists(npy_bytes(), min_size=1, max_size=3), tail=st.binary(max_size=20))
def test_stdin_stream(blobs, tail):
    from jei_edge.runtime.inputs import stream_npy

    RAN["stdin"] = RAN.get("stdin", 0) + 1
    _outcome(lambda: list(stream_npy(io.BytesIO(b"".join(blobs) + tail), PREP)))


# -- images ------------------------------------------------------------------------------------
@st.composite
def image_bytes(draw):
    from PIL import Image

    img = Image.new(draw(st.sampled_from(["L", "RGB", "RGBA", "P"])), (draw(st.integers(1, 12)),
                                                                     draw(st.integers(1, 12))))
    buf = io.BytesIO()
    img.save(buf, format=draw(st.sampled_from(["PNG", "BMP", "GIF"])))
    data = bytearray(buf.getvalue())
    how = draw(st.sampled_from(["keep", "truncate", "flip", "random"]))
    if how == "truncate" and len(data) > 1:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif how == "random":
        data = bytearray(draw(st.binary(max_size=200)))
    return bytes(data)


@given(blob=image_bytes(), ext=st.sampled_from([".png", ".jpg", ".bmp"]))
def test_image_files(blob, ext):
    pytest.importorskip("PIL")
    from jei_edge.runtime.inputs import load_inputs

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"img{ext}"
        p.write_bytes(blob)
        RAN["images"] = RAN.get("images", 0) + 1
        _outcome(load_inputs, [str(p)], PREP)


# -- target and recipe TOML --------------------------------------------------------------------
toml_values = st.one_of(st.integers(-10, 10**12), st.floats(allow_nan=False, allow_infinity=False),
                        st.booleans(), st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3),
                        st.lists(st.integers(-3, 300), max_size=3))


def _toml(d) -> str:
    out, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            out.append(f"{k} = {json.dumps(v)}")
    for k, v in tables:
        out.append(f"[{k}]")
        out += [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    return "\n".join(out) + "\n"


@given(fields=st.dictionaries(st.sampled_from(["name", "backend", "device", "precisions", "default_precision",
                                               "compute_capability", "description", "notes", "dla", "bogus"]),
                              toml_values, max_size=6),
       tables=st.dictionaries(st.sampled_from(["batch", "memory", "onnx", "toolchain", "onnxruntime", "tensorrt"]),
                              st.dictionaries(st.sampled_from(["min", "opt", "max", "device_mib", "workspace_mib",
                                                               "opset", "tensorrt", "x"]), toml_values, max_size=3),
                              max_size=3),
       raw=st.booleans(), junk=st.text(max_size=40))
def test_target_files(fields, tables, raw, junk):
    from jei_edge.runtime.targets import load_target

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.toml"
        p.write_text(junk if raw else _toml({**fields, **tables}))
        RAN["targets"] = RAN.get("targets", 0) + 1
        _outcome(load_target, str(p))


@given(fields=st.dictionaries(st.sampled_from(["name", "samples", "method", "percentile", "activations", "exclude",
                                               "ops", "data", "bogus"]), toml_values, max_size=6),
       raw=st.booleans(), junk=st.text(max_size=40))
def test_recipe_files(fields, raw, junk):
    from jei_edge.compile.quantize import load_recipe

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.toml"
        p.write_text(junk if raw else _toml(fields))
        RAN["recipes"] = RAN.get("recipes", 0) + 1
        _outcome(load_recipe, str(p))


# -- checkpoint fields ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint():
    from tests.runtime.helpers import spread_checkpoint

    return spread_checkpoint("vit")


@settings(max_examples=max(10, settings().max_examples // 3))
@given(data=st.data())
def test_checkpoint_fields(checkpoint, data):
    from jei_edge.model.checkpoint import model_from_checkpoint

    ck = {k: copy.deepcopy(v) for k, v in checkpoint.items() if k != "state_dict"}
    ck["state_dict"] = checkpoint["state_dict"]
    _mutate(ck, list(_paths({k: v for k, v in ck.items() if k != "state_dict"})), data, 2)
    RAN["checkpoints"] = RAN.get("checkpoints", 0) + 1
    _outcome(model_from_checkpoint, ck, "fuzzed checkpoint")


@settings(max_examples=max(10, settings().max_examples // 3))
@given(data=st.data())
def test_checkpoint_warmup_ims(checkpoint, data):
    """The optional warm-up IM weights: a wrong type, names, shapes or values is one clear error."""
    import torch

    from jei_edge.model.checkpoint import model_from_checkpoint, warmup_model

    ck = dict(checkpoint)
    ims = {k: v.clone() for k, v in checkpoint["state_dict"].items() if k.startswith("ims.")}
    kind = data.draw(st.sampled_from(["json", "key", "shape", "value", "dtype", "drop", "valid"]))
    name = data.draw(st.sampled_from(sorted(ims)))
    if kind == "json":
        ck["warmup_ims"] = data.draw(json_values)
    else:
        if kind == "key":
            ims[data.draw(st.text(max_size=12))] = ims.pop(name)
        elif kind == "shape":
            ims[name] = torch.zeros(data.draw(st.lists(st.integers(0, 4), max_size=3)))
        elif kind == "value":
            ims[name] = ims[name].clone().fill_(data.draw(st.sampled_from([float("nan"), float("inf"), 1e30])))
        elif kind == "dtype":
            ims[name] = ims[name].to(data.draw(st.sampled_from([torch.int64, torch.float16, torch.bool])))
        elif kind == "drop":
            ims.pop(name)
        ck["warmup_ims"] = ims
    RAN["checkpoints"] = RAN.get("checkpoints", 0) + 1
    model = _outcome(model_from_checkpoint, ck, "fuzzed checkpoint")
    if model is not None:
        _outcome(warmup_model, ck, model, "fuzzed checkpoint")


def test_every_loader_ran_its_examples():
    """Runs last in this file: each fuzzed loader really saw examples (the count is in -rP output)."""
    print("hypothesis examples per loader:", dict(sorted(RAN.items())))
    expected = {"manifest", "manifest_bytes", "npy", "npz", "stdin", "images", "targets", "recipes", "checkpoints"}
    missing = expected - set(RAN)
    if missing and len(RAN) < len(expected):
        pytest.skip(f"run with the whole file to count every loader (missing {sorted(missing)})")
    assert all(n >= 10 for n in RAN.values()), RAN
