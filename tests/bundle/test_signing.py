"""Signed bundles: keys, signing, and the refusal of unsigned, foreign-key or altered bundles when a
public key is required (any byte of any file, the manifest included)."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

pytest.importorskip("cryptography", reason="cryptography is not installed (pip install 'jei-edge[sign]')")

from jei_edge.bundle.signing import SIGNATURE, keygen, sign  # noqa: E402
from jei_edge.errors import BundleError, InputError  # noqa: E402
from jei_edge.runtime import Runtime  # noqa: E402
from tests.runtime.helpers import cli_blocked, rehash  # noqa: E402


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return keygen(d / "release"), keygen(d / "other")


@pytest.fixture
def signed(vit_bundle, tmp_path, keys):
    path = tmp_path / "signed.jei"
    shutil.copytree(vit_bundle, path)
    sign(path, keys[0]["private"])
    return path


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys, tmp_path):
    mine, other = keys
    assert stat.S_IMODE(os.stat(mine["private"]).st_mode) == 0o600
    assert mine["fingerprint"] != other["fingerprint"]
    with pytest.raises(InputError, match="already exists"):
        keygen(mine["private"][:-4])


def test_a_signed_bundle_loads_with_its_key_and_unsigned_ones_still_load_without(signed, vit_bundle, keys):
    with Runtime.load(signed, public_key=keys[0]["public"]) as rt:
        assert rt.num_exits == 4
    with Runtime.load(vit_bundle):  # no key required: unsigned bundles keep working
        pass
    with pytest.raises(BundleError, match="is not signed, and a signature by key"):
        Runtime.load(vit_bundle, public_key=keys[0]["public"])
    with pytest.raises(BundleError, match=f"signed by key {keys[0]['fingerprint']}, not by the required key"):
        Runtime.load(signed, public_key=keys[1]["public"])


def test_any_byte_changed_anywhere_is_refused(signed, tmp_path, keys):
    files = sorted(p.relative_to(signed).as_posix() for p in signed.rglob("*") if p.is_file() and p.name != SIGNATURE)
    assert "manifest.json" in files and len(files) >= 8
    for i, rel in enumerate(files):
        for rewrite_manifest in (False, True):  # careless corruption, and a deliberate edit re-hashed
            if rel == "manifest.json" and rewrite_manifest:
                continue
            copy = tmp_path / f"c{i}{int(rewrite_manifest)}.jei"
            shutil.copytree(signed, copy)
            p = copy / rel
            if rel == "manifest.json":  # one character of a still-valid manifest (a field's value)
                text = p.read_text()
                p.write_text(text.replace('"created": "2', '"created": "3', 1))
                assert p.read_text() != text
            else:
                data = bytearray(p.read_bytes())
                data[len(data) // 2] ^= 0x01
                p.write_bytes(bytes(data))
            if rewrite_manifest:
                rehash(copy)
            want = "signature does not match" if rewrite_manifest or rel == "manifest.json" else "integrity check"
            with pytest.raises(BundleError, match=want):
                Runtime.load(copy, public_key=keys[0]["public"])
            shutil.rmtree(copy)


def test_bad_signature_files_and_keys_are_one_clear_line(signed, keys, tmp_path):
    (signed / SIGNATURE).write_text("{not json")
    with pytest.raises(BundleError, match="is not a jei-edge signature"):
        Runtime.load(signed, public_key=keys[0]["public"])
    bogus = tmp_path / "bogus.pub"
    bogus.write_text("hello")
    with pytest.raises(InputError, match="not an unencrypted PEM public key"):
        Runtime.load(signed, public_key=bogus)
    with pytest.raises(InputError, match="cannot read the public key"):
        Runtime.load(signed, public_key=tmp_path / "missing.pub")


def test_cli_sign_run_verify_and_the_environment_variable(vit_bundle, tmp_path, keys):
    import numpy as np

    path = tmp_path / "m.jei"
    shutil.copytree(vit_bundle, path)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).uniform(size=(5, 1, 8, 8)).astype(np.float32))
    r = cli_blocked("run", path, tmp_path / "x.npy", "--public-key", keys[0]["public"], block=("torch",))
    assert r.returncode == 2 and "is not signed" in r.stderr and "Traceback" not in r.stderr
    r = cli_blocked("sign", path, "--key", keys[0]["private"], "--json", block=("torch",))
    assert r.returncode == 0 and json.loads(r.stdout)["fingerprint"] == keys[0]["fingerprint"]
    r = cli_blocked("run", path, tmp_path / "x.npy", "--public-key", keys[0]["public"], block=("torch",))
    assert r.returncode == 0, r.stderr
    os.environ["JEI_EDGE_PUBLIC_KEY"] = keys[1]["public"]
    try:
        r = cli_blocked("verify", path, block=("torch",))
    finally:
        del os.environ["JEI_EDGE_PUBLIC_KEY"]
    assert r.returncode == 2 and "not by the required key" in r.stderr


def test_rewriting_a_bundle_drops_its_signature(signed, keys):
    from jei_edge.bundle import Bundle
    from jei_edge.profile.tune import write_deploy

    b = Bundle.open(signed)
    write_deploy(b, None)  # any rewrite (lower, tune) goes through a staging copy
    assert not (signed / SIGNATURE).exists()
    with pytest.raises(BundleError, match="is not signed"):
        Runtime.load(signed, public_key=keys[0]["public"])


def test_jei_edge_run_requires_the_signature_too(signed, vit_bundle, keys):
    import subprocess
    import sys

    run = [sys.executable, "-m", "jei_edge.runtime.cli"]
    r = subprocess.run(run + [str(vit_bundle), "-", "--public-key", keys[0]["public"]], input=b"",
                       capture_output=True, timeout=120)
    assert r.returncode == 2 and b"is not signed" in r.stderr and b"Traceback" not in r.stderr
    r = subprocess.run(run + [str(signed), "-", "--public-key", keys[0]["public"]], input=b"", capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_garbled_graph_in_a_rehashed_bundle_is_refused_for_its_signature(signed, tmp_path, keys):
    """With a key the signature is checked before any graph is parsed: a stage file replaced by bytes
    that are not ONNX, the manifest re-hashed to match, is refused as not signed by the key (not as
    an unreadable graph); without a key the same bundle fails its integrity check."""
    copy = tmp_path / "garbled.jei"
    shutil.copytree(signed, copy)
    (copy / "stages" / "stage0.onnx").write_bytes(b"\x0b" * 4096)
    rehash(copy)
    with pytest.raises(BundleError, match="signature does not match"):
        Runtime.load(copy, public_key=keys[0]["public"])
    with pytest.raises(BundleError, match="failed its integrity check: 'stages/stage0.onnx' is not a readable ONNX file"):
        Runtime.load(copy)
