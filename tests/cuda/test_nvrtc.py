"""The exit kernel compiles through the runtime's NVRTC path (and with nvcc) for every target
architecture, without a GPU; the on-disk cache and the host/device argument layout are checked."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest

from jei_edge.errors import BuildError
from jei_edge.runtime.cuda import nvrtc
from jei_edge.runtime.cuda.kernel import BLOCK, MAX_GATES, ExitArgs

ARCHS = (75, 80, 86, 87, 89, 90, 110, 120)


def _nvrtc_or_skip():
    try:
        return nvrtc.supported_archs()
    except Exception as exc:  # DependencyError when libnvrtc is absent
        pytest.skip(f"NVRTC unavailable: {exc}")


@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_compiles_cubin_for(arch, tmp_path):
    supported = _nvrtc_or_skip()
    assert arch in supported, f"NVRTC {nvrtc.nvrtc_version()} lacks sm_{arch}"
    k = nvrtc.compile_exit_kernel(arch, cache_dir=tmp_path)
    assert (k.arch, k.kind, k.from_cache) == (arch, "cubin", False)
    assert k.image[:4] == b"\x7fELF"
    assert nvrtc.KERNEL_NAME.encode() in k.image


def test_ptx_fallback_for_a_device_newer_than_nvrtc(tmp_path):
    supported = _nvrtc_or_skip()
    newest = max(supported)
    arch, kind = nvrtc.choose_target(newest + 50, supported)
    assert (arch, kind) == (newest, "ptx")
    ptx = nvrtc.compile_source(nvrtc.kernel_source(), 80, ptx=True)
    assert b".entry jei_exit_compact" in ptx and b".target sm_80" in ptx
    with pytest.raises(BuildError, match="none usable"):
        nvrtc.choose_target(50, supported)


def test_cache_hit_and_damaged_entry_rebuilt(tmp_path):
    _nvrtc_or_skip()
    first = nvrtc.compile_exit_kernel(90, cache_dir=tmp_path)
    second = nvrtc.compile_exit_kernel(90, cache_dir=tmp_path)
    assert second.from_cache and second.image == first.image and second.cache_path == first.cache_path
    blob = bytearray(first.cache_path.read_bytes())
    blob[100] ^= 0xFF
    first.cache_path.write_bytes(bytes(blob))
    third = nvrtc.compile_exit_kernel(90, cache_dir=tmp_path)
    assert not third.from_cache and third.image == first.image
    assert nvrtc.compile_exit_kernel(90, cache_dir=tmp_path).from_cache
    # another source gets another cache key
    other = nvrtc.compile_exit_kernel(90, cache_dir=tmp_path, source=nvrtc.kernel_source() + "\n// v2\n")
    assert not other.from_cache and other.cache_path != first.cache_path
    assert not list(tmp_path.glob("*.partial"))


def test_unwritable_cache_still_compiles(tmp_path):
    _nvrtc_or_skip()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    k = nvrtc.compile_exit_kernel(86, cache_dir=blocker / "sub")
    assert k.image[:4] == b"\x7fELF"


def test_compile_error_carries_the_log():
    _nvrtc_or_skip()
    with pytest.raises(BuildError, match="identifier \"nope\" is undefined"):
        nvrtc.compile_source("__global__ void f() { nope; }", 90)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(tmp_path / "c"))
    assert nvrtc.default_cache_dir() == tmp_path / "c"


def test_argument_struct_layout_matches_the_kernel_source():
    """Field order, sizes and natural-alignment offsets of the C struct == the ctypes mirror."""
    src = nvrtc.kernel_source()
    assert int(re.search(r"sizeof\(ExitArgs\) == (\d+)", src).group(1)) == ctypes.sizeof(ExitArgs)
    assert int(re.search(r"#define JEI_MAX_GATES (\d+)", src).group(1)) == MAX_GATES
    defines = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define (\w+) (\d+)", src)}
    struct = re.search(r"struct ExitArgs \{(.*?)\};", src, re.S).group(1)
    fields = re.findall(r"^\s*(.+?)\s*\b(\w+)(?:\[(\w+)\])?;", struct, re.M)
    assert [name for _, name, _ in fields] == [f[0] for f in ExitArgs._fields_]
    off = 0
    for ctype, name, count in fields:
        size = 8 if ("*" in ctype or ctype in ("long long", "double")) else 4
        assert ctype.endswith("*") or ctype in ("long long", "double", "int", "float"), ctype
        n = (defines[count] if count in defines else int(count)) if count else 1
        off = -(-off // size) * size
        assert getattr(ExitArgs, name).offset == off and getattr(ExitArgs, name).size == size * n, name
        off += size * n
    assert -(-off // 8) * 8 == ctypes.sizeof(ExitArgs)
    assert int(re.search(r"#define JEI_BLOCK (\d+)", src).group(1)) == BLOCK


def test_the_compiled_kernel_moves_hidden_rows_as_bytes():
    """FP16 (or any element size) hidden states need no kernel variant: the compiled kernel's hidden
    pointers are bytes and a row is ``row_bytes`` long, copied 16, 4 or 1 bytes at a time by
    alignment; only the gate and the probabilities are typed (float32). The fake driver's
    emulation copies the same bytes (tests/cuda/test_workspace.py runs FP16 rows through it)."""
    src = nvrtc.kernel_source()
    struct = re.search(r"struct ExitArgs \{(.*?)\};", src, re.S).group(1)
    assert re.search(r"const unsigned char\* hidden_in;", struct) and re.search(r"unsigned char\* hidden_out;", struct)
    assert re.search(r"const float\* gate;", struct) and re.search(r"const float\* probs;", struct)
    copy = re.search(r"jei_copy_row\((.*?)\n\}", src, re.S).group(1)
    assert "uint4" in copy and "unsigned int" in copy and "dst[j] = src[j]" in copy  # 16 B / 4 B / byte paths


def _nvcc_archs():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, set()
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    return nvcc, {int(m) for m in re.findall(r"compute_(\d+)", out)}


@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_compiles_cubin_for(arch, tmp_path):
    nvcc, archs = _nvcc_archs()
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    if arch not in archs:
        pytest.skip(f"this nvcc does not support sm_{arch}")
    out = tmp_path / f"k{arch}.cubin"
    r = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-o", str(out), str(nvrtc.KERNEL_FILE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"\x7fELF"
