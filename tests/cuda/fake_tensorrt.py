"""``FakeTensorRT``: a recorded-engine test double of the TensorRT Python API surface the executor
uses (``Runtime``, ``ICudaEngine``, ``IExecutionContext``, ``ILogger``, ``TensorIOMode``).

A "serialized engine" here is JSON recording one stage's I/O (names, modes, dtypes, shapes, batch
profile); ``execute_async_v3`` computes that stage of a ``MockExecutor`` on fake-driver memory
(host addresses), reading and writing exactly at the addresses the executor set. Every call is
logged, so tests check shapes, addresses, streams and call order. Host logic only: **not** a
validation of TensorRT or of any GPU.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from .conftest import view


class _Enum:
    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name

    def __repr__(self):
        return f"{self.kind}.{self.name}"

    __str__ = __repr__

    def __eq__(self, other):
        return isinstance(other, _Enum) and (self.kind, self.name) == (other.kind, other.name)

    def __hash__(self):
        return hash((self.kind, self.name))


DTYPE = {"float32": _Enum("DataType", "FLOAT"), "float16": _Enum("DataType", "HALF")}


def record_engine(stage, profile=(1, 8, 64)) -> bytes:
    """The "serialized engine" of a manifest ``Stage`` (what a real build of its graph would hold)."""
    io = [[t.name, "INPUT", t.dtype, [-1, *t.shape]] for t in stage.inputs]
    io += [[t.name, "OUTPUT", t.dtype, [-1, *t.shape]] for t in stage.outputs]
    return json.dumps({"stage": stage.index, "io": io, "profile": list(profile)}).encode()


class FakeEngine:
    def __init__(self, trt, rec):
        self.trt, self.rec = trt, rec
        self.k = rec["stage"]
        self.io = {name: (mode, dtype, tuple(shape)) for name, mode, dtype, shape in rec["io"]}
        self.names = [n for n, *_ in rec["io"]]

    @property
    def num_io_tensors(self):
        return len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return getattr(self.trt.TensorIOMode, self.io[name][0])

    def get_tensor_dtype(self, name):
        return DTYPE[self.io[name][1]]

    def get_tensor_shape(self, name):
        return self.io[name][2]

    def get_tensor_profile_shape(self, name, profile):
        row = self.io[name][2][1:]
        return tuple((b,) + row for b in self.rec["profile"])

    @property
    def device_memory_size_v2(self):
        return 4096  # scratch bytes a context of this engine needs

    def create_execution_context(self, how=None):
        """``how``: None, an allocation strategy (``USER_MANAGED``) or a runtime config (native graphs)."""
        return FakeContext(self, how)

    def create_runtime_config(self):
        if not hasattr(self.trt, "CudaGraphStrategy"):
            raise AttributeError("create_runtime_config")  # full TensorRT has none
        return SimpleNamespace(cuda_graph_strategy=self.trt.CudaGraphStrategy.DISABLED)


class FakeContext:
    def __init__(self, engine: FakeEngine, how=None):
        self.engine, self.trt = engine, engine.trt
        self.addresses, self.shape, self.how, self.scratch = {}, None, how, None
        self.trt.log.append(("context", engine.k, getattr(how, "cuda_graph_strategy", how)))

    def set_device_memory(self, ptr, size):
        self.trt.log.append(("device_memory", self.engine.k, ptr, size))
        assert self.how == self.trt.ExecutionContextAllocationStrategy.USER_MANAGED and size >= 4096
        self.scratch = ptr

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        self.trt.log.append(("address", self.engine.k, name, ptr))
        return name in self.engine.io

    def set_input_shape(self, name, shape):
        self.trt.log.append(("shape", self.engine.k, name, tuple(shape)))
        if shape[0] > self.engine.rec["profile"][2] or shape[0] < 1:
            return False
        self.shape = tuple(shape)
        return True

    def execute_async_v3(self, stream):
        k, n = self.engine.k, self.shape[0]
        drv = self.trt.driver
        capturing = drv is not None and stream in drv.capturing
        self.trt.log.append(("capture" if capturing else "enqueue", k, n, stream))
        if self.trt.fail_at == k or (capturing and self.trt.capture_fail_at == k):
            return False
        if capturing:  # recorded into the graph with this shape and these addresses, run at replay
            addresses, shape = dict(self.addresses), self.shape
            drv.capturing[stream].append(lambda: self._compute(k, shape[0], addresses))
            return True
        self._compute(k, n, self.addresses)
        return True

    def _compute(self, k, n, addresses):
        ex = self.trt.model
        io = self.engine.io
        in_name = next(name for name, (mode, *_) in io.items() if mode == "INPUT")
        d = int(np.prod(ex.row_shape))
        h = view(addresses[in_name], io[in_name][1], n * d).reshape((n,) + ex.row_shape)
        hid, probs, gate = ex.forward(k, h)  # a merged stage: probs [n, E, C], gate [n, G]
        view(addresses["probs"], np.float32, probs.size)[:] = probs.ravel()
        if "hidden_out" in io:
            view(addresses["hidden_out"], io["hidden_out"][1], n * d)[:] = hid.ravel()
        if "gate" in io:
            view(addresses["gate"], np.float32, gate.size)[:] = gate.ravel()


class FakeTensorRT(SimpleNamespace):
    """The module double: ``FakeTensorRT(model)`` where ``model`` is a ``MockExecutor`` (or a
    ``MergedMockExecutor``: engines of merged stages). ``driver``: the ``FakeDriver`` whose stream
    capture records enqueues (CUDA graphs); ``native_graphs``: TensorRT-RTX's ``CudaGraphStrategy``;
    ``fail_at`` / ``capture_fail_at``: the stage whose enqueue (or captured enqueue) fails."""

    def __init__(self, model, fail_at=None, driver=None, native_graphs=False, capture_fail_at=None):
        trt = self

        class ILogger:
            Severity = SimpleNamespace(INTERNAL_ERROR=4, ERROR=3, WARNING=2, INFO=1, VERBOSE=0)

            def __init__(self):
                pass

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, data):
                trt.log.append(("deserialize", len(data)))
                try:
                    return FakeEngine(trt, json.loads(bytes(data)))
                except ValueError:
                    return None

        super().__init__(__name__="fake_tensorrt", __version__="0.0-test-double", ILogger=ILogger, Runtime=Runtime,
                         TensorIOMode=SimpleNamespace(INPUT=_Enum("TensorIOMode", "INPUT"),
                                                      OUTPUT=_Enum("TensorIOMode", "OUTPUT")),
                         ExecutionContextAllocationStrategy=SimpleNamespace(
                             STATIC=_Enum("ExecutionContextAllocationStrategy", "STATIC"),
                             USER_MANAGED=_Enum("ExecutionContextAllocationStrategy", "USER_MANAGED")),
                         model=model, fail_at=fail_at, capture_fail_at=capture_fail_at, driver=driver, log=[])
        if native_graphs:  # TensorRT-RTX: graphs captured by the runtime itself (a runtime config)
            self.CudaGraphStrategy = SimpleNamespace(DISABLED=_Enum("CudaGraphStrategy", "DISABLED"),
                                                     WHOLE_GRAPH_CAPTURE=_Enum("CudaGraphStrategy",
                                                                               "WHOLE_GRAPH_CAPTURE"))
