"""One TensorRT / TensorRT-RTX engine per stage graph, with an engine cache.

Every network is **strongly typed** (TensorRT-RTX is always; TensorRT >= 10 with the flag), so the
engine's precision is the graph's: one code path serves TensorRT 10.3 to 11 and TensorRT-RTX, and
a precision is never silently changed by the builder. The optimisation profile covers the
target's whole batch range (the runtime compacts rows between stages, so every count from 1 to
max must be legal). TensorRT-RTX builds ahead of time for the compute capabilities it names
(SM75, SM80, SM86, SM89, SM120, SM121) on a machine without a GPU; full TensorRT builds for the
GPU it runs on (Jetson: on the board).

Measured with tensorrt-rtx 1.7.1 on the CPU-only build host: a 2-block ViT stage builds in ~0.5 s
(SM89, FP32, profile 1/8/256); TensorRT-RTX refuses every FP32 GEMM for Turing (SM75: "FP32 GEMM
is not supported"), so Turing takes FP16 graphs only (the gate's Linear(4, 1) is written as a
multiply-add for that reason); it parses and builds symmetric INT8 Q/DQ graphs for SM80+ and refuses
asymmetric ones ("Non-zero zero point is not supported"). Its timing cache is a no-op (deprecated
since 1.2), which is why the engine cache, not a timing cache, is what makes a rebuild cheap here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from jei_edge._io import atomic_write_bytes, shorten
from jei_edge.backends.tensorrt.toolchain import logger, version
from jei_edge.bundle import sha256_file
from jei_edge.errors import BuildError

RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")


@dataclass(frozen=True)
class EngineRequest:
    """What one engine is built from.

    Attributes:
        graph: the stage's ONNX file.
        what: how errors name it (``stage 3``).
        profile: the batch range ``(min, opt, max)``.
        compute_capability: ``"8.9"`` (TensorRT-RTX, ahead of time); None = the GPU present (TensorRT).
        precision: ``fp32`` | ``fp16`` | ``int8``: must be what the graph's tensors are (strongly typed).
        workspace_mib: the builder's workspace limit (None: the toolchain's default).
        optimization_level: ``builder_optimization_level`` 0-5 (None: the default, 3).
    """

    graph: Path
    what: str
    profile: Tuple[int, int, int]
    compute_capability: Optional[str]
    precision: str = "fp32"
    workspace_mib: Optional[int] = None
    optimization_level: Optional[int] = None


@dataclass
class BuiltEngine:
    """A serialized engine and what the build reported about it."""

    data: bytes
    key: str
    toolchain: str
    seconds: float
    cached: bool
    layers: Dict[str, int] = field(default_factory=dict)  # network layers by output type (before fusion)


def cache_key(graph_sha256: str, target: str, toolchain: str, req: EngineRequest) -> str:
    """What an engine depends on: the graph's bytes, target, toolchain version, compute capability,
    precision, batch profile and builder settings."""
    parts = {"graph": graph_sha256, "target": target, "toolchain": toolchain, "cc": req.compute_capability,
             "precision": req.precision, "profile": list(req.profile), "workspace_mib": req.workspace_mib,
             "opt_level": req.optimization_level}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class EngineCache:
    """Serialized engines on disk by ``cache_key`` (``$JEI_EDGE_ENGINE_CACHE`` or
    ``~/.cache/jei-edge/engines``); writes are atomic, so a killed build leaves no partial entry."""

    def __init__(self, root=None):
        default = Path(os.environ.get("JEI_EDGE_ENGINE_CACHE", Path.home() / ".cache" / "jei-edge" / "engines"))
        self.root = Path(root) if root is not None else default
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.engine"

    def get(self, key: str) -> Optional[bytes]:
        try:
            data = self._path(key).read_bytes()
        except OSError:
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        try:
            atomic_write_bytes(self._path(key), lambda f: f.write(data))
        except OSError:  # a read-only or full cache must not fail the build; the engine is in the bundle
            pass


def timing_cache(trt, config, cache: Optional[EngineCache], toolchain: str):
    """Attach TensorRT's timing cache (measured kernel timings) to ``config``, read from the engine
    cache's folder; returns a function that writes it back after a build (or None).

    Full TensorRT only: it times kernels on the GPU it builds on, so the cache makes a board's
    rebuilds faster (one file per toolchain version; TensorRT ignores entries of another GPU). In
    TensorRT-RTX the timing cache is a no-op (deprecated since 1.2) and is not used.
    """
    if cache is None or trt.__name__ != "tensorrt" or not hasattr(config, "create_timing_cache"):
        return None
    path = cache.root / f"timing-{trt.__name__}-{toolchain}.cache"
    try:
        old = path.read_bytes()
    except OSError:
        old = b""
    config.set_timing_cache(config.create_timing_cache(old), False)  # ignore_mismatch=False

    def save() -> None:
        data = bytes(config.get_timing_cache().serialize())
        if data and data != old:
            try:
                atomic_write_bytes(path, lambda f: f.write(data))
            except OSError:  # like the engine cache: never fail a build over a cache
                pass
    return save


def _network_types(net) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        if layer.num_outputs:
            name = str(layer.get_output(0).dtype).split(".")[-1].lower()
            counts[name] = counts.get(name, 0) + 1
    return counts


_WANT = {"fp32": ("float",), "fp16": ("half",), "int8": ("int8", "fp8")}


def build_engine(trt, req: EngineRequest, target: str, cache: Optional[EngineCache] = None) -> BuiltEngine:
    """Build (or take from ``cache``) the engine of ``req.graph`` with toolchain module ``trt``.

    Raises:
        BuildError: the parser rejects the graph, the precision is not the graph's, the compute
            capability is not one the toolchain builds for, or the builder fails (its last error named).
    """
    t0 = time.perf_counter()
    tc = version(trt)
    key = cache_key(sha256_file(req.graph), target, tc, req)
    if cache is not None:
        data = cache.get(key)
        if data is not None:
            return BuiltEngine(data, key, tc, time.perf_counter() - t0, True)
    lg = logger(trt)
    lg.messages.clear()
    builder = trt.Builder(lg)
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(net, lg)
    if not parser.parse_from_file(str(req.graph)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(min(parser.num_errors, 3)))
        raise BuildError(f"{req.what}: {trt.__name__} {tc} cannot parse '{req.graph.name}': {shorten(errors, 400)}",
                         hint="the stage graph uses an operator or type this toolchain does not support")
    types = _network_types(net)
    if not any(t in types for t in _WANT[req.precision]):
        raise BuildError(f"{req.what}: a {req.precision} engine needs a {req.precision} stage graph, but "
                         f"'{req.graph.name}' computes in {sorted(types)} (networks are strongly typed)",
                         hint=f"export the stage graphs in {req.precision} first, or build --precision fp32")
    if net.num_inputs != 1:
        raise BuildError(f"{req.what}: a stage graph has one input, '{req.graph.name}' has {net.num_inputs}")
    config = builder.create_builder_config()
    inp = net.get_input(0)
    row = tuple(int(d) for d in inp.shape)[1:]
    if any(d < 0 for d in row):
        raise BuildError(f"{req.what}: input '{inp.name}' has a dynamic dimension besides the batch: {tuple(inp.shape)}")
    lo, opt, hi = req.profile
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (lo,) + row, (opt,) + row, (hi,) + row)
    config.add_optimization_profile(profile)
    if req.compute_capability is not None:
        if not hasattr(config, "set_compute_capability"):
            raise BuildError(f"{req.what}: {trt.__name__} builds for the GPU it runs on, not for compute capability "
                             f"{req.compute_capability} ahead of time", hint="build on the board (`jei-edge lower`)")
        if req.compute_capability not in RTX_COMPUTE_CAPABILITIES:
            raise BuildError(f"{req.what}: {trt.__name__} {tc} cannot build for compute capability "
                             f"{req.compute_capability}", hint=f"it builds for {', '.join(RTX_COMPUTE_CAPABILITIES)}")
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, "SM" + req.compute_capability.replace(".", "")), 0)
    if req.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_mib) << 20)
    if req.optimization_level is not None:
        config.builder_optimization_level = int(req.optimization_level)
    save_timing = timing_cache(trt, config, cache, tc)
    plan = builder.build_serialized_network(net, config)
    if plan is None:
        last = next((m for lvl, m in reversed(lg.messages) if lvl in ("ERROR", "CRITICAL")), "no error message")
        raise BuildError(f"{req.what}: {trt.__name__} {tc} could not build an engine for compute capability "
                         f"{req.compute_capability or 'of this GPU'} in {req.precision}: {shorten(last, 400)}",
                         hint="Turing (7.5) needs fp16 graphs with TensorRT-RTX; see `jei-edge targets`")
    data = bytes(plan)
    if save_timing is not None:
        save_timing()
    if cache is not None:
        cache.put(key, data)
    return BuiltEngine(data, key, tc, time.perf_counter() - t0, False, types)
