"""A thin wrapper over the CUDA driver API (``cuda.bindings.driver`` from cuda-python).

Everything the CUDA runtime needs from the driver goes through one ``CudaDriver`` object: device
and pinned/mapped memory, copies, streams, events, module loading and kernel launches. Handles are
plain ``int``s so the workspace can be tested against a fake driver (``tests/cuda``) and streams can
be handed to PyTorch (``torch.cuda.ExternalStream``) or TensorRT (``execute_async_v3``).

Failures become ``CudaError`` (a ``JeiEdgeError``) naming the call; a machine without a CUDA driver
or GPU gets ``CudaUnavailableError`` with a one-line explanation instead of a stack trace from the
bindings.
"""

from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

from jei_edge.errors import JeiEdgeError

# cuMemHostAlloc flags (cuda.h): portable to every context, mapped into the device address space.
HOST_ALLOC_PORTABLE = 0x01
HOST_ALLOC_DEVICEMAP = 0x02
STREAM_NON_BLOCKING = 0x01
EVENT_DISABLE_TIMING = 0x02


class CudaError(JeiEdgeError):
    """A CUDA driver call failed."""


class CudaUnavailableError(CudaError):
    """No usable CUDA driver or GPU on this machine."""


def _bindings():
    import importlib

    from jei_edge._deps import require

    require("cuda.bindings", purpose="the CUDA runtime (--device cuda)")
    return importlib.import_module("cuda.bindings.driver")


def _error_name(cu, err) -> str:
    try:
        _, name = cu.cuGetErrorName(err)
        _, text = cu.cuGetErrorString(err)
        return f"{name.decode()}: {text.decode()}"
    except Exception:  # the error itself may come from a broken driver
        return str(err)


