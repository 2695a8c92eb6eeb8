"""Import TensorRT or TensorRT-RTX (nothing else in jei-edge imports them) and route their logs.

``import_toolchain("tensorrt_rtx")`` returns the ``tensorrt_rtx`` module (``pip install
tensorrt-rtx``); ``import_toolchain("tensorrt")`` the ``tensorrt`` module JetPack installs on a
Jetson board. Both raise a ``DependencyError`` that says where the toolchain comes from.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Dict

from jei_edge._deps import require

MODULES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx"}
log = logging.getLogger("jei_edge.tensorrt")
_LOGGERS: Dict[str, object] = {}


def import_toolchain(backend: str, purpose: str = "building") -> ModuleType:
    """The Python module of ``backend`` (``tensorrt`` or ``tensorrt_rtx``); ``purpose`` words the error."""
    if backend not in MODULES:
        raise ValueError(f"not a TensorRT backend: {backend!r}")
    return require(MODULES[backend], purpose=f"{purpose} {backend} engines")


def version(trt: ModuleType) -> str:
    """The toolchain version engines are tied to (``1.7.1.116``, ``10.3.0.30``)."""
    return str(trt.__version__)


def logger(trt: ModuleType):
    """A ``trt.ILogger`` that forwards TensorRT's messages to the ``jei_edge.tensorrt`` Python logger
    (one per toolchain module; TensorRT keeps a reference to it)."""
    key = trt.__name__
    if key not in _LOGGERS:
        levels = {trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.Severity.ERROR: logging.ERROR,
                  trt.ILogger.Severity.WARNING: logging.WARNING, trt.ILogger.Severity.INFO: logging.INFO,
                  trt.ILogger.Severity.VERBOSE: logging.DEBUG}

        class _Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages = []  # (level, text) of warnings and errors, for build reports

            def log(self, severity, msg):
                level = levels.get(severity, logging.INFO)
                if level >= logging.WARNING:
                    self.messages.append((logging.getLevelName(level), str(msg)))
                    del self.messages[:-200]
                log.log(level, "%s", msg)

        _LOGGERS[key] = _Logger()
    return _LOGGERS[key]
