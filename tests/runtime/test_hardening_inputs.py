"""Hostile and broken inputs through the CLIs: one ``error:`` line naming the file, exit code != 0,
no traceback, nothing on stdout, nothing allocated or decoded beyond the stated bounds.

Covers ``jei-edge run``, ``jei-edge-run`` (files and the stdin stream), ``jei-edge train --data``
(image folders), ``jei-edge inspect`` and ``jei-edge verify``; the image reader and the header-first
``.npy`` reader are also checked in-process (a small mutation fuzz, the bytes a stream gives up).
"""

import io
import os
import random
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npformat

ROOT = Path(__file__).resolve().parents[2]
JEI = ("-m", "jei_edge.cli")
EDGE = ("-m", "jei_edge.runtime.cli")


# -- helpers ---------------------------------------------------------------------------------------

def _cli(mod, *args, stdin=b"", env=None, prefix=(), timeout=60, **kw):
    return subprocess.run([*prefix, sys.executable, *mod, *map(str, args)], input=stdin, capture_output=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})}, **kw)


def _refused(proc, name, *, stdout_empty=True) -> str:
    """``proc`` failed cleanly: rc != 0, exactly one ``error:`` line naming ``name``, nothing else."""
    err = proc.stderr.decode()
    assert proc.returncode not in (0, None), err
    assert "Traceback" not in err and "Warning" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert str(name) in errors[0], err
    others = [line for line in err.splitlines()
              if line.strip() and not line.startswith(("error:", "  hint:", "jei-edge-run: "))]
    assert others == [], err
    assert "allow_pickle" not in err and "pickle.load" not in err, err
    if stdout_empty:
        assert proc.stdout == b"", proc.stdout[:200]
    return errors[0]


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _npy(arr, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A 70-byte PNG whose IHDR claims ``width x height`` gray pixels (a decompression bomb)."""
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 256))
            + chunk(b"IEND", b""))


def _image_folder(root: Path, first: bytes = None) -> Path:
    """root/<a|b>/<nn>.png, 12 tiny gray images per class; ``first`` replaces a/00.png."""
    for k, c in enumerate("ab"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            (root / c / f"{i:02d}.png").write_bytes(_png(np.full((8, 8), 40 + 150 * k, np.uint8)))
    if first is not None:
        (root / "a" / "00.png").write_bytes(first)
    return root


def _truncated_png() -> bytes:
    data = _png((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    return data[: len(data) // 2]


BAD_IMAGES = {
    "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2,  # PNG signature, then noise
    "truncated.png": None,  # filled in below (needs numpy)
    "text.jpg": b"this is a text file, not a JPEG\n",
    "bomb.png": _bomb_png(100_000, 100_000),  # over Pillow's own DecompressionBombError limit
    "bomb_warn.png": _bomb_png(10_000, 10_000),  # Pillow would only warn and decode 100 MB
}
BAD_IMAGES["truncated.png"] = _truncated_png()


# -- 1. images ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mod", [JEI + ("run",), EDGE], ids=["jei-edge-run-cmd", "jei-edge-run"])
@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_file_is_one_error(vit_bundle, tmp_path, mod, name):
    path = tmp_path / name
    path.write_bytes(BAD_IMAGES[name])
    line = _refused(_cli(mod, vit_bundle, path), path)
    if name.startswith("bomb"):
        assert "too large" in line and "67,108,864 pixels" in line


@pytest.mark.parametrize("mod", [JEI + ("run",), EDGE], ids=["jei-edge-run-cmd", "jei-edge-run"])
def test_corrupt_first_image_in_class_folder(vit_bundle, tmp_path, mod):
    root = _image_folder(tmp_path / "imgs", first=BAD_IMAGES["corrupt.png"])
    _refused(_cli(mod, vit_bundle, root), root / "a" / "00.png")


@pytest.mark.parametrize("first", ["corrupt.png", "bomb.png"])
def test_train_on_image_folder_with_a_bad_first_image(tmp_path, first):
    root = _image_folder(tmp_path / "imgs", first=BAD_IMAGES[first])
    out = tmp_path / "m.pt"
    _refused(_cli(JEI, "train", "--data", root, "-o", out), root / "a" / "00.png")
    assert not out.exists()


def test_read_image_matches_transforms_and_bounds_pixels(tmp_path):
    from PIL import Image

    from jei_edge.data import sources
    from jei_edge.errors import InputError

    def pil_reference(path, shape):  # what the reader must give: Pillow's own conversion and resize / 255
        c, h, w = shape
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR), np.float32) / 255
        return arr[None] if c == 1 else arr.transpose(2, 0, 1)

    rng = np.random.default_rng(0)
    rgb = (rng.random((13, 11, 3)) * 255).astype(np.uint8)
    images = {"gray.png": Image.fromarray(rgb[..., 0]), "rgb.jpg": Image.fromarray(rgb),
              "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])), "pal.gif": Image.fromarray(rgb).quantize(8),
              "i16.tif": Image.fromarray((rgb[..., 0].astype(np.uint16) * 200))}
    for name, im in images.items():
        im.save(tmp_path / name)
        for shape in ((1, 8, 8), (3, 5, 7)):
            np.testing.assert_array_equal(sources.read_image(tmp_path / name, shape),
                                          pil_reference(tmp_path / name, shape))
    assert sources.read_image_channels(tmp_path / "gray.png") == 1
    assert sources.read_image_channels(tmp_path / "rgb.jpg") == 3
    with pytest.raises(InputError, match=r"rgb.jpg' is too large: its header claims 11 x 13 = 143 pixels"):
        sources.read_image(tmp_path / "rgb.jpg", (1, 8, 8), max_pixels=100)
    # formats that run other programs (EPS -> Ghostscript) are never opened, whatever the extension
    (tmp_path / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(InputError, match="eps.png"):
        sources.read_image(tmp_path / "eps.png", (1, 8, 8))


def test_image_decoder_failures_are_input_errors_fuzz(tmp_path, capfd):
    """Mutated PNG/JPEG/GIF/BMP/TIFF files: only InputError (one line, naming the file), and
    nothing on file descriptor 2 (libtiff prints its complaints there; they go into the error)."""
    from PIL import Image

    from jei_edge.data.sources import read_image
    from jei_edge.errors import InputError

    arr = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    bases = []
    for fmt, ext, kw in [("PNG", "png", {}), ("JPEG", "jpg", {}), ("GIF", "gif", {}), ("BMP", "bmp", {}),
                         ("TIFF", "tif", {"compression": "tiff_lzw"}), ("TIFF", "tif", {"compression": "jpeg"})]:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt, **kw)
        bases.append((ext, buf.getvalue()))
    rng = random.Random(0)
    refused = 0
    for n in range(600):
        ext, data = bases[n % len(bases)]
        data = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(data))
            data[i] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        path = tmp_path / f"m{n}.{ext}"
        path.write_bytes(bytes(data))
        try:
            read_image(path, (3, 8, 8))
        except InputError as exc:
            assert str(path) in exc.message and "\n" not in exc.message
            refused += 1
    assert refused > 100
    assert capfd.readouterr().err == ""


# -- 2. sizes: header first ------------------------------------------------------------------------------

@pytest.mark.parametrize("mod", [JEI + ("run",), EDGE], ids=["jei-edge-run-cmd", "jei-edge-run"])
def test_npy_and_npz_whose_header_claims_terabytes(vit_bundle, tmp_path, mod):
    claim = _npy_header((10 ** 12, 1, 8, 8)) + b"\0" * 256  # 233 TiB claimed, 256 bytes there
    (tmp_path / "huge.npy").write_bytes(claim)
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("x.npy", claim)
    for name in ("huge.npy", "huge.npz"):
        line = _refused(_cli(mod, vit_bundle, tmp_path / name), tmp_path / name)
        assert "truncated or its header is wrong" in line and "233 TiB" in line


def test_array_over_the_configured_bound(vit_bundle, tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32))
    env = {"JEI_EDGE_MAX_ARRAY_BYTES": "1000"}
    line = _refused(_cli(JEI, "run", vit_bundle, tmp_path / "a.npy", env=env), tmp_path / "a.npy")
    assert "too large" in line and "2 KiB" in line
    _refused(_cli(EDGE, vit_bundle, "-", stdin=_npy(np.zeros((8, 1, 8, 8), np.float32)), env=env), "stdin array 0")
    _refused(_cli(EDGE, vit_bundle, "-", stdin=b"", env={"JEI_EDGE_MAX_ARRAY_BYTES": "lots"}),
             "JEI_EDGE_MAX_ARRAY_BYTES", stdout_empty=False)


@pytest.mark.parametrize("case", ["claims_233TiB", "claims_1GiB_sends_64B", "objects", "complex", "wrong_rank",
                                  "garbage_after_header_magic", "v3_header"])
def test_stdin_stream_refuses_before_allocating(vit_bundle, case):
    data = {
        "claims_233TiB": _npy_header((10 ** 12, 1, 8, 8)) + b"\0" * 64,
        "claims_1GiB_sends_64B": _npy_header((2 ** 22, 1, 8, 8)) + b"\0" * 64,
        "objects": _npy(np.array([{"a": 1}] * 2, dtype=object), allow_pickle=True),
        "complex": _npy(np.zeros((2, 1, 8, 8), np.complex64)),
        "wrong_rank": _npy(np.zeros((2, 1, 1, 8, 8), np.float32)),
        "garbage_after_header_magic": npformat.MAGIC_PREFIX + b"\x01\x00" + b"\xff" * 40,
        "v3_header": npformat.MAGIC_PREFIX + b"\x03\x00" + b"\x00" * 40,
    }[case]
    line = _refused(_cli(EDGE, vit_bundle, "-", stdin=data), "stdin array 0")
    expect = {"claims_233TiB": "too large", "claims_1GiB_sends_64B": "truncated", "objects": "never unpickled",
              "complex": "dtype complex64", "wrong_rank": "shape [2, 1, 1, 8, 8]"}.get(case, "")
    assert expect in line


def test_stream_reads_only_the_header_of_a_refused_array():
    """The bound is checked on the header: nothing of the claimed data is read or allocated."""
    from jei_edge.errors import InputError
    from jei_edge.runtime.inputs import stream_npy

    class Counting(io.BytesIO):
        taken = 0

        def read(self, n=-1):
            b = super().read(n)
            Counting.taken += len(b)
            return b

        def readinto(self, buf):
            raise AssertionError("data read for a refused array")

    prep = {"input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25]}
    head = _npy_header((4096, 1, 8, 8))
    stream = Counting(head + b"\0" * 1024)
    with pytest.raises(InputError, match=r"stdin array 0 is too large: shape \[4096, 1, 8, 8\] of float32 \(1 MiB\)"):
        next(stream_npy(stream, prep, max_bytes=1000))
    assert Counting.taken == len(head)


@pytest.mark.parametrize("mod", [JEI + ("run",), EDGE], ids=["jei-edge-run-cmd", "jei-edge-run"])
def test_pickles_and_empty_files_never_suggest_unsafe_loading(vit_bundle, tmp_path, mod):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "obj.npz", "w") as z:
        z.writestr("x.npy", (tmp_path / "obj.npy").read_bytes())
    (tmp_path / "pickle.npy").write_bytes(b"\x80\x04\x95garbage")  # a pickle, not a .npy
    (tmp_path / "zero.npy").write_bytes(b"")
    (tmp_path / "zero.npz").write_bytes(b"")
    (tmp_path / "notzip.npz").write_bytes(b"\x80\x04\x95garbage")
    for name, expect in [("obj.npy", "never unpickled"), ("obj.npz", "never unpickled"), ("pickle.npy", "magic"),
                         ("zero.npy", "empty file"), ("zero.npz", "empty file"), ("notzip.npz", "not a .npz")]:
        line = _refused(_cli(mod, vit_bundle, tmp_path / name), tmp_path / name)
        assert expect in line, line


# -- 3. empty arrays: stdin like files ---------------------------------------------------------------

def test_empty_array_on_stdin_is_refused_like_an_empty_file(vit_bundle, tmp_path):
    empty = np.zeros((0, 1, 8, 8), np.float32)
    np.save(tmp_path / "empty.npy", empty)
    from_file = _cli(EDGE, vit_bundle, tmp_path / "empty.npy")
    from_stdin = _cli(EDGE, vit_bundle, "-", stdin=_npy(empty))
    line_f = _refused(from_file, tmp_path / "empty.npy")
    line_s = _refused(from_stdin, "stdin array 0")
    assert from_file.returncode == from_stdin.returncode
    assert "the inputs hold no samples (empty array" in line_f and "the inputs hold no samples (empty array" in line_s


# -- 4. inspect on a bundle that fails its integrity check ------------------------------------------------

def test_inspect_exits_nonzero_on_failed_integrity(vit_bundle, tmp_path):
    import json

    bad = tmp_path / "b.jei"
    shutil.copytree(vit_bundle, bad)
    (bad / "report.txt").write_text("changed")
    proc = _cli(JEI, "inspect", bad)
    _refused(proc, bad, stdout_empty=False)
    out = proc.stdout.decode()
    assert "integrity: FAILED" in out and "report.txt" in out  # still shows what it found
    proc = _cli(JEI, "inspect", bad, "--json")
    _refused(proc, bad, stdout_empty=False)
    assert json.loads(proc.stdout)["integrity"]["ok"] is False
    # a listed file replaced by a symlink loop: a failed check, not a RuntimeError traceback
    loop = tmp_path / "loop.jei"
    shutil.copytree(vit_bundle, loop)
    (loop / "report.txt").unlink()
    os.symlink("report.txt", loop / "report.txt")
    proc = _cli(JEI, "inspect", loop)
    assert "Symlink loop" in _refused(proc, loop, stdout_empty=False)
    assert "integrity: FAILED" in proc.stdout.decode()


# -- 5. other hostile input files ----------------------------------------------------------------------------

@pytest.mark.parametrize("mod", [JEI + ("run",), EDGE], ids=["jei-edge-run-cmd", "jei-edge-run"])
def test_hostile_paths(vit_bundle, tmp_path, mod):
    np.save(tmp_path / "bool.npy", np.zeros((2, 1, 8, 8), bool))
    np.save(tmp_path / "str.npy", np.array([["abc"] * 8] * 8))
    np.save(tmp_path / "rank1.npy", np.zeros(64, np.float32))
    np.save(tmp_path / "f64big.npy", np.full((2, 1, 8, 8), 1e300))  # finite, but inf as float32
    (tmp_path / "dir.npy").mkdir()
    os.mkfifo(tmp_path / "fifo.npy")
    os.symlink("loop2.npy", tmp_path / "loop1.npy")
    os.symlink("loop1.npy", tmp_path / "loop2.npy")
    for name, expect in [("bool.npy", "dtype bool"), ("str.npy", "dtype <U3"), ("rank1.npy", "shape [64]"),
                         ("f64big.npy", "beyond the float32 range"),
                         ("dir.npy", "holds no"), ("fifo.npy", "not a regular file"), ("loop1.npy", "symbolic link")]:
        line = _refused(_cli(mod, vit_bundle, tmp_path / name, timeout=30), tmp_path / name)
        assert expect in line, line


def test_stdin_closed(vit_bundle):
    proc = subprocess.run([sys.executable, *EDGE, str(vit_bundle)], capture_output=True, cwd=ROOT, timeout=60,
                          stdin=None, preexec_fn=lambda: os.close(0))
    _refused(proc, "stdin is closed")


def _unprivileged():
    """A command prefix that makes a child unable to read a mode-000 file (None: cannot here)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv"):  # root without the capabilities that bypass file permissions
        probe = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "true"],
                               capture_output=True)
        if probe.returncode == 0:
            return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")
    return None


