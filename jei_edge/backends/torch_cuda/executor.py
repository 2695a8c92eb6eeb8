"""torch-cuda ``StageExecutor``: the bundle's stage modules run by PyTorch on the GPU.

Stage modules are rebuilt from the ``model.pt`` the bundle was built from (``model.stage(k)``).
They read the workspace's input buffers in place (wrapped through ``__cuda_array_interface__``, no
copy) and run on the workspace's stream (``torch.cuda.ExternalStream``), so the exit kernel that
follows on the same stream sees their outputs without extra synchronisation. Outputs stay in
PyTorch memory; the executor hands their addresses to the workspace (``bind_outputs``).

CUDA graphs: one graph per (workspace, stage, batch bucket), buckets from the shared
``jei_edge.runtime.cuda.graphs.Buckets``. Graphs are captured when a workspace is prepared, never
in the steady state.

It runs on any CUDA GPU PyTorch supports (the H100 included, which TensorRT-RTX does not) and is
how the CUDA path is validated.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from jei_edge.bundle.manifest import Stage, TensorSpec
from jei_edge.errors import BundleError, InputError
from jei_edge.runtime.cuda.graphs import Buckets
from jei_edge.runtime.cuda.workspace import CudaWorkspace
from jei_edge.runtime.loop import Capability, StageExecutor


def set_tf32(torch, enabled: bool) -> None:
    """TF32 on/off for matmuls and cuDNN convolutions (off keeps FP32 parity with the CPU runtime)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
        torch.set_float32_matmul_precision("high" if enabled else "highest")


