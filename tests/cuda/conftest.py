"""Fakes for testing the CUDA runtime's host-side orchestration without a GPU.

``FakeDriver`` implements the ``CudaDriver`` surface on host memory: "device" pointers are
addresses of numpy buffers, copies run immediately, and a launch of the exit kernel runs
``emulate_exit_kernel`` (numpy, with the decision taken by ``jei_edge.exit_rule.exit_mask``) on
the argument struct the launcher packed. Every call is logged as ``(op, stream, ...)`` so tests can
check stream/event ordering. ``MockExecutor`` is a row-independent numpy "model" with a reference
of its own full forward pass.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from jei_edge.exit_rule import exit_mask
from jei_edge.runtime.cuda.kernel import ExitArgs, ExitKernel
from jei_edge.runtime.cuda.nvrtc import CompiledKernel
from jei_edge.bundle.manifest import Stage, TensorSpec
from jei_edge.runtime.loop import Capability, StageExecutor


def view(ptr, dtype, count):
    dtype = np.dtype(dtype)
    raw = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count)


def emulate_exit_kernel(a: ExitArgs) -> None:
    """What exit_kernel.cu does, in numpy (exited rows -> original slots, survivors compacted): the
    stage's gates in order with ``jei_edge.exit_rule.exit_mask``, the earliest that fires wins."""
    n, C, E, G = a.n, a.num_classes, a.num_exits, a.num_gates
    idx = view(a.idx_in, np.int32, n).copy()
    probs = view(a.probs, np.float32, n * E * C).reshape(n, E, C)
    S = view(a.s_in, np.float64, n).copy()
    slot = np.full(n, -1, np.int64)  # the exit slot each row takes (-1: survives)
    if a.mode == 2:
        slot[:] = E - 1
    else:
        g = view(a.gate, np.float32, n * G).reshape(n, G) if G else np.zeros((n, 0), np.float32)
        for j in range(G):
            fire = (slot < 0) & exit_mask(g[:, j], S, a.deltas[j]) if a.mode == 0 else np.zeros(n, bool)
            slot[fire] = j
            S = np.where(slot < 0, S + g[:, j], S)
        if a.final_head:
            slot[slot < 0] = E - 1
    survive = slot < 0
    rows = np.flatnonzero(~survive)
    slots = idx[rows]
    B = int(slots.max()) + 1 if slots.size else 0
    if slots.size:
        p = probs[rows, slot[rows]]
        view(a.out_probs, np.float32, B * C).reshape(B, C)[slots] = p
        view(a.out_class, np.int32, B)[slots] = np.argmax(p, axis=1)
        view(a.out_conf, np.float32, B)[slots] = np.max(p, axis=1)
        view(a.out_exit, np.int32, B)[slots] = a.first_exit + slot[rows]
    m = int(survive.sum())
    if m:
        rb = a.row_bytes
        hid = view(a.hidden_in, np.uint8, n * rb).reshape(n, rb)[survive].copy()
        view(a.hidden_out, np.uint8, m * rb).reshape(m, rb)[:] = hid
        view(a.s_out, np.float64, m)[:] = S[survive]
        view(a.idx_out, np.int32, m)[:] = idx[survive]
    view(a.survivors, np.int32, 1)[0] = m