class CudaDriver:
    """The CUDA driver for one device, on its primary context (the one PyTorch also uses).

    Args:
        device_index: CUDA device ordinal.
    """

    _instances: Dict[int, "CudaDriver"] = {}
    _lock = threading.Lock()

    def __init__(self, device_index: int = 0):
        cu = _bindings()
        self.cu = cu
        try:
            err, = cu.cuInit(0)
        except Exception as exc:  # DynamicLibNotFoundError & co. when libcuda.so is absent
            raise CudaUnavailableError(
                "no CUDA driver found on this machine (libcuda.so could not be loaded)",
                hint="install the NVIDIA driver, or run with --device cpu",
            ) from exc
        if err != cu.CUresult.CUDA_SUCCESS:
            raise CudaUnavailableError(f"the CUDA driver failed to initialise ({_error_name(cu, err)})",
                                       hint="check that a GPU is visible (nvidia-smi), or run with --device cpu")
        err, count = cu.cuDeviceGetCount()
        self._check(err, "cuDeviceGetCount")
        if count == 0:
            raise CudaUnavailableError("the CUDA driver sees no GPU", hint="run with --device cpu")
        if not 0 <= device_index < count:
            raise CudaUnavailableError(f"CUDA device {device_index} does not exist ({count} visible)",
                                       hint=f"pick a device index in 0..{count - 1}")
        err, self.device = cu.cuDeviceGet(device_index)
        self._check(err, "cuDeviceGet")
        self.device_index = device_index
        err, self.context = cu.cuDevicePrimaryCtxRetain(self.device)
        self._check(err, "cuDevicePrimaryCtxRetain")
        self.make_current()
        err, name = cu.cuDeviceGetName(256, self.device)
        self._check(err, "cuDeviceGetName")
        self.name = name.split(b"\0", 1)[0].decode(errors="replace")
        attr = cu.CUdevice_attribute
        self.compute_capability: Tuple[int, int] = (
            self._attr(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            self._attr(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
        self.multiprocessors = self._attr(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        self.integrated = bool(self._attr(attr.CU_DEVICE_ATTRIBUTE_INTEGRATED))
        self.can_map_host_memory = bool(self._attr(attr.CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY))

    @classmethod
    def get(cls, device_index: int = 0) -> "CudaDriver":
        """The shared driver object of a device (initialised once per process)."""
        with cls._lock:
            if device_index not in cls._instances:
                cls._instances[device_index] = cls(device_index)
            return cls._instances[device_index]

    # -- helpers ---------------------------------------------------------------------------
    def _check(self, err, what: str) -> None:
        if err != self.cu.CUresult.CUDA_SUCCESS:
            raise CudaError(f"CUDA call {what} failed on device {getattr(self, 'device_index', '?')}: "
                            f"{_error_name(self.cu, err)}")

    def _attr(self, attribute) -> int:
        err, v = self.cu.cuDeviceGetAttribute(attribute, self.device)
        self._check(err, "cuDeviceGetAttribute")
        return int(v)

    def make_current(self) -> None:
        """Bind the primary context to the calling thread (needed once per thread)."""
        err, = self.cu.cuCtxSetCurrent(self.context)
        self._check(err, "cuCtxSetCurrent")

    @property
    def arch(self) -> int:
        """Compute capability as an integer, e.g. 90 for sm_90."""
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    # -- memory ----------------------------------------------------------------------------
    def mem_alloc(self, nbytes: int) -> int:
        err, ptr = self.cu.cuMemAlloc(max(int(nbytes), 1))
        self._check(err, f"cuMemAlloc({nbytes} bytes)")
        return int(ptr)

    def mem_free(self, ptr: int) -> None:
        err, = self.cu.cuMemFree(ptr)
        self._check(err, "cuMemFree")

    def host_alloc(self, nbytes: int, mapped: bool = False) -> int:
        """Page-locked host memory (``mapped``: also addressable by the device, zero-copy)."""
        flags = HOST_ALLOC_PORTABLE | (HOST_ALLOC_DEVICEMAP if mapped else 0)
        err, ptr = self.cu.cuMemHostAlloc(max(int(nbytes), 1), flags)
        self._check(err, f"cuMemHostAlloc({nbytes} bytes, mapped={mapped})")
        return int(ptr)

    def host_free(self, ptr: int) -> None:
        err, = self.cu.cuMemFreeHost(ptr)
        self._check(err, "cuMemFreeHost")

    def host_device_pointer(self, host_ptr: int) -> int:
        err, dptr = self.cu.cuMemHostGetDevicePointer(host_ptr, 0)
        self._check(err, "cuMemHostGetDevicePointer")
        return int(dptr)

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        err, = self.cu.cuMemsetD8Async(ptr, value, nbytes, stream)
        self._check(err, "cuMemsetD8Async")

    def memcpy_htod_async(self, dst: int, src_host: int, nbytes: int, stream: int) -> None:
        err, = self.cu.cuMemcpyHtoDAsync(dst, src_host, nbytes, stream)
        self._check(err, "cuMemcpyHtoDAsync")

    def memcpy_dtoh_async(self, dst_host: int, src: int, nbytes: int, stream: int) -> None:
        err, = self.cu.cuMemcpyDtoHAsync(dst_host, src, nbytes, stream)
        self._check(err, "cuMemcpyDtoHAsync")

    def memcpy_dtod_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        err, = self.cu.cuMemcpyDtoDAsync(dst, src, nbytes, stream)
        self._check(err, "cuMemcpyDtoDAsync")

    # -- streams and events ----------------------------------------------------------------
    def stream_create(self) -> int:
        err, s = self.cu.cuStreamCreate(STREAM_NON_BLOCKING)
        self._check(err, "cuStreamCreate")
        return int(s)

    def stream_destroy(self, stream: int) -> None:
        err, = self.cu.cuStreamDestroy(stream)
        self._check(err, "cuStreamDestroy")

    def stream_synchronize(self, stream: int) -> None:
        err, = self.cu.cuStreamSynchronize(stream)
        self._check(err, "cuStreamSynchronize")

    def stream_wait_event(self, stream: int, event: int) -> None:
        err, = self.cu.cuStreamWaitEvent(stream, event, 0)
        self._check(err, "cuStreamWaitEvent")

    def event_create(self, timing: bool = False) -> int:
        err, e = self.cu.cuEventCreate(0 if timing else EVENT_DISABLE_TIMING)
        self._check(err, "cuEventCreate")
        return int(e)

    def event_destroy(self, event: int) -> None:
        err, = self.cu.cuEventDestroy(event)
        self._check(err, "cuEventDestroy")

    def event_record(self, event: int, stream: int) -> None:
        err, = self.cu.cuEventRecord(event, stream)
        self._check(err, "cuEventRecord")

    def event_synchronize(self, event: int) -> None:
        err, = self.cu.cuEventSynchronize(event)
        self._check(err, "cuEventSynchronize")

    def event_elapsed_ms(self, start: int, end: int) -> float:
        err, ms = self.cu.cuEventElapsedTime(start, end)
        self._check(err, "cuEventElapsedTime")
        return float(ms)

    # -- CUDA graphs (stream capture) ------------------------------------------------------
    def stream_begin_capture(self, stream: int) -> None:
        """Start capturing ``stream`` (thread-local mode: other threads' CUDA calls are not affected)."""
        mode = self.cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        err, = self.cu.cuStreamBeginCapture(stream, mode)
        self._check(err, "cuStreamBeginCapture")

    def stream_end_capture(self, stream: int):
        """End the capture of ``stream``: the captured graph (raises when the capture was invalidated)."""
        err, graph = self.cu.cuStreamEndCapture(stream)
        self._check(err, "cuStreamEndCapture")
        return graph

    def graph_instantiate(self, graph):
        err, exe = self.cu.cuGraphInstantiate(graph, 0)
        self._check(err, "cuGraphInstantiate")
        return exe

    def graph_launch(self, graph_exec, stream: int) -> None:
        err, = self.cu.cuGraphLaunch(graph_exec, stream)
        self._check(err, "cuGraphLaunch")

    def graph_destroy(self, graph) -> None:
        err, = self.cu.cuGraphDestroy(graph)
        self._check(err, "cuGraphDestroy")

    def graph_exec_destroy(self, graph_exec) -> None:
        err, = self.cu.cuGraphExecDestroy(graph_exec)
        self._check(err, "cuGraphExecDestroy")

    # -- modules and launches --------------------------------------------------------------
    def module_load(self, image: bytes) -> int:
        err, mod = self.cu.cuModuleLoadData(image)
        if err != self.cu.CUresult.CUDA_SUCCESS:
            raise CudaError(f"the CUDA driver cannot load the compiled exit kernel for {self.name} "
                            f"(sm_{self.arch}): {_error_name(self.cu, err)}",
                            hint="the NVIDIA driver may be older than the NVRTC that compiled it; update the "
                                 "driver or install an nvidia-cuda-nvrtc matching it")
        return mod

    def module_function(self, module, name: str) -> int:
        err, fn = self.cu.cuModuleGetFunction(module, name.encode())
        self._check(err, f"cuModuleGetFunction({name})")
        return fn

    def launch(self, function, grid: int, block: int, shared_bytes: int, stream: int, params_address: int) -> None:
        """Launch a 1-D grid; ``params_address`` is the address of a ``void*[]`` of argument pointers."""
        err, = self.cu.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, shared_bytes, stream, params_address, 0)
        self._check(err, "cuLaunchKernel(jei_exit_compact)")


def get_driver(device_index: int = 0, driver: Optional[object] = None):
    """``driver`` when given (tests inject a fake), else the shared ``CudaDriver`` of the device."""
    return driver if driver is not None else CudaDriver.get(device_index)
