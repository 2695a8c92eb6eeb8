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

The toolchain module is passed in (``toolchain.import_toolchain``); tests pass a recorded-engine
double, never presented as hardware validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

from jei_edge._io import shorten
from jei_edge.bundle.manifest import Stage
from jei_edge.errors import BundleError
from jei_edge.runtime.cuda.driver import CudaError
from jei_edge.runtime.loop import Capability, StageExecutor

# TensorRT DataType name -> the manifest's element type
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
          "INT64": "int64"}


def _dtype_name(dt) -> str:
    return DTYPES.get(str(dt).split(".")[-1].upper(), str(dt))


@dataclass
class _Lane:
    """One workspace's execution contexts (one per stage) and what was bound into them."""

    contexts: List[object]
    input_names: List[str]
    bound: Dict[int, Dict[str, int]] = field(default_factory=dict)


class TensorRTExecutor(StageExecutor):
    """Engines of one bundle, run on the CUDA workspace's buffers and stream.

    Args:
        trt: the ``tensorrt`` or ``tensorrt_rtx`` module (or a test double).
        engines: the serialized engine of every stage, in stage order.
        stages: the manifest's stages (names, per-row shapes and dtypes every engine must have).
        logger: the ``trt.ILogger`` (``toolchain.logger``).
        what: how errors name the bundle.
    """

    # writes into the workspace's output buffers (no BINDS_OUTPUTS); a merged stage's engine writes
    # probs [rows, exits, C] and gate [rows, gates], which the exit kernel decides in order
    capabilities = frozenset({Capability.MERGED_STAGES})

    def __init__(self, trt, engines: Sequence[bytes], stages: Sequence[Stage], logger, what: str = "bundle"):
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
        contexts, names, bound = [], [], {}
        for k, (engine, s) in enumerate(zip(self.engines, self.stages)):
            ctx = engine.create_execution_context()
            if ctx is None:
                raise CudaError(f"{self.what}: could not create an execution context for stage {k} (GPU memory?)")
            addresses = {s.input.name: int(ws.stage_input(k).device_ptr)}
            outs = ws.stage_outputs(k)
            if outs is None:
                raise CudaError("the TensorRT executor writes into workspace-owned outputs; this workspace has none")
            addresses.update({t.name: int(outs[t.name].ptr) for t in s.outputs})
            for name, ptr in addresses.items():
                if not ctx.set_tensor_address(name, ptr):
                    raise CudaError(f"{self.what}: stage {k}: TensorRT refused the address of tensor '{name}'")
            contexts.append(ctx)
            names.append(s.input.name)
            bound[k] = addresses
        self._lanes[id(ws)] = _Lane(contexts, names, bound)

    def execute(self, k: int, n: int, ws) -> None:
        lane = self._lanes.get(id(ws))
        if lane is None:
            raise CudaError("TensorRT executor: workspace was not prepared for it")
        s = self.stages[k]
        ctx = lane.contexts[k]
        if not ctx.set_input_shape(lane.input_names[k], (n,) + s.input.shape):
            raise CudaError(f"{self.what}: stage {k}: TensorRT refused input shape {[n, *s.input.shape]} "
                            f"(batch profile ends at {self.profile_max[k]})")
        if not ctx.execute_async_v3(ws.stream):
            raise CudaError(f"{self.what}: stage {k}: execute_async_v3 failed on {n} rows (see the "
                            "jei_edge.tensorrt log)")
        self.enqueues += 1

    def release(self, ws) -> None:
        self._lanes.pop(id(ws), None)  # contexts die with their last reference

    def close(self) -> None:
        self._lanes.clear()
        self.engines = []
        self.runtime = None

    def bound_addresses(self, ws) -> Dict[int, Dict[str, int]]:
        """What each stage's context of ``ws`` reads and writes (for tests and `selftest`)."""
        return self._lanes[id(ws)].bound

