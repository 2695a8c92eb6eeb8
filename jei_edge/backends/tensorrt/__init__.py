"""TensorRT and TensorRT-RTX: one folder for both toolchains (same Python API for what we use).

- ``toolchain.py``: the one place that imports ``tensorrt`` or ``tensorrt_rtx``; TensorRT's logger
  routed into Python logging;
- ``builder.py``: one engine per stage graph (strongly typed network, an optimisation profile
  over the target's batch range, compute capabilities named explicitly for TensorRT-RTX's
  ahead-of-time builds), with an engine cache and (TensorRT) a timing cache;
- ``validity.py``: every engine checked against this machine before any is deserialized;
- ``executor.py``: ``TensorRTExecutor``, the engines on the torch-free CUDA core
  (``jei_edge.runtime.cuda``: workspace buffers and stream, the fused exit kernel between stages).

Two registry entries share this folder: ``tensorrt`` (JetPack) and ``tensorrt_rtx``. Running needs
numpy, cuda-python and the toolchain: no torch, no onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

from jei_edge.backends.base import Backend
from jei_edge.errors import InputError
from jei_edge.runtime.cuda.options import CudaOptions


@dataclass(frozen=True)
class TensorRTSettings(CudaOptions):
    """``CudaOptions`` (device_index, mapped_io, max_grid, kernel_cache_dir, lanes, graphs,
    graph_max_batch, buckets: CUDA graphs of the engines per (stage, batch bucket)) plus:

    Attributes:
        builder_optimization_level: the engines' build setting (0-5; read by ``jei-edge build`` /
            ``lower`` from the target's table, ignored when running).
    """

    builder_optimization_level: int = 3

    @classmethod
    def from_options(cls, options=None, base=None) -> "TensorRTSettings":
        from jei_edge.backends.base import parse_settings

        opts = parse_settings(cls, options, "TensorRT", base=base)
        if opts.lanes < 1 or opts.max_grid < 1 or opts.graph_max_batch < 1 or opts.builder_optimization_level > 5:
            raise InputError("TensorRT options lanes, max_grid and graph_max_batch must be >= 1, "
                             "builder_optimization_level 0-5")
        return opts


def _executor(bundle, trt, settings: TensorRTSettings):
    from jei_edge.backends.tensorrt.executor import TensorRTExecutor
    from jei_edge.backends.tensorrt.toolchain import logger

    m = bundle.manifest
    engines = [bundle.file(s.engines[0].file).read_bytes() for s in m.stages]
    return TensorRTExecutor(trt, engines, m.stages, logger(trt), what=str(bundle.path),
                            buckets=settings.graph_buckets())


class TensorRTBackend(Backend):
    settings_class = TensorRTSettings

    def __init__(self, name: str):
        self.name = name

    def unsupported(self, bundle):
        m = bundle.manifest
        if m.lowering is None or m.lowering.backend != self.name:
            return f"it holds no {self.name} engines (target '{m.target.name}' uses {m.target.backend})"
        return None

    def _parts(self, bundle, settings: TensorRTSettings):
        from jei_edge.backends.tensorrt.toolchain import import_toolchain
        from jei_edge.backends.tensorrt.validity import check_engines

        self.check(bundle)
        check_engines(bundle)  # version, stand-in, GPU, compute capability, validity: before deserializing
        return _executor(bundle, import_toolchain(self.name, purpose="running"), settings)

    def create(self, bundle, max_batch: int, settings: TensorRTSettings) -> Tuple:
        from jei_edge.runtime.cuda.backend import cuda_backend

        m = bundle.manifest
        return cuda_backend(self._parts(bundle, settings), m.stages, m.num_classes, max_batch, settings)

    def pipeline(self, bundle, max_batch: int = 256, **options):
        """A multi-lane ``CudaPipeline`` for ``bundle`` (micro-batch overlap; ``lanes`` option)."""
        from jei_edge.runtime.cuda.backend import cuda_pipeline

        settings = self.settings(bundle, options)
        m = bundle.manifest
        return cuda_pipeline(self._parts(bundle, settings), m.stages, m.num_classes, max_batch, settings)


def from_engines(trt, engines: Sequence[bytes], stages: Sequence, num_classes: int, max_batch: int = 256, *,
                 driver=None, pipeline: bool = False, **options):
    """``(executor, workspace)`` (or a ``CudaPipeline``) running serialized ``engines`` without a
    bundle: for tests (a recorded-engine double with the fake driver) and benchmarks."""
    from jei_edge.backends.tensorrt.executor import TensorRTExecutor
    from jei_edge.backends.tensorrt.toolchain import logger
    from jei_edge.runtime.cuda.backend import cuda_backend, cuda_pipeline
    from jei_edge.runtime.cuda.driver import get_driver

    settings = TensorRTSettings.from_options(options)
    drv = get_driver(settings.device_index, driver)
    executor = TensorRTExecutor(trt, engines, stages, logger(trt), buckets=settings.graph_buckets())
    make = cuda_pipeline if pipeline else cuda_backend
    return make(executor, stages, num_classes, max_batch, settings, driver=drv)


TENSORRT = TensorRTBackend("tensorrt")
TENSORRT_RTX = TensorRTBackend("tensorrt_rtx")
__all__ = ["TENSORRT", "TENSORRT_RTX", "TensorRTSettings", "from_engines"]
