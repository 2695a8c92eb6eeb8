"""Device buffers and pinned / mapped host buffers, with an allocation counter.

Every allocation the CUDA runtime makes goes through ``DeviceBuffer`` or ``HostBuffer``, which
count it in ``ALLOCATIONS``: tests assert that the count stays flat over many steady-state
iterations (buffers are sized once, for the maximum batch, at load time).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass
class AllocationCounter:
    """Number and bytes of allocations made by this module (device, pinned host)."""

    device: int = 0
    host: int = 0
    device_bytes: int = 0
    host_bytes: int = 0

    def __post_init__(self):
        self._lock = threading.Lock()

    def add(self, kind: str, nbytes: int) -> None:
        with self._lock:
            setattr(self, kind, getattr(self, kind) + 1)
            setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + int(nbytes))

    @property
    def total(self) -> int:
        return self.device + self.host


ALLOCATIONS = AllocationCounter()


def _nbytes(shape: Tuple[int, ...], dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


class DeviceBuffer:
    """``shape``/``dtype`` device memory, allocated once (``cuMemAlloc``) and zero-filled.

    Exposes ``__cuda_array_interface__`` so PyTorch/CuPy can wrap it without a copy.
    """

    def __init__(self, driver, shape: Tuple[int, ...], dtype, stream: int = 0, name: str = ""):
        self.driver, self.name = driver, name
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.nbytes = _nbytes(self.shape, self.dtype)
        self.ptr = driver.mem_alloc(self.nbytes)
        ALLOCATIONS.add("device", self.nbytes)
        # Zero once so rows beyond the live count (bucketed CUDA graphs compute on them) stay finite.
        driver.memset_async(self.ptr, 0, self.nbytes, stream)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0

    @property
    def device_ptr(self) -> int:
        """The device address (as ``HostBuffer.device_ptr`` of mapped memory): what kernels use."""
        return self.ptr

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "version": 3, "strides": None, "stream": None}

    def free(self) -> None:
        if self.ptr:
            self.driver.mem_free(self.ptr)
            self.ptr = 0


class HostBuffer:
    """Page-locked host memory viewed as a numpy array (``.array``).

    With ``mapped=True`` the memory is also mapped into the device address space (zero-copy):
    ``device_ptr`` is what kernels use. That is the fast path on integrated GPUs (Jetson), where
    host and device share DRAM.
    """

    def __init__(self, driver, shape: Tuple[int, ...], dtype, mapped: bool = False, name: str = ""):
        self.driver, self.name, self.mapped = driver, name, mapped
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.nbytes = _nbytes(self.shape, self.dtype)
        self.ptr = driver.host_alloc(self.nbytes, mapped=mapped)
        ALLOCATIONS.add("host", self.nbytes)
        raw = (ctypes.c_uint8 * max(self.nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(self.dtype).reshape(self.shape)
        self.array[...] = 0
        self.device_ptr: Optional[int] = driver.host_device_pointer(self.ptr) if mapped else None

    @property
    def __cuda_array_interface__(self):
        if self.device_ptr is None:
            raise TypeError(f"host buffer {self.name!r} is not mapped into the device address space")
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.device_ptr, False),
                "version": 3, "strides": None, "stream": None}

    def free(self) -> None:
        if self.ptr:
            self.array = None
            self.driver.host_free(self.ptr)
            self.ptr = 0