def test_unreadable_files_and_folders(vit_bundle, tmp_path):
    prefix = _unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: permissions cannot be denied")
    np.save(tmp_path / "a.npy", np.zeros((2, 1, 8, 8), np.float32))
    (tmp_path / "a.png").write_bytes(_png(np.zeros((8, 8), np.uint8)))
    root = _image_folder(tmp_path / "imgs")
    folder = tmp_path / "plain"
    folder.mkdir()
    for p in (tmp_path / "a.npy", tmp_path / "a.png"):
        p.chmod(0)
    (root / "a").chmod(0o311)
    folder.chmod(0o311)
    try:
        for path in (tmp_path / "a.npy", tmp_path / "a.png", folder):
            _refused(_cli(EDGE, vit_bundle, path, prefix=prefix), path)
        _refused(_cli(JEI, "run", vit_bundle, root, prefix=prefix), root / "a")
        _refused(_cli(JEI, "train", "--data", root, "-o", tmp_path / "m.pt", prefix=prefix), root / "a")
    finally:
        (root / "a").chmod(0o755)
        folder.chmod(0o755)


def test_inspect_and_verify_odd_paths(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    os.symlink("loop", tmp_path / "loop")
    for cmd in ("inspect", "verify"):
        for name in ("fifo", "loop", "missing"):
            _refused(_cli(JEI, cmd, tmp_path / name, timeout=30), tmp_path / name)


def test_header_first_reader_gives_what_numpy_load_gives(tmp_path):
    """Fortran order, big-endian, float16, uint8 pixels, .npz with labels, .npy version 2.0 and a
    stream of several arrays: the same model inputs as ``np.load`` + ``to_model_input``."""
    from jei_edge.runtime.inputs import load_inputs, stream_npy, to_model_input

    prep = {"input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25]}
    rng = np.random.default_rng(0)
    arrays = {"f.npy": np.asfortranarray(rng.random((3, 1, 8, 8), dtype=np.float32)),
              "be.npy": rng.random((2, 1, 8, 8)).astype(">f4"), "h.npy": rng.random((2, 8, 8)).astype(np.float16),
              "u8.npy": rng.integers(0, 256, (2, 1, 8, 8), dtype=np.uint8), "one.npy": rng.random((8, 8))}
    for name, arr in arrays.items():
        np.save(tmp_path / name, arr)
        np.testing.assert_array_equal(load_inputs([tmp_path / name], prep).x,
                                      to_model_input(np.load(tmp_path / name), prep, name))
    with open(tmp_path / "v2.npy", "wb") as f:
        npformat.write_array(f, arrays["f.npy"], version=(2, 0))
    np.testing.assert_array_equal(load_inputs([tmp_path / "v2.npy"], prep).x, load_inputs([tmp_path / "f.npy"], prep).x)
    np.savez(tmp_path / "d.npz", x=arrays["u8.npy"], y=np.array([3, 1], np.int16))
    batch = load_inputs([tmp_path / "d.npz"], prep)
    assert batch.y.tolist() == [3, 1] and batch.y.dtype == np.int64
    stream = io.BytesIO(b"".join(_npy(a) for a in arrays.values()))
    got = [b.x for b in stream_npy(stream, prep)]
    want = [to_model_input(a, prep, "a") for a in arrays.values()]
    assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))


