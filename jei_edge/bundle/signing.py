"""Signed bundles: Ed25519 over the manifest, which holds the sha256 of every other file.

The integrity check (sha256 list) detects corruption, not a deliberate edit: whoever edits a file
can rewrite the manifest too. A signature closes that: ``jei-edge sign BUNDLE --key KEY.pem``
writes ``manifest.sig`` (the only file a manifest does not list), an Ed25519 signature of the
exact bytes of ``manifest.json``. ``Runtime.load(..., public_key=...)`` (``jei-edge run
--public-key``, ``jei-edge-run --public-key``, ``jei-edge verify --public-key``) then checks it and
the sha256 of every file, so a byte changed anywhere, the manifest included, is refused.
Unsigned bundles keep working wherever no key is required.

Keys (``jei-edge keygen -o NAME``): ``NAME.pem`` (private, PKCS#8 PEM, mode 0600) and ``NAME.pub``
(public, PEM). Rewriting a bundle (``jei-edge lower``, ``jei-edge tune``) drops its signature:
sign it again. Needs ``cryptography`` (``pip install 'jei-edge[sign]'``), imported only here and
only when signing or checking.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Dict

from jei_edge._deps import require
from jei_edge.bundle.bundle import SIGNATURE
from jei_edge.errors import BundleError, InputError

FORMAT = "jei-edge/bundle-signature"
DOMAIN = b"jei-edge bundle manifest v1\n"  # signed message = DOMAIN + manifest bytes


def _crypto():
    require("cryptography", purpose="signing and checking bundle signatures")
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519, serialization, InvalidSignature


def fingerprint(raw_public: bytes) -> str:
    """A short, stable name of a public key: sha256 of its 32 raw bytes, first 16 hex digits."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _raw(public_key) -> bytes:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keygen(out_base) -> Dict[str, str]:
    """Write ``OUT.pem`` (private) and ``OUT.pub`` (public); refuses to overwrite either."""
    ed25519, serialization, _ = _crypto()
    base = Path(out_base)
    priv_path, pub_path = base.with_suffix(".pem"), base.with_suffix(".pub")
    for p in (priv_path, pub_path):
        if p.exists():
            raise InputError(f"key file '{p}' already exists", hint="choose another -o name (keys are never overwritten)")
    if not base.parent.is_dir() or not os.access(base.parent, os.W_OK):
        raise InputError(f"cannot write keys into '{base.parent}'", hint="choose a writable folder for -o")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(str(priv_path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    pub_path.write_bytes(pub)
    return {"private": str(priv_path), "public": str(pub_path), "fingerprint": fingerprint(_raw(key.public_key()))}


def _load_key(path, private: bool):
    ed25519, serialization, _ = _crypto()
    p = Path(path)
    what = "private" if private else "public"
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the {what} key '{p}': {exc.strerror}",
                         hint=f"give the {'NAME.pem' if private else 'NAME.pub'} file `jei-edge keygen` wrote") from None
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as exc:
        raise InputError(f"'{p}' is not an unencrypted PEM {what} key ({str(exc).split('.')[0]})",
                         hint=f"give the {'NAME.pem' if private else 'NAME.pub'} file `jei-edge keygen` wrote") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise InputError(f"'{p}' is not an Ed25519 {what} key", hint="make one with `jei-edge keygen`")
    return key


def sign(bundle_path, private_key) -> Dict[str, str]:
    """Check ``bundle_path``'s integrity, then write its ``manifest.sig`` (atomically)."""
    from jei_edge._io import atomic_write_bytes
    from jei_edge.bundle import MANIFEST, Bundle

    key = _load_key(private_key, private=True)
    bundle = Bundle.open(bundle_path)  # never sign a bundle that fails its own checks
    manifest = (Path(bundle.path) / MANIFEST).read_bytes()
    raw = _raw(key.public_key())
    record = {"format": FORMAT, "algorithm": "ed25519", "public_key": base64.b64encode(raw).decode(),
              "fingerprint": fingerprint(raw), "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
              "signature": base64.b64encode(key.sign(DOMAIN + manifest)).decode()}
    data = (json.dumps(record, indent=2) + "\n").encode()
    atomic_write_bytes(Path(bundle.path) / SIGNATURE, lambda f: f.write(data))
    return {"bundle": str(bundle.path), "fingerprint": record["fingerprint"]}


def verify_signature(bundle, public_key) -> str:
    """Raise a BundleError unless ``bundle`` carries a valid signature by ``public_key`` (a path);
    returns the key's fingerprint. The signature covers the manifest bytes only: check the files
    against the manifest (``Bundle.check_integrity``) after it."""
    from jei_edge.bundle import MANIFEST

    _, _, InvalidSignature = _crypto()
    key = _load_key(public_key, private=False)
    want = fingerprint(_raw(key))
    where = f"bundle '{bundle.path}'"
    sig_path = Path(bundle.path) / SIGNATURE
    if sig_path.is_symlink() or not sig_path.is_file():
        raise BundleError(f"{where} is not signed, and a signature by key {want} is required",
                          hint="sign it with `jei-edge sign BUNDLE --key KEY.pem` where it was built")
    try:
        if sig_path.stat().st_size > 64 << 10:
            raise ValueError("too large")
        record = json.loads(sig_path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT or record.get("algorithm") != "ed25519":
            raise ValueError("unknown format")
        signature = base64.b64decode(record["signature"], validate=True)
        signer = str(record.get("fingerprint", "?"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise BundleError(f"{where}: its {SIGNATURE} is not a jei-edge signature",
                          hint="sign it again with `jei-edge sign`") from None
    manifest = (Path(bundle.path) / MANIFEST).read_bytes()
    try:
        key.verify(signature, DOMAIN + manifest)
    except InvalidSignature:
        if signer != want:
            raise BundleError(f"{where} is signed by key {signer}, not by the required key {want}",
                              hint="use the public key of whoever signed it, or have it signed with yours") from None
        raise BundleError(f"{where}: the signature does not match its manifest (the bundle was changed after "
                          "it was signed)", hint="get the bundle again from its source, or sign it again") from None
    return want