class _Contiguous:
    """A stage module whose outputs are contiguous (the exit kernel reads rows by address)."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x):
        out = self.module(x)
        if isinstance(out, tuple):
            return tuple(t.contiguous() for t in out)
        return out.contiguous()


@dataclass
class _Lane:
    """Per-workspace state: torch views of its buffers, its stream, graphs and live outputs."""

    stream: object
    inputs: List[object]
    graphs: Dict[Tuple[int, int], Tuple[object, object]] = field(default_factory=dict)
    hold: List[object] = field(default_factory=list)
    pool: object = None


class TorchCudaExecutor(StageExecutor):
    """Stage modules of a JEIModel run by PyTorch on one GPU.

    Args:
        model: a ``JEIModel`` (eval mode; moved to the GPU here).
        device_index: CUDA device ordinal.
        graphs: capture CUDA graphs per (stage, bucket).
        graph_max_batch: largest batch served by a graph (larger live counts run eagerly).
        buckets: explicit graph buckets (default ``default_buckets``).
        tf32: allow TF32 (faster on Ampere+, breaks FP32 parity); sets PyTorch's global flags.
        spans: ``(first exit, last exit)`` of every stage (a ``--plan`` bundle's merged stages);
            default one stage per exit.
    """

    capabilities = frozenset({Capability.BINDS_OUTPUTS, Capability.MERGED_STAGES})

    def __init__(self, model, *, device_index: int = 0, graphs: bool = True, graph_max_batch: int = 256,
                 buckets: Optional[Sequence[int]] = None, tf32: bool = False,
                 spans: Optional[Sequence[Tuple[int, int]]] = None):
        from jei_edge._deps import require

        torch = require("torch", purpose="the torch-cuda stage executor")
        if not torch.cuda.is_available():
            from jei_edge.runtime.cuda.driver import CudaUnavailableError

            raise CudaUnavailableError("PyTorch sees no CUDA GPU (torch.cuda.is_available() is False)",
                                       hint="install a CUDA build of PyTorch, or run with --device cpu")
        self.torch = torch
        set_tf32(torch, tf32)
        self.device = torch.device("cuda", device_index)
        self.model = model.eval().to(self.device)
        self.spans = check_spans(spans, len(model.stage_ranges()))
        self.num_stages = len(self.spans)
        self.modules = [_Contiguous(model.stage(a, last_exit=b).eval()) for a, b in self.spans]
        self.buckets = Buckets(graphs, graph_max_batch, buckets)
        self._lanes: Dict[int, _Lane] = {}
        self._lock = threading.Lock()
        self.graph_replays = 0
        self.eager_runs = 0

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    # -- lanes -----------------------------------------------------------------------------
    def prepare(self, ws: CudaWorkspace) -> None:
        """Wrap ``ws``'s buffers for PyTorch, warm the allocator up at ``max_batch`` and capture
        the CUDA graphs of every (stage, bucket). Call once per workspace, before running."""
        torch = self.torch
        with self._lock:
            if id(ws) in self._lanes:
                return
            ws.driver.make_current()
            stream = torch.cuda.ExternalStream(ws.stream, device=self.device)
            inputs = [torch.as_tensor(ws.stage_input(k), device=self.device) for k in range(self.num_stages)]
            lane = _Lane(stream, inputs, hold=[None] * self.num_stages)
            self._lanes[id(ws)] = lane
            with torch.no_grad(), torch.cuda.stream(stream):
                for k in range(self.num_stages):  # eager warm-up at the largest size
                    self.modules[k](inputs[k][: ws.capacity])
            if self.buckets.enabled:
                lane.pool = torch.cuda.graph_pool_handle()
                for k in range(self.num_stages):
                    for b in self.buckets.sizes(ws.capacity):
                        lane.graphs[(k, b)] = self._capture(lane, k, b)
            stream.synchronize()

    def _capture(self, lane: _Lane, k: int, b: int):
        torch = self.torch
        static_in = lane.inputs[k][:b]
        with torch.no_grad():
            with torch.cuda.stream(lane.stream):
                for _ in range(2):
                    self.modules[k](static_in)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=lane.pool, stream=lane.stream):
                out = self.modules[k](static_in)
        return g, out

    def release(self, ws: CudaWorkspace) -> None:
        """Drop ``ws``'s graphs and views (before closing the workspace)."""
        with self._lock:
            self._lanes.pop(id(ws), None)

    # -- StageExecutor ---------------------------------------------------------------------
    def execute(self, k: int, n: int, ws: CudaWorkspace) -> None:
        lane = self._lanes.get(id(ws))
        if lane is None:
            self.prepare(ws)
            lane = self._lanes[id(ws)]
        torch = self.torch
        b = self.buckets.bucket_for(n, ws.capacity)
        with torch.cuda.stream(lane.stream):
            if b is not None:
                g, out = lane.graphs[(k, b)]
                g.replay()
                self.graph_replays += 1
            else:
                with torch.no_grad():
                    out = self.modules[k](lane.inputs[k][:n])
                self.eager_runs += 1
        lane.hold[k] = out  # keeps eager outputs alive until the boundary kernel has read them
        ws.bind_outputs(k, **_output_pointers(out))


def _output_pointers(out) -> Dict[str, int]:
    """``bind_outputs`` keywords of a stage module's outputs: ``probs`` (a one-exit last stage),
    ``(probs, gate)`` (a merged last stage) or ``(hidden, probs, gate)``."""
    if not isinstance(out, tuple):
        return {"probs": out.data_ptr()}
    if len(out) == 2:
        return {"probs": out[0].data_ptr(), "gate": out[1].data_ptr()}
    return {"hidden": out[0].data_ptr(), "probs": out[1].data_ptr(), "gate": out[2].data_ptr()}


def check_spans(spans: Optional[Sequence[Tuple[int, int]]], num_exits: int) -> List[Tuple[int, int]]:
    """``(first, last)`` exit of every stage, in order, covering exits ``0..num_exits-1`` (default:
    one stage per exit)."""
    if spans is None:
        return [(k, k) for k in range(num_exits)]
    out = [(int(a), int(b)) for a, b in spans]
    flat = [e for a, b in out for e in range(a, b + 1)]
    if not out or flat != list(range(num_exits)) or any(b < a for a, b in out):
        raise BundleError(f"stage exit spans {out} do not cover exits 0..{num_exits - 1} in order",
                          hint="rebuild the bundle from this model")
    return out


def stages_from_model(model, torch, device, spans: Optional[Sequence[Tuple[int, int]]] = None) -> List[Stage]:
    """The stages of a JEIModel (one exit each, or the merged ``spans``) as manifest ``Stage`` specs,
    found by running one zero row through its stage modules: for running a model without a bundle
    (tests, benchmarks) and for checking a bundle's model.pt."""
    stages, x = [], torch.zeros((1,) + tuple(model.input_shape), device=device)
    ranges = model.stage_ranges()
    last = len(ranges) - 1
    C = int(model.num_classes)
    with torch.no_grad():
        for i, (a, b) in enumerate(check_spans(spans, len(ranges))):
            out = model.stage(a, last_exit=b).eval()(x)
            exits = tuple(range(a, b + 1))
            gates = tuple(e for e in exits if e < last)
            one = len(exits) == 1
            inp = TensorSpec("x" if i == 0 else "hidden_in", tuple(x.shape[1:]))
            probs = TensorSpec("probs", (C,) if one else (len(exits), C))
            gate = TensorSpec("gate", () if one else (len(gates),))
            if b == last:
                outputs = (probs, gate) if gates else (probs,)
            else:
                h = out[0]
                if h.dtype != torch.float32:
                    raise InputError(f"stage {i} outputs a {h.dtype} hidden state; the torch-cuda executor "
                                     "runs FP32 models only")
                outputs = (TensorSpec("hidden_out", tuple(h.shape[1:])), probs, gate)
                x = h
            stages.append(Stage(index=i, file="", blocks=(ranges[a][0], ranges[b][1]), exits=exits, gates=gates,
                                macs=0, input_guard=False, inputs=(inp,), outputs=outputs))
    return stages


def check_model_matches(manifest, model_stages: List[Stage], num_classes: int, where: str) -> None:
    """The bundle's stages must be the model.pt's stages (same block ranges, shapes and classes)."""
    if len(manifest.stages) != len(model_stages):
        raise BundleError(f"{where}: manifest has {len(manifest.stages)} stages but its model.pt has "
                          f"{len(model_stages)}", hint="rebuild the bundle from this model")
    if manifest.num_classes != int(num_classes):
        raise BundleError(f"{where}: manifest num_classes {manifest.num_classes} != model.pt {num_classes}",
                          hint="rebuild the bundle from this model")
    for st, ms in zip(manifest.stages, model_stages):
        if st.blocks != ms.blocks and st.blocks != (ms.blocks[0], ms.blocks[1] - 1):
            raise BundleError(f"{where}: stage {st.index} covers blocks {list(st.blocks)} in the manifest but "
                              f"{list(ms.blocks)} in model.pt", hint="rebuild the bundle from this model")
        for a in ("input", "hidden"):
            got, want = getattr(st, a), getattr(ms, a)
            if got is not None and want is not None and got.dtype != want.dtype:
                raise BundleError(f"{where}: stage {st.index} {a} is {got.dtype} in the manifest (a lowered or INT8 "
                                  f"stage graph) but the torch-cuda executor runs model.pt in {want.dtype}",
                                  hint="run this bundle with --device cpu or its own target's backend, or build "
                                       "one for torch-cuda (FP32, --fp32-edges)")
            if (got and got.shape) != (want and want.shape):
                raise BundleError(f"{where}: stage {st.index} {a} has row shape {list(got.shape) if got else None} in "
                                  f"the manifest but {list(want.shape) if want else None} from model.pt",
                                  hint="rebuild the bundle from this model")
