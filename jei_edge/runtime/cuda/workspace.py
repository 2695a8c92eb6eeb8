"""The CUDA ``Workspace``: buffers of one batch on the GPU and the boundary work (one exit-kernel
launch per boundary).

Buffers are allocated once, for ``max_batch`` rows, when the workspace is built:

- ``x`` staging: pinned host memory (mapped zero-copy with ``mapped_io``), copied to the stage-0
  input on the copy stream;
- per stage: its input buffer (stage 0: ``x``; stage k > 0: ``hidden_in``, where the kernel
  compacts the survivors of stage k - 1) and, for executors that write into workspace memory
  (TensorRT), its outputs ``hidden_out``/``probs``/``gate``. Executors that allocate their own
  outputs (torch, CUDA graphs; ``Capability.BINDS_OUTPUTS``) call ``bind_outputs`` instead.
  Shapes and element types come from the bundle manifest's stages: hidden states may be FP32 or
  FP16 (the kernel copies rows as bytes); gates and probabilities are FP32 (a merged stage's are
  ``[rows, gates]`` and ``[rows, exits, classes]``: the kernel decides its gates in order);
- running gate sum ``S`` (FP64, as in the numpy exit rule) and original indices: a constant
  initial pair and a ping-pong pair;
- results (probs, class, confidence, exit index) in input order, and their pinned host mirrors;
- the survivor count: one int of mapped pinned host memory the kernel writes directly.

A boundary is: launch the kernel on the compute stream, record an event, wait for it, read the
count (one small host sync per boundary; none in ``full`` mode, where the count is known). ``kernel_launches`` counts launches; ``boundaries``
counts boundaries executed (every executed stage ends in one, the final head included).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from jei_edge.bundle.manifest import Stage
from jei_edge.errors import BundleError, InputError
from jei_edge.runtime.cuda.driver import CudaError
from jei_edge.runtime.cuda.kernel import (MAX_GATES, MAX_ROWS, MODE_ALL_EXIT, MODE_EXIT, MODE_NONE_EXIT,
                                          ExitKernel, KernelLauncher)
from jei_edge.runtime.cuda.memory import DeviceBuffer, HostBuffer
from jei_edge.runtime.loop import Capability, Results, Workspace


class CudaWorkspace(Workspace):
    """Workspace of one batch on one CUDA stream (a pipeline lane).

    Args:
        driver: the ``CudaDriver`` (or a test fake).
        kernel: the loaded ``ExitKernel``.
        stages: the manifest's stages (merged ones hold up to ``MAX_GATES`` gates).
        num_classes: C.
        max_batch: rows every buffer is sized for.
        own_outputs: allocate stage output buffers (executors that bind their own leave it False).
        mapped_io: input staging and results in mapped pinned host memory (zero-copy; integrated GPUs).
        max_grid: most blocks one exit-kernel launch uses.
    """

    capabilities = frozenset({Capability.BINDS_OUTPUTS, Capability.DEVICE_INPUT, Capability.MERGED_STAGES})
    input_owned = True  # begin() always copies the batch (host or device) into the stage-0 buffer

    def __init__(self, driver, kernel: ExitKernel, stages: Sequence[Stage], num_classes: int,
                 max_batch: int, *, own_outputs: bool = True, mapped_io: bool = False, max_grid: int = 1024):
        if not 1 <= max_batch <= MAX_ROWS:
            raise InputError(f"max_batch={max_batch} is outside 1..{MAX_ROWS} supported by the CUDA exit kernel",
                             hint=f"use max_batch <= {MAX_ROWS}; larger inputs are split into micro-batches")
        if mapped_io and not getattr(driver, "can_map_host_memory", True):
            raise InputError("mapped_io=True but this GPU cannot map host memory", hint="use mapped_io=False")
        big = [s.index for s in stages if len(s.gates) > MAX_GATES]
        if big:  # the kernel's argument struct holds MAX_GATES threshold offsets
            raise BundleError(f"stage(s) {big} hold more than {MAX_GATES} gates, more than the CUDA exit kernel decides "
                              "in one launch", hint="rebuild with a --plan that merges fewer exits per stage")
        for a, b in zip(stages[:-1], stages[1:]):
            if a.hidden is None or (a.hidden.shape, a.hidden.dtype) != (b.input.shape, b.input.dtype):
                got = f"{list(a.hidden.shape)} {a.hidden.dtype}" if a.hidden is not None else "nothing"
                raise CudaError(f"stage {a.index} outputs hidden rows of {got} but stage "
                                f"{b.index} expects {list(b.input.shape)} {b.input.dtype}")
        for s in stages:
            for t in s.outputs:
                if t.name in ("probs", "gate") and t.dtype != "float32":
                    raise CudaError(f"stage {s.index} output '{t.name}' is {t.dtype}; the exit kernel reads float32")
            want = {"probs": (num_classes,) if len(s.exits) == 1 else (len(s.exits), num_classes),
                    "gate": () if len(s.exits) == 1 else (len(s.gates),)}
            for name, shape in want.items():
                t = s.output(name)
                if t is not None and tuple(t.shape) != shape:
                    raise CudaError(f"stage {s.index} output '{name}' has row shape {list(t.shape)}; a stage with "
                                    f"{len(s.exits)} exit(s) and {len(s.gates)} gate(s) has {list(shape)}")
        self.driver, self.kernel = driver, kernel
        self.stages, self.num_classes, self.max_batch = list(stages), int(num_classes), int(max_batch)
        self.mapped_io = mapped_io
        self.launcher = KernelLauncher(kernel, max_grid=max_grid)
        self.boundaries = 0
        self.batch = 0
        self.last_classes: Optional[np.ndarray] = None
        self.last_confidence: Optional[np.ndarray] = None
        self._buffers: List = []
        d = driver
        self.stream, self.copy_stream = d.stream_create(), d.stream_create()
        self._ev_in, self._ev_boundary, self._ev_done, self._ev_ext = (d.event_create() for _ in range(4))
        B, C = self.max_batch, self.num_classes
        x0 = self.stages[0].input
        self.x_host = self._host((B,) + x0.shape, x0.dtype, mapped_io, "x")
        self.inputs: List = [self.x_host if mapped_io else self._dev((B,) + x0.shape, x0.dtype, "x")]
        for s in self.stages[1:]:
            self.inputs.append(self._dev((B,) + s.input.shape, s.input.dtype, f"hidden_in[{s.index}]"))
        self.outputs: List[Optional[Dict[str, DeviceBuffer]]] = []
        self._bound: List[List[int]] = []
        for s in self.stages:
            outs = None
            if own_outputs:  # hidden_out, probs and gate (what the stage has) at the manifest's shapes
                outs = {t.name: self._dev((B,) + tuple(t.shape), t.dtype, f"{t.name}[{s.index}]") for t in s.outputs}
            self.outputs.append(outs)
            self._bound.append([outs["hidden_out"].ptr if outs and "hidden_out" in outs else 0,
                                outs["probs"].ptr if outs else 0,
                                outs["gate"].ptr if outs and "gate" in outs else 0])
        self.s_init = self._dev((B,), np.float64, "S0")
        self.idx_init = self._dev((B,), np.int32, "idx0")
        self.s_pp = [self._dev((B,), np.float64, f"S{i}") for i in range(2)]
        self.idx_pp = [self._dev((B,), np.int32, f"idx{i}") for i in range(2)]
        iota = self._host((B,), np.int32, False, "iota")
        iota.array[:] = np.arange(B, dtype=np.int32)
        d.memcpy_htod_async(self.idx_init.ptr, iota.ptr, iota.nbytes, self.stream)

        res = [("probs", (B, C), np.float32), ("class", (B,), np.int32), ("conf", (B,), np.float32),
               ("exit", (B,), np.int32)]
        if mapped_io:
            self.results_host = {n: self._host(sh, dt, True, f"out_{n}") for n, sh, dt in res}
            self._results_dev = {n: b.device_ptr for n, b in self.results_host.items()}
        else:
            self.results_host = {n: self._host(sh, dt, False, f"out_{n}") for n, sh, dt in res}
            self._results_dev = {n: self._dev(sh, dt, f"out_{n}").ptr for n, sh, dt in res}
        self._map_count = getattr(driver, "can_map_host_memory", True)
        self.survivors = self._host((1,), np.int32, self._map_count, "survivors")
        self._survivors_dev = self.survivors.device_ptr if self._map_count else self._dev((1,), np.int32, "survivors").ptr
        d.stream_synchronize(self.stream)

    # -- allocation helpers (load time only) -----------------------------------------------
    def _dev(self, shape, dtype, name) -> DeviceBuffer:
        buf = DeviceBuffer(self.driver, shape, dtype, stream=self.stream, name=name)
        self._buffers.append(buf)
        return buf

    def _host(self, shape, dtype, mapped, name) -> HostBuffer:
        buf = HostBuffer(self.driver, shape, dtype, mapped=mapped, name=name)
        self._buffers.append(buf)
        return buf

    # -- what executors use ----------------------------------------------------------------
    @property
    def kernel_launches(self) -> int:
        return self.launcher.launches

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def capacity(self) -> int:
        return self.max_batch

    def stage_input(self, k: int):
        """Stage ``k``'s input buffer: ``device_ptr`` and ``__cuda_array_interface__``; ``capacity`` rows."""
        return self.inputs[k]

    def _input_ptr(self, k: int) -> int:
        return self.inputs[k].device_ptr

    def stage_outputs(self, k: int) -> Optional[Dict[str, DeviceBuffer]]:
        """Workspace-owned output buffers of stage ``k`` (None when the executor binds its own)."""
        return self.outputs[k]

    def bind_outputs(self, k: int, *, probs: int, hidden: int = 0, gate: int = 0) -> None:
        """Point the next boundary of stage ``k`` at outputs the executor wrote elsewhere (device
        addresses, valid until that boundary's kernel has run on ``self.stream``)."""
        b = self._bound[k]
        b[0], b[1], b[2] = hidden, probs, gate

    # -- Workspace -------------------------------------------------------------------------
    def begin(self, x) -> int:
        d = self.driver
        d.make_current()
        shape0 = self.stages[0].input.shape
        cai = getattr(x, "__cuda_array_interface__", None)
        if cai is not None:
            B = self._check_shape(tuple(cai["shape"]), shape0)
            if np.dtype(cai["typestr"]) != np.dtype(self.stages[0].input.dtype) or cai.get("strides") not in (None,):
                raise InputError(f"device input 'x' must be a contiguous {self.stages[0].input.dtype} array",
                                 hint="call .contiguous().float() first")
            producer = cai.get("stream")
            if producer:  # wait for the producer's stream (1: legacy default, 2: per-thread default)
                d.event_record(self._ev_ext, int(producer))
                d.stream_wait_event(self.stream, self._ev_ext)
            d.memcpy_dtod_async(self._input_ptr(0), int(cai["data"][0]), B * self.x_host.nbytes // self.max_batch,
                                self.stream)
        else:
            x = np.asarray(x)
            B = self._check_shape(x.shape, shape0)
            if not np.issubdtype(x.dtype, np.floating):
                raise InputError(f"input 'x' must be a float array, got dtype {x.dtype}", hint="pass float32 data")
            np.copyto(self.x_host.array[:B], x, casting="same_kind")
            if not self.mapped_io:
                d.memcpy_htod_async(self.inputs[0].ptr, self.x_host.ptr, B * self.inputs[0].row_bytes, self.copy_stream)
                d.event_record(self._ev_in, self.copy_stream)
                d.stream_wait_event(self.stream, self._ev_in)
        self.batch = B
        if self.mapped_io:
            self.results_host["exit"].array[:B] = -1
        else:  # poison the exit slots: every row must be written by exactly one boundary
            d.memset_async(self._results_dev["exit"], 0xFF, B * 4, self.stream)
        return B

    def _check_shape(self, shape: Tuple[int, ...], row: Tuple[int, ...]) -> int:
        if len(shape) != len(row) + 1 or tuple(shape[1:]) != row:
            raise InputError(f"input 'x' has shape {list(shape)}, expected [batch, {', '.join(map(str, row))}]",
                             hint="preprocess inputs to the bundle's input shape")
        B = int(shape[0])
        if not 1 <= B <= self.max_batch:
            raise InputError(f"input 'x' has {B} rows; this CUDA workspace holds 1..{self.max_batch}",
                             hint="load the runtime with a larger max_batch or split the input")
        return B

    def _pointers(self, k: int):
        s_in = self.s_init.ptr if k == 0 else self.s_pp[(k - 1) % 2].ptr
        idx_in = self.idx_init.ptr if k == 0 else self.idx_pp[(k - 1) % 2].ptr
        return s_in, idx_in

    def _deltas(self, k: int, delta) -> Tuple[float, ...]:
        """One offset per gate of stage ``k`` (a float applies to each; a merged stage takes a tuple)."""
        ng = len(self.stages[k].gates)
        if isinstance(delta, (tuple, list)):
            if len(delta) != ng:
                raise InputError(f"stage {k} has {ng} gate(s) but got {len(delta)} threshold offsets")
            return tuple(float(d) for d in delta)
        return (float(delta),) * ng

    def _launch(self, k: int, n: int, mode: int, delta, final_head: bool = False) -> None:
        spec = self.stages[k]
        gates = len(spec.gates)
        survive = mode != MODE_ALL_EXIT and not final_head  # rows may go on to stage k + 1
        hidden, probs, gate = self._bound[k]
        if not probs or (survive and not hidden) or (mode != MODE_ALL_EXIT and gates and not gate):
            raise CudaError(f"stage {k} has no bound outputs (the executor neither wrote workspace buffers "
                            "nor called bind_outputs)")
        s_in, idx_in = self._pointers(k)
        r = self._results_dev
        self.survivors.array[0] = -1
        self.launcher.launch(
            self.stream, n=n, mode=mode, first_exit=spec.exits[0], num_classes=self.num_classes,
            deltas=self._deltas(k, delta), num_gates=gates, num_exits=len(spec.exits), final_head=final_head,
            gate=gate, s_in=s_in, idx_in=idx_in, probs=probs, hidden_in=hidden if survive else 0,
            row_bytes=spec.hidden.row_bytes if survive else 0,
            s_out=self.s_pp[k % 2].ptr if survive else 0, idx_out=self.idx_pp[k % 2].ptr if survive else 0,
            hidden_out=self._input_ptr(k + 1) if survive else 0,
            out_probs=r["probs"], out_class=r["class"], out_conf=r["conf"], out_exit=r["exit"],
            survivors=self._survivors_dev)
        self.boundaries += 1

    def exit_and_compact(self, k: int, n: int, delta, early_exit: bool) -> int:
        if n <= 0:
            return 0
        self._launch(k, n, MODE_EXIT if early_exit else MODE_NONE_EXIT, delta)
        if not early_exit:  # ``full``: every row survives, so the host need not wait for the count
            return n
        d = self.driver
        if not self._map_count:
            d.memcpy_dtoh_async(self.survivors.ptr, self._survivors_dev, 4, self.stream)
        d.event_record(self._ev_boundary, self.stream)
        d.event_synchronize(self._ev_boundary)
        m = int(self.survivors.array[0])
        if not 0 <= m <= n:
            raise CudaError(f"exit kernel after stage {k} reported {m} survivors of {n} rows (kernel did not run?)")
        return m

    def finish(self, k: int, n: int, delta=0.0, early_exit: bool = True) -> None:
        # the last stage's rows all leave: through its gates when it is merged (exit mode), the
        # others (every row in full mode, and a one-exit last stage) at the final head
        if n <= 0:
            return
        if early_exit and self.stages[k].gates:
            self._launch(k, n, MODE_EXIT, delta, final_head=True)
        else:
            self._launch(k, n, MODE_ALL_EXIT, delta)

    def collect(self, reach: List[int]) -> Results:
        d, B = self.driver, self.batch
        h = self.results_host
        if not self.mapped_io:
            d.event_record(self._ev_boundary, self.stream)
            d.stream_wait_event(self.copy_stream, self._ev_boundary)
            for name in ("probs", "class", "conf", "exit"):
                row = h[name].nbytes // self.max_batch
                d.memcpy_dtoh_async(h[name].ptr, self._results_dev[name], B * row, self.copy_stream)
            d.event_record(self._ev_done, self.copy_stream)
        else:
            d.event_record(self._ev_done, self.stream)
        d.event_synchronize(self._ev_done)
        exit_index = h["exit"].array[:B].astype(np.int64)
        if (exit_index < 0).any():
            raise CudaError(f"{int((exit_index < 0).sum())} of {B} rows got no result (runtime bug)")
        self.last_classes = h["class"].array[:B].astype(np.int64)
        self.last_confidence = h["conf"].array[:B].copy()
        return Results(probs=h["probs"].array[:B].copy(), exit_index=exit_index, reach=list(reach))

    def synchronize(self) -> None:
        self.driver.stream_synchronize(self.stream)

    def close(self) -> None:
        """Free every buffer, stream and event (the workspace is unusable afterwards)."""
        if not self._buffers:
            return
        d = self.driver
        d.stream_synchronize(self.stream)
        d.stream_synchronize(self.copy_stream)
        for buf in self._buffers:
            buf.free()
        self._buffers = []
        for ev in (self._ev_in, self._ev_boundary, self._ev_done, self._ev_ext):
            d.event_destroy(ev)
        d.stream_destroy(self.stream)
        d.stream_destroy(self.copy_stream)