class FakeDriver:
    """Host-memory stand-in for ``CudaDriver`` (see the module docstring)."""

    arch = 90
    name = "FakeGPU"
    compute_capability = (9, 0)
    multiprocessors = 4
    integrated = False

    def __init__(self, can_map_host_memory: bool = True):
        self.can_map_host_memory = can_map_host_memory
        self.mem = {}
        self.host = {}
        self.log = []
        self._lock = threading.Lock()
        self._handles = 100
        self.current_threads = set()
        self.capturing, self.graphs, self.graph_execs = {}, {}, {}
        self.invalidate_capture = False

    def _new(self):
        with self._lock:
            self._handles += 1
            return self._handles

    def _alloc(self, table, nbytes):
        buf = np.zeros(int(nbytes) + 256, np.uint8)
        base = buf.ctypes.data
        ptr = (base + 255) // 256 * 256
        table[ptr] = (buf, int(nbytes))
        return ptr

    def _rec(self, *item):
        with self._lock:
            self.log.append(item)

    def make_current(self):
        self.current_threads.add(threading.get_ident())

    def mem_alloc(self, nbytes):
        self._rec("mem_alloc", None, nbytes)
        return self._alloc(self.mem, nbytes)

    def mem_free(self, ptr):
        self.mem.pop(ptr)

    def host_alloc(self, nbytes, mapped=False):
        self._rec("host_alloc", None, nbytes, mapped)
        return self._alloc(self.host, nbytes)

    def host_free(self, ptr):
        self.host.pop(ptr)

    def host_device_pointer(self, host_ptr):
        return host_ptr

    def memset_async(self, ptr, value, nbytes, stream):
        self._rec("memset", stream, ptr, nbytes)
        ctypes.memset(ptr, value, nbytes)

    def memcpy_htod_async(self, dst, src, nbytes, stream):
        self._rec("htod", stream, dst, nbytes)
        ctypes.memmove(dst, src, nbytes)

    def memcpy_dtoh_async(self, dst, src, nbytes, stream):
        self._rec("dtoh", stream, src, nbytes)
        ctypes.memmove(dst, src, nbytes)

    def memcpy_dtod_async(self, dst, src, nbytes, stream):
        self._rec("dtod", stream, dst, nbytes)
        ctypes.memmove(dst, src, nbytes)

    def stream_create(self):
        return self._new()

    def stream_destroy(self, s):
        pass

    def stream_synchronize(self, s):
        self._rec("stream_sync", s)

    def stream_wait_event(self, s, e):
        self._rec("wait_event", s, e)

    def event_create(self, timing=False):
        return self._new()

    def event_destroy(self, e):
        pass

    def event_record(self, e, s):
        self._rec("record", s, e)

    def event_synchronize(self, e):
        self._rec("event_sync", None, e)

    def module_load(self, image):
        return "module"

    def module_function(self, module, name):
        return name

    # CUDA graphs: work "enqueued" on a capturing stream is recorded (FakeTensorRT appends closures)
    def stream_begin_capture(self, stream):
        self._rec("begin_capture", stream)
        assert stream not in self.capturing
        self.capturing[stream] = []

    def stream_end_capture(self, stream):
        self._rec("end_capture", stream)
        work = self.capturing.pop(stream)
        if self.invalidate_capture:
            from jei_edge.runtime.cuda.driver import CudaError

            raise CudaError("CUDA call cuStreamEndCapture failed on device 0: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED")
        graph = self._new()
        self.graphs[graph] = work
        return graph

    def graph_instantiate(self, graph):
        exe = self._new()
        self.graph_execs[exe] = list(self.graphs[graph])
        return exe

    def graph_launch(self, exe, stream):
        self._rec("graph_launch", stream, exe)
        for work in self.graph_execs[exe]:
            work()

    def graph_destroy(self, graph):
        self.graphs.pop(graph)

    def graph_exec_destroy(self, exe):
        self.graph_execs.pop(exe)

    def launch(self, function, grid, block, shared, stream, params_address):
        addr = ctypes.c_void_p.from_address(params_address).value
        args = ExitArgs.from_address(addr)
        self._rec("launch", stream, grid, args.n, args.mode)
        if stream in self.capturing:  # a kernel node: its arguments are copied at capture, as CUDA does
            frozen = ExitArgs.from_buffer_copy(args)
            self.capturing[stream].append(lambda: emulate_exit_kernel(frozen))
            return
        emulate_exit_kernel(args)


FAKE_IMAGE = CompiledKernel(b"\x7fELF-fake", 90, "cubin", (13, 0))


def fake_kernel(driver):
    return ExitKernel(driver, compiled=FAKE_IMAGE)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


