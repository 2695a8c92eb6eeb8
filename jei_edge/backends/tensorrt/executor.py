"""The TensorRT / TensorRT-RTX ``StageExecutor``: a bundle's engines on the CUDA core (torch-free).

One deserialized engine per stage (after ``validity.check_engines``) and, per workspace (a
pipeline lane), one execution context per stage whose tensors point at the workspace's own
buffers: stage k reads the buffer the exit kernel compacted stage k-1's survivors into and writes
its ``hidden_out`` / ``probs`` / ``gate`` where the next exit-kernel launch reads them. Addresses
are set once, when a workspace is prepared (its buffers never move); a stage run sets the input
shape to the live row count and enqueues ``execute_async_v3`` on the workspace's stream, so the
exit kernel that follows on the same stream needs no extra synchronisation and nothing is copied
between engines. Engine I/O names, dtypes and shapes must be the manifest's (FP16 hidden states
flow through compaction as bytes; gates and probabilities are FP32), checked at load.

CUDA graphs per (stage, batch bucket), buckets from the shared ``jei_edge.runtime.cuda.graphs``
(``n`` live rows run as the smallest bucket >= n; the padded rows compute on stale, finite data
that nobody reads: every stage op is row-independent). Two ways, chosen by the toolchain:

- ``native`` (TensorRT-RTX, which has ``CudaGraphStrategy``): contexts are created with a runtime
  config whose ``cuda_graph_strategy`` is ``WHOLE_GRAPH_CAPTURE``: TensorRT-RTX captures and replays
  a graph per input shape itself. The executor keeps the shapes to the buckets and runs every
  bucket once when a workspace is prepared, so no capture happens in the steady state.
- ``capture`` (TensorRT): one execution context per (stage, bucket), all of a lane sharing one
  scratch buffer (``USER_MANAGED`` device memory: the contexts of a lane never run at the same time,
  they share its one stream); one warm-up enqueue at the bucket's shape, then the enqueue is
  captured on the workspace's stream (thread-local capture) and instantiated. A graph fixes its
  context's shape and tensor addresses, which is why each graph has its own context. A stage whose
  enqueue cannot be captured (TensorRT refuses, or the capture is invalidated) runs plain enqueues,
  logged once; so do live counts above ``graph_max_batch``.

The toolchain module is passed in (``toolchain.import_toolchain``); tests pass a recorded-engine
double, never presented as hardware validation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from jei_edge._io import shorten
from jei_edge.bundle.manifest import Stage
from jei_edge.errors import BundleError
from jei_edge.runtime.cuda.driver import CudaError
from jei_edge.runtime.cuda.graphs import Buckets
from jei_edge.runtime.cuda.memory import DeviceBuffer
from jei_edge.runtime.loop import Capability, StageExecutor

# TensorRT DataType name -> the manifest's element type
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
          "INT64": "int64"}


def _dtype_name(dt) -> str:
    return DTYPES.get(str(dt).split(".")[-1].upper(), str(dt))


LOG = logging.getLogger("jei_edge.tensorrt")


@dataclass
class _Lane:
    """One workspace's execution contexts (one per stage), what was bound into them, and its CUDA
    graphs: ``(stage, bucket) -> (context, graph exec)`` (``capture``) or the warmed buckets
    (``native``)."""

    contexts: List[object]
    bound: Dict[int, Dict[str, int]] = field(default_factory=dict)
    graphs: Dict[Tuple[int, int], Tuple[object, object]] = field(default_factory=dict)
    scratch: Optional[DeviceBuffer] = None
    driver: object = None


class TensorRTExecutor(StageExecutor):
    """Engines of one bundle, run on the CUDA workspace's buffers and stream.

    Args:
        trt: the ``tensorrt`` or ``tensorrt_rtx`` module (or a test double).
        engines: the serialized engine of every stage, in stage order.
        stages: the manifest's stages (names, per-row shapes and dtypes every engine must have).
        logger: the ``trt.ILogger`` (``toolchain.logger``).
        what: how errors name the bundle.
        buckets: CUDA-graph batch buckets (``CudaOptions.graph_buckets()``; None: no graphs).
    """

    # writes into the workspace's output buffers (no BINDS_OUTPUTS); a merged stage's engine writes
    # probs [rows, exits, C] and gate [rows, gates], which the exit kernel decides in order
    capabilities = frozenset({Capability.MERGED_STAGES})

    def __init__(self, trt, engines: Sequence[bytes], stages: Sequence[Stage], logger, what: str = "bundle",
                 buckets: Optional[Buckets] = None):
        if len(engines) != len(stages):
            raise BundleError(f"{what}: {len(engines)} engines for {len(stages)} stages")
        self.trt, self.stages, self.what = trt, list(stages), what
        self.num_stages = len(self.stages)
        self.runtime = trt.Runtime(logger)
        self.engines = []
        for s, data in zip(stages, engines):
            engine = self.runtime.deserialize_cuda_engine(data)
            if engine is None:
                last = next((m for lvl, m in reversed(getattr(logger, "messages", [])) if lvl in ("ERROR", "CRITICAL")),
                            "no message")
                raise BundleError(f"{what}: {trt.__name__} could not deserialize stage {s.index}'s engine: {shorten(last, 300)}",
                                  hint=f"rebuild it: `jei-edge lower {what} --force`")
            self._check_io(engine, s)
            self.engines.append(engine)
        self.profile_max = [self._profile_max(e, s) for e, s in zip(self.engines, stages)]
        self._lanes: Dict[int, _Lane] = {}
        self.enqueues = 0
        self.graph_replays = 0
        self.buckets = buckets if buckets is not None else Buckets(enabled=False)
        if not self.buckets.enabled:
            self.graph_mode = "off"
        elif hasattr(trt, "CudaGraphStrategy") and all(hasattr(e, "create_runtime_config") for e in self.engines):
            self.graph_mode = "native"
        else:
            self.graph_mode = "capture"
        self.uncapturable: Dict[int, str] = {}  # stage -> why its enqueue runs without a graph

    # -- load-time checks ------------------------------------------------------------------
    def _check_io(self, engine, s: Stage) -> None:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want = {t.name: t for t in s.inputs + s.outputs}
        if sorted(names) != sorted(want):
            raise BundleError(f"{self.what}: stage {s.index}'s engine has tensors {sorted(names)}, the manifest "
                              f"{sorted(want)}", hint="the engine was not built from this bundle's stage graph")
        inputs = {t.name for t in s.inputs}
        for name in names:
            t = want[name]
            is_input = engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT
            if is_input != (name in inputs):
                raise BundleError(f"{self.what}: stage {s.index}'s engine tensor '{name}' is an "
                                  f"{'input' if is_input else 'output'}, the manifest says otherwise")
            dtype = _dtype_name(engine.get_tensor_dtype(name))
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            if dtype != t.dtype or shape[1:] != t.shape:
                raise BundleError(f"{self.what}: stage {s.index}'s engine tensor '{name}' is {dtype}{list(shape)}, "
                                  f"the manifest's {t.dtype}[batch, {', '.join(map(str, t.shape))}]",
                                  hint="the engine was not built from this bundle's stage graph")

    @staticmethod
    def _profile_max(engine, s: Stage) -> int:
        shapes = engine.get_tensor_profile_shape(s.input.name, 0)
        return int(tuple(shapes[2])[0])

    # -- StageExecutor -----------------------------------------------------------------------
    def prepare(self, ws) -> None:
        """One execution context per stage for ``ws``, every tensor pointed at ``ws``'s buffers."""
        top = min(self.profile_max)
        if ws.capacity > top:
            raise BundleError(f"{self.what}: the workspace holds {ws.capacity} rows but the engines' batch profile "
                              f"ends at {top}", hint=f"load it with max_batch <= {top}")
        contexts, bound = [], {}
        for k, (engine, s) in enumerate(zip(self.engines, self.stages)):
            addresses = {s.input.name: int(ws.stage_input(k).device_ptr)}
            outs = ws.stage_outputs(k)
            if outs is None:
                raise CudaError("the TensorRT executor writes into workspace-owned outputs; this workspace has none")
            addresses.update({t.name: int(outs[t.name].ptr) for t in s.outputs})
            contexts.append(self._context(k, addresses, native=self.graph_mode == "native"))
            bound[k] = addresses
        lane = _Lane(contexts, bound, driver=ws.driver)
        self._lanes[id(ws)] = lane
        try:
            if self.graph_mode == "native":
                self._warm_native(lane, ws)
            elif self.graph_mode == "capture":
                self._capture_all(lane, ws)
        except BaseException:
            self.release(ws)
            raise

    def _context(self, k: int, addresses: Dict[str, int], native: bool = False, scratch=None):
        """An execution context of stage ``k`` with every tensor bound (``native``: TensorRT-RTX's
        own CUDA graphs; ``scratch``: run on this lane-shared device memory)."""
        engine = self.engines[k]
        if native:
            config = engine.create_runtime_config()
            config.cuda_graph_strategy = self.trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            ctx = engine.create_execution_context(config)
        elif scratch is not None:
            ctx = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        else:
            ctx = engine.create_execution_context()
        if ctx is None:
            raise CudaError(f"{self.what}: could not create an execution context for stage {k} (GPU memory?)")
        if scratch is not None:
            if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
                ctx.set_device_memory(scratch.ptr, scratch.nbytes)
            else:
                ctx.device_memory = scratch.ptr
        for name, ptr in addresses.items():
            if not ctx.set_tensor_address(name, ptr):
                raise CudaError(f"{self.what}: stage {k}: TensorRT refused the address of tensor '{name}'")
        return ctx

    def _bucket_sizes(self, k: int, capacity: int) -> Tuple[int, ...]:
        return tuple(b for b in self.buckets.sizes(capacity) if b <= self.profile_max[k])

    def _enqueue(self, ctx, k: int, rows: int, stream: int) -> None:
        s = self.stages[k]
        if not ctx.set_input_shape(s.input.name, (rows,) + s.input.shape):
            raise CudaError(f"{self.what}: stage {k}: TensorRT refused input shape {[rows, *s.input.shape]} "
                            f"(batch profile ends at {self.profile_max[k]})")
        if not ctx.execute_async_v3(stream):
            raise CudaError(f"{self.what}: stage {k}: execute_async_v3 failed on {rows} rows (see the "
                            "jei_edge.tensorrt log)")

    def _warm_native(self, lane: _Lane, ws) -> None:
        """Run every (stage, bucket) once: TensorRT-RTX captures its graph for each shape now."""
        for k in range(self.num_stages):
            for b in self._bucket_sizes(k, ws.capacity):
                self._enqueue(lane.contexts[k], k, b, ws.stream)
                lane.graphs[(k, b)] = (lane.contexts[k], None)
        ws.synchronize()

    def _capture_all(self, lane: _Lane, ws) -> None:
        """One context and one captured graph per (stage, bucket), on a lane-shared scratch buffer."""
        d = ws.driver
        size = max(int(getattr(e, "device_memory_size_v2", 0) or e.device_memory_size) for e in self.engines)
        lane.scratch = DeviceBuffer(d, (max(size, 1),), "uint8", stream=ws.stream, name="tensorrt scratch")
        for k in range(self.num_stages):
            for b in self._bucket_sizes(k, ws.capacity):
                ctx = self._context(k, lane.bound[k], scratch=lane.scratch)
                self._enqueue(ctx, k, b, ws.stream)  # warm-up: deferred work happens outside the capture
                ws.synchronize()
                try:
                    d.stream_begin_capture(ws.stream)
                except CudaError as exc:
                    self._give_up(lane, k, str(exc))
                    break
                ok, graph, why = False, None, ""
                try:
                    ok = bool(ctx.execute_async_v3(ws.stream))
                    why = "" if ok else "execute_async_v3 returned False while capturing"
                finally:
                    try:
                        graph = d.stream_end_capture(ws.stream)
                    except CudaError as exc:
                        ok, why = False, str(exc)
                if not ok:
                    if graph is not None:
                        d.graph_destroy(graph)
                    self._give_up(lane, k, why)
                    break
                exe = d.graph_instantiate(graph)
                d.graph_destroy(graph)
                lane.graphs[(k, b)] = (ctx, exe)

    def _give_up(self, lane: _Lane, k: int, why: str) -> None:
        """Stage ``k`` runs plain enqueues (its enqueue cannot be captured)."""
        for key in [key for key in lane.graphs if key[0] == k]:
            lane.driver.graph_exec_destroy(lane.graphs.pop(key)[1])
        if k not in self.uncapturable:
            self.uncapturable[k] = why
            LOG.warning("%s: stage %d runs without CUDA graphs: %s", self.what, k, why)

    def execute(self, k: int, n: int, ws) -> None:
        lane = self._lanes.get(id(ws))
        if lane is None:
            raise CudaError("TensorRT executor: workspace was not prepared for it")
        b = self.buckets.bucket_for(n, ws.capacity) if self.graph_mode != "off" else None
        entry = lane.graphs.get((k, b)) if b is not None else None
        if entry is not None and entry[1] is not None:  # a captured graph of this bucket
            ws.driver.graph_launch(entry[1], ws.stream)
            self.graph_replays += 1
            return
        # native: TensorRT-RTX replays its own graph of the bucket's shape
        self._enqueue(lane.contexts[k], k, b if entry is not None else n, ws.stream)
        self.enqueues += 1

    def release(self, ws) -> None:
        """Destroy ``ws``'s graphs and free its scratch (contexts die with their last reference)."""
        lane = self._lanes.pop(id(ws), None)
        if lane is None:
            return
        for _, exe in lane.graphs.values():
            if exe is not None:
                lane.driver.graph_exec_destroy(exe)
        lane.graphs.clear()
        lane.contexts.clear()
        if lane.scratch is not None:
            lane.driver.stream_synchronize(ws.stream)
            lane.scratch.free()

    def close(self) -> None:
        for lane in list(self._lanes.values()):
            for _, exe in lane.graphs.values():
                if exe is not None:
                    lane.driver.graph_exec_destroy(exe)
            if lane.scratch is not None:
                lane.scratch.free()
        self._lanes.clear()
        self.engines = []
        self.runtime = None

    def bound_addresses(self, ws) -> Dict[int, Dict[str, int]]:
        """What each stage's context of ``ws`` reads and writes (for tests and `selftest`)."""
        return self._lanes[id(ws)].bound

