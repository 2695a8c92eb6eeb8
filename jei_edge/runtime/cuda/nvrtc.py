"""Compile the exit kernel (``exit_kernel.cu``, shipped in the package) with NVRTC, cached on disk.

The runtime compiles for the device's own architecture at load time (a cubin; PTX for the newest
architecture NVRTC knows when the device is newer than NVRTC, which the driver then JIT-compiles).
Compiled images are cached under ``$JEI_EDGE_CUDA_CACHE`` (default ``~/.cache/jei-edge/cuda``),
keyed by the sha256 of source, options, target and NVRTC version; each cache file starts with the
sha256 of its payload so a damaged entry is detected and rebuilt, never loaded.

NVRTC needs no GPU: CI compiles the kernel for every supported architecture through this module.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from jei_edge._io import atomic_write_bytes
from jei_edge.errors import BuildError, DependencyError

log = logging.getLogger(__name__)

KERNEL_FILE = Path(__file__).with_name("exit_kernel.cu")
KERNEL_NAME = "jei_exit_compact"
CACHE_ENV = "JEI_EDGE_CUDA_CACHE"
BASE_OPTIONS: Tuple[str, ...] = ("--std=c++14", "--fmad=false")
NVRTC_HINT = "pip install 'nvidia-cuda-nvrtc>=13,<14' (or the nvrtc wheel matching your CUDA major version)"


@dataclass(frozen=True)
class CompiledKernel:
    """A compiled exit-kernel image ready for ``cuModuleLoadData``."""

    image: bytes
    arch: int  # the architecture it was compiled for (e.g. 90)
    kind: str  # "cubin" or "ptx"
    nvrtc_version: Tuple[int, int]
    cache_path: Optional[Path] = None
    from_cache: bool = False


def kernel_source() -> str:
    return KERNEL_FILE.read_text()


def _nvrtc():
    import importlib

    from jei_edge._deps import require

    require("cuda.bindings", purpose="compiling the CUDA exit kernel")
    return importlib.import_module("cuda.bindings.nvrtc")


def _call(nv, result, what: str):
    """Unpack ``(err, *values)`` of an NVRTC call."""
    err, *values = result
    if err != nv.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nv.nvrtcGetErrorString(err)
        raise BuildError(f"NVRTC {what} failed: {msg.decode() if isinstance(msg, bytes) else msg}")
    return values[0] if len(values) == 1 else values


def nvrtc_version() -> Tuple[int, int]:
    """The NVRTC library version; a clear DependencyError when libnvrtc is missing."""
    nv = _nvrtc()
    try:
        major, minor = _call(nv, nv.nvrtcVersion(), "nvrtcVersion")
    except BuildError:
        raise
    except Exception as exc:  # cuda-pathfinder raises when libnvrtc.so cannot be found
        raise DependencyError(f"the NVRTC library (libnvrtc) could not be loaded: {exc}", hint=NVRTC_HINT) from exc
    return int(major), int(minor)


def supported_archs() -> List[int]:
    """Architectures this NVRTC can compile cubins for (e.g. [75, 80, ..., 120])."""
    nvrtc_version()
    nv = _nvrtc()
    return sorted(int(a) for a in _call(nv, nv.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


def compile_source(source: str, arch: int, *, ptx: bool = False, name: str = "exit_kernel.cu",
                   options: Sequence[str] = BASE_OPTIONS) -> bytes:
    """Compile CUDA C++ ``source`` with NVRTC to a cubin for ``sm_<arch>`` (or PTX for ``compute_<arch>``).

    Raises:
        BuildError: the source does not compile (the NVRTC log is in the message).
    """
    nvrtc_version()
    nv = _nvrtc()
    prog = _call(nv, nv.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        target = f"--gpu-architecture={'compute' if ptx else 'sm'}_{arch}"
        opts = [target.encode()] + [o.encode() for o in options]
        err, = nv.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nv.nvrtcResult.NVRTC_SUCCESS:
            size = _call(nv, nv.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            buf = b" " * size
            _call(nv, (nv.nvrtcGetProgramLog(prog, buf)[0], None), "nvrtcGetProgramLog")
            raise BuildError(f"NVRTC could not compile {name} for {target.split('=')[1]}:\n"
                             f"{buf.decode(errors='replace').rstrip(chr(0)).strip()}")
        if ptx:
            size = _call(nv, nv.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            buf = b" " * size
            _call(nv, (nv.nvrtcGetPTX(prog, buf)[0], None), "nvrtcGetPTX")
        else:
            size = _call(nv, nv.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            buf = b" " * size
            _call(nv, (nv.nvrtcGetCUBIN(prog, buf)[0], None), "nvrtcGetCUBIN")
        return bytes(buf)
    finally:
        nv.nvrtcDestroyProgram(prog)


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jei-edge" / "cuda"


def choose_target(device_arch: int, archs: Sequence[int]) -> Tuple[int, str]:
    """``(arch, kind)`` to compile for a device: its own cubin when NVRTC supports it, else PTX for
    the newest supported architecture not above it (the driver JIT-compiles PTX forward)."""
    if device_arch in archs:
        return device_arch, "cubin"
    older = [a for a in archs if a <= device_arch]
    if not older:
        raise BuildError(f"this NVRTC supports architectures {list(archs)}, none usable for sm_{device_arch}",
                         hint="install an nvidia-cuda-nvrtc version that supports your GPU")
    return max(older), "ptx"


def _read_cache(path: Path) -> Optional[bytes]:
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    digest, payload = blob[:32], blob[32:]
    if len(blob) <= 32 or hashlib.sha256(payload).digest() != digest:
        log.warning("ignoring damaged exit-kernel cache entry %s (it will be rebuilt)", path)
        return None
    return payload


def _write_cache(path: Path, payload: bytes) -> None:
    try:
        atomic_write_bytes(path, lambda f: f.write(hashlib.sha256(payload).digest() + payload))
    except OSError as exc:  # a read-only home must not stop inference
        log.warning("cannot write the exit-kernel cache %s (%s); compiling every load", path, exc)


def compile_exit_kernel(device_arch: int, *, cache_dir: Optional[Path] = None, use_cache: bool = True,
                        source: Optional[str] = None) -> CompiledKernel:
    """The exit kernel compiled for a device of compute capability ``device_arch`` (e.g. 90).

    Args:
        device_arch: major * 10 + minor of the target device.
        cache_dir: where compiled images are kept (default ``default_cache_dir()``).
        use_cache: read and write the on-disk cache.
        source: kernel source override (tests); default the shipped ``exit_kernel.cu``.
    """
    src = kernel_source() if source is None else source
    version = nvrtc_version()
    arch, kind = choose_target(int(device_arch), supported_archs())
    key = hashlib.sha256("\0".join([src, " ".join(BASE_OPTIONS), f"{kind}:{arch}",
                                    f"nvrtc{version[0]}.{version[1]}"]).encode()).hexdigest()
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"exit_kernel-sm{arch}-{key[:24]}.{kind}"
    if use_cache:
        payload = _read_cache(path)
        if payload is not None:
            return CompiledKernel(payload, arch, kind, version, path, from_cache=True)
    image = compile_source(src, arch, ptx=(kind == "ptx"))
    if use_cache:
        _write_cache(path, image)
    return CompiledKernel(image, arch, kind, version, path if use_cache else None, from_cache=False)