def test_damaged_npz_archives_are_input_errors(tmp_path):
    """Bad CRC, encryption, an unknown compression method, a member over the bound: InputError."""
    from jei_edge.errors import InputError
    from jei_edge.runtime.inputs import NpzReader

    good = _npy(np.zeros((4096, 1, 8, 8), np.float32))  # 1 MiB of zeros: compresses to ~1 KiB

    def archive(name, patch=None, **kw):
        path = tmp_path / f"{name}.npz"
        with zipfile.ZipFile(path, "w", **kw) as z:
            z.writestr("x.npy", good)
        if patch:
            data = bytearray(path.read_bytes())
            patch(data)
            path.write_bytes(bytes(data))
        return path

    def flip_data(data):
        data[data.find(b"PK\x03\x04") + 30 + len("x.npy") + 200] ^= 0xFF

    def encrypted(data):
        data[data.find(b"PK\x03\x04") + 6] |= 1
        data[data.find(b"PK\x01\x02") + 8] |= 1

    def method_99(data):
        data[data.find(b"PK\x03\x04") + 8] = 99
        data[data.find(b"PK\x01\x02") + 10] = 99

    for path, expect, limit in [(archive("crc", flip_data), "CRC", None),
                                (archive("enc", encrypted), "encrypted", None),
                                (archive("m99", method_99), "compression method", None),
                                (archive("big", compression=zipfile.ZIP_DEFLATED), "too large", 1 << 19)]:
        with pytest.raises(InputError, match=expect) as err:
            with NpzReader(path, max_bytes=limit) as z:
                z.read("x")
        assert str(path) in err.value.message and "\n" not in err.value.message
    with pytest.raises(InputError, match=r"lacks array 'y' \(has \['x'\]\)"), NpzReader(tmp_path / "crc.npz") as z:
        z.read("y")


