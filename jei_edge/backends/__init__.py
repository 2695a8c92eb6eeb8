"""Backends: one folder each (settings, executor, builder where there is one), one lazy registry.

``get_backend(name)`` imports ``jei_edge.backends.<folder>`` only when asked; a backend that
cannot run here says why when it is created (e.g. the TensorRT engine checks). ``choose(manifest,
device, backend)`` is how ``Runtime.load`` picks one: the bundle's target decides unless
``device`` or ``backend`` overrides it.

| name | device | folder | needs |
|---|---|---|---|
| ``onnxruntime`` | cpu | ``onnxruntime/`` | onnxruntime |
| ``torch-cuda`` | cuda | ``torch_cuda/`` | cuda-python, torch (rebuilds stages from the bundle's model.pt) |
| ``tensorrt`` | cuda | ``tensorrt/`` | cuda-python, JetPack's TensorRT (the bundle's engines) |
| ``tensorrt_rtx`` | cuda | ``tensorrt/`` | cuda-python, tensorrt-rtx (the bundle's engines) |

A registry value is ``module`` (its ``BACKEND``) or ``module:ATTRIBUTE`` (two backends sharing a folder).
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional

from jei_edge.errors import BundleError, InputError

DEVICES = ("cpu", "cuda")
# the device each backend runs on, runnable here or not (the one table of it)
BACKEND_DEVICE: Dict[str, str] = {"onnxruntime": "cpu", "torch-cuda": "cuda", "tensorrt": "cuda", "tensorrt_rtx": "cuda"}
REGISTRY: Dict[str, str] = {
    "onnxruntime": "jei_edge.backends.onnxruntime",
    "torch-cuda": "jei_edge.backends.torch_cuda",
    "tensorrt": "jei_edge.backends.tensorrt:TENSORRT",
    "tensorrt_rtx": "jei_edge.backends.tensorrt:TENSORRT_RTX",
}
# the backend that runs any bundle's stage graphs on each device, when the target's backend does not
DEFAULT_FOR_DEVICE = {"cpu": "onnxruntime", "cuda": "torch-cuda"}


def get_backend(name: str):
    """The ``Backend`` registered as ``name`` (its module is imported now)."""
    if name not in REGISTRY:
        raise InputError(f"unknown backend '{name}'", hint=f"choose one of {sorted(REGISTRY)}")
    module, _, attr = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attr or "BACKEND")


def device_of(name: str) -> Optional[str]:
    """The device a backend runs on, without importing it (None for an unknown name)."""
    return BACKEND_DEVICE.get(name)


def choose(manifest, device: Optional[str] = None, backend: Optional[str] = None) -> str:
    """The backend name for a bundle: ``backend`` if given (it must run on ``device``), else the
    target's backend if it runs on ``device`` (or no device is asked for), else the device's
    default backend."""
    if device is not None and device not in DEVICES:
        raise InputError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if backend is not None:
        if backend not in REGISTRY:
            raise InputError(f"unknown backend '{backend}'", hint=f"choose one of {sorted(REGISTRY)}")
        if device is not None and device_of(backend) != device:
            raise InputError(f"backend '{backend}' runs on {device_of(backend)}, not on {device}")
        return backend
    target = manifest.target.backend
    if device is None or device_of(target) == device:
        if target in REGISTRY:
            return target
        if device is None:
            raise BundleError(f"the bundle's target '{manifest.target.name}' names backend '{target}', which this "
                              "jei-edge does not know", hint=f"run it with --device cpu, or rebuild it for a target "
                              f"of a known backend ({sorted(REGISTRY)})")
    return DEFAULT_FOR_DEVICE[device]