class MockExecutor(StageExecutor):
    """A row-independent numpy model: stage k maps hidden rows h -> tanh(h * a_k + b_k); its exit
    gives probs = softmax(h @ W_k) and gate = sigmoid(h @ v_k). Works on fake-driver memory.

    ``binds`` = True: outputs live in the executor's own arrays and are bound by address
    (the torch executor's way, ``Capability.BINDS_OUTPUTS``); False: written into the workspace's
    output buffers (TensorRT's). ``hidden_dtype``: the element type of the hidden state between
    stages (``float16`` like an FP16 engine: computed in FP32, stored rounded to FP16).
    """

    def __init__(self, num_stages=4, row_shape=(3, 5), num_classes=6, seed=0, binds=False, gate_scale=3.0,
                 hidden_dtype="float32"):
        rng = np.random.default_rng(seed)
        self.num_stages, self.row_shape, self.num_classes = num_stages, tuple(row_shape), num_classes
        d = int(np.prod(row_shape))
        self.a = rng.normal(1.0, 0.2, num_stages).astype(np.float32)
        self.b = rng.normal(0.0, 0.3, num_stages).astype(np.float32)
        self.W = rng.normal(0, 1, (num_stages, d, num_classes)).astype(np.float32)
        self.v = (rng.normal(0, gate_scale / np.sqrt(d), (num_stages, d))).astype(np.float32)
        self.capabilities = frozenset({Capability.BINDS_OUTPUTS}) if binds else frozenset()
        self.hidden_dtype = np.dtype(hidden_dtype)
        self.calls = []
        self._own = {}

    @property
    def binds(self) -> bool:
        return Capability.BINDS_OUTPUTS in self.capabilities

    def forward(self, k, h):
        h2 = np.tanh(h.reshape(len(h), -1).astype(np.float32) * self.a[k] + self.b[k]).astype(np.float32)
        # products summed per row, not BLAS matmuls: a row's result must not depend on how many
        # rows share the call (BLAS kernels round differently by batch size), so results are exact
        probs = _softmax((h2[:, :, None] * self.W[k][None]).sum(axis=1))
        gate = (1.0 / (1.0 + np.exp(-(h2 * self.v[k][None]).sum(axis=1)))).astype(np.float32)
        return h2.reshape((len(h),) + self.row_shape).astype(self.hidden_dtype), probs, gate

    def reference(self, x, offsets=None):
        """Exit index and probs of every row from a full forward pass + the numpy exit rule."""
        from jei_edge.exit_rule import exit_levels

        h, P, G = x.astype(np.float32), [], []  # stage 0 reads float32 input; later stages hidden_dtype
        for k in range(self.num_stages):
            h, p, g = self.forward(k, h)
            P.append(p)
            G.append(g)
        gates = np.stack(G[:-1], axis=1) if self.num_stages > 1 else np.zeros((len(x), 0), np.float32)
        levels = exit_levels(gates, offsets)
        probs = np.stack(P, axis=1)[np.arange(len(x)), levels]
        return levels, probs, gates

    def execute(self, k, n, ws):
        self.calls.append((k, n))
        d = int(np.prod(self.row_shape))
        in_dtype = np.float32 if k == 0 else self.hidden_dtype
        h = view(ws.stage_input(k).device_ptr, in_dtype, n * d).reshape((n,) + self.row_shape)
        hid, probs, gate = self.forward(k, h)
        last = k == self.num_stages - 1
        if self.binds:
            key = (id(ws), k)
            if key not in self._own:
                B = ws.capacity
                self._own[key] = (np.zeros((B,) + self.row_shape, self.hidden_dtype),
                                  np.zeros((B, self.num_classes), np.float32), np.zeros(B, np.float32))
            H, P, G = self._own[key]
            H[:n], P[:n], G[:n] = hid, probs, gate
            if last:
                ws.bind_outputs(k, probs=P.ctypes.data)
            else:
                ws.bind_outputs(k, hidden=H.ctypes.data, probs=P.ctypes.data, gate=G.ctypes.data)
        else:
            outs = ws.stage_outputs(k)
            view(outs["probs"].ptr, np.float32, n * self.num_classes)[:] = probs.ravel()
            if not last:
                view(outs["hidden_out"].ptr, self.hidden_dtype, n * d)[:] = hid.ravel()
                view(outs["gate"].ptr, np.float32, n)[:] = gate


def stage(k, in_shape, hidden_shape, num_classes, last, hidden_dtype="float32", in_dtype="float32"):
    """A manifest ``Stage`` with one exit (k), for workspaces built without a bundle."""
    inp = TensorSpec("x" if k == 0 else "hidden_in", tuple(in_shape), in_dtype)
    probs = TensorSpec("probs", (num_classes,))
    outs = (probs,) if last else (TensorSpec("hidden_out", tuple(hidden_shape), hidden_dtype), probs,
                                  TensorSpec("gate", ()))
    return Stage(k, f"stages/stage{k}.onnx", (k, k + 1), (k,), () if last else (k,), 0, False, (inp,), outs)