def test_runtime_refuses_float64_beyond_float32_without_warnings(vit_bundle):
    import warnings

    from jei_edge.errors import InputError
    from jei_edge.runtime import Runtime

    rt = Runtime.load(vit_bundle)
    x = np.zeros((3, 1, 8, 8))
    x[1, 0, 2, 2] = -1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in cast" would be one
        want = r"beyond the float32 range in 1 row\(s\) \(rows 1; largest \|value\| 1e\+300\)"
        with pytest.raises(InputError, match=want):
            rt.run(x)
        assert len(rt.run(np.zeros((2, 1, 8, 8))).pred) == 2  # float64 in range: still accepted


def test_a_stage_graph_swapped_for_another_models_is_one_error(vit_bundle, resnet_bundle, tmp_path):
    """A re-hashed bundle whose stage graph comes from another model: refused at load, naming the
    stage and tensor (not an onnxruntime traceback mid-run)."""
    import shutil

    from jei_edge.errors import BundleError
    from jei_edge.runtime import Runtime
    from tests.runtime.helpers import rehash

    bad = tmp_path / "swapped.jei"
    shutil.copytree(vit_bundle, bad)
    shutil.copyfile(resnet_bundle / "stages" / "stage1.onnx", bad / "stages" / "stage1.onnx")
    rehash(bad)
    with pytest.raises(BundleError, match=r"stage 1 graph 'stages/stage1.onnx' tensor '\w+' is float32"):
        Runtime.load(bad, device="cpu")