def specs_for(ex):
    """The manifest stages of a ``MockExecutor``."""
    hd = ex.hidden_dtype.name
    return [stage(k, ex.row_shape, ex.row_shape, ex.num_classes, k == ex.num_stages - 1, hidden_dtype=hd,
                  in_dtype="float32" if k == 0 else hd) for k in range(ex.num_stages)]


def own_outputs(ex) -> bool:
    """Whether the workspace allocates stage outputs for ``ex`` (it does not bind its own)."""
    return Capability.BINDS_OUTPUTS not in ex.capabilities


@pytest.fixture
def fake_driver():
    return FakeDriver()


class MergedMockExecutor(StageExecutor):
    """A ``MockExecutor`` run as merged stages: stage i covers the mock's exits ``spans[i]``
    (first, last) and outputs the last hidden state, ``probs [n, E, C]`` and ``gate [n, gates]``
    (one fewer when it holds the final head), like a ``--plan`` bundle's merged stage graph.
    Decisions must equal the unmerged mock's ``reference``."""

    def __init__(self, mock: MockExecutor, spans):
        self.mock, self.spans = mock, [tuple(s) for s in spans]
        assert self.spans[0][0] == 0 and self.spans[-1][1] == mock.num_stages - 1
        self.num_stages, self.num_classes, self.row_shape = len(self.spans), mock.num_classes, mock.row_shape
        self.capabilities = frozenset({Capability.MERGED_STAGES}) | (mock.capabilities & {Capability.BINDS_OUTPUTS})
        self.calls = []
        self._own = {}

    def specs(self):
        C, last_exit = self.num_classes, self.mock.num_stages - 1
        hd = self.mock.hidden_dtype.name
        out = []
        for i, (a, b) in enumerate(self.spans):
            exits = tuple(range(a, b + 1))
            gates = tuple(e for e in exits if e < last_exit)
            inp = TensorSpec("x" if i == 0 else "hidden_in", self.row_shape, "float32" if i == 0 else hd)
            one = len(exits) == 1
            probs = TensorSpec("probs", (C,) if one else (len(exits), C))
            gate = TensorSpec("gate", () if one else (len(gates),))
            outs = ((TensorSpec("hidden_out", self.row_shape, hd),) if b < last_exit else ()) + (probs,)
            outs += (gate,) if gates else ()
            out.append(Stage(i, f"stages/stage{i}.onnx", (a, b + 1), exits, gates, 0, False, (inp,), outs))
        return out

    def forward(self, i, h):
        a, b = self.spans[i]
        P, G = [], []
        for k in range(a, b + 1):
            h, p, g = self.mock.forward(k, h)
            P.append(p)
            G.append(g)
        gates = [g for k, g in zip(range(a, b + 1), G) if k < self.mock.num_stages - 1]
        return h, np.stack(P, axis=1), (np.stack(gates, axis=1) if gates else None)

    def execute(self, i, n, ws):
        self.calls.append((i, n))
        d = int(np.prod(self.row_shape))
        in_dtype = np.float32 if i == 0 else self.mock.hidden_dtype
        h = view(ws.stage_input(i).device_ptr, in_dtype, n * d).reshape((n,) + self.row_shape)
        hid, probs, gate = self.forward(i, h)
        has_hidden = self.spans[i][1] < self.mock.num_stages - 1
        if Capability.BINDS_OUTPUTS in self.capabilities:
            H, P, G = self._own.setdefault((id(ws), i), (np.zeros((ws.capacity,) + hid.shape[1:], hid.dtype),
                                                         np.zeros((ws.capacity,) + probs.shape[1:], np.float32),
                                                         np.zeros((ws.capacity,) + (gate.shape[1:] if gate is not None
                                                                                    else (0,)), np.float32)))
            H[:n], P[:n] = hid, probs
            if gate is not None:
                G[:n] = gate
            ws.bind_outputs(i, probs=P.ctypes.data, hidden=H.ctypes.data if has_hidden else 0,
                            gate=G.ctypes.data if gate is not None else 0)
            return
        outs = ws.stage_outputs(i)
        view(outs["probs"].ptr, np.float32, probs.size)[:] = probs.ravel()
        if has_hidden:
            view(outs["hidden_out"].ptr, self.mock.hidden_dtype, hid.size)[:] = hid.ravel()
        if gate is not None:
            view(outs["gate"].ptr, np.float32, gate.size)[:] = gate.ravel()
