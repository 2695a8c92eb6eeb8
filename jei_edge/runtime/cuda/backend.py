"""Assemble the CUDA runtime core around any ``StageExecutor``: driver -> exit kernel ->
``CudaWorkspace`` (or several, as pipeline lanes). Torch-free: the stages' shapes and dtypes come
from the bundle manifest (``jei_edge.bundle.manifest.Stage``), never from running a model.

Executor backends (``jei_edge.backends.torch_cuda``, ``jei_edge.backends.tensorrt``) build their executor and call
``cuda_backend`` / ``cuda_pipeline``.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from jei_edge.runtime.cuda.driver import get_driver
from jei_edge.runtime.cuda.kernel import ExitKernel
from jei_edge.runtime.cuda.options import CudaOptions
from jei_edge.runtime.cuda.workspace import CudaWorkspace
from jei_edge.runtime.loop import Capability

_KERNELS: Dict[Tuple[int, Optional[str]], ExitKernel] = {}


def load_kernel(driver, cache_dir: Optional[str] = None) -> ExitKernel:
    """The exit kernel of ``driver``'s device, compiled (or read from the cache) once per process."""
    key = (id(driver), cache_dir)
    if key not in _KERNELS:
        _KERNELS[key] = ExitKernel(driver, cache_dir=cache_dir)
    return _KERNELS[key]


def cuda_workspace(executor, stages: Sequence, num_classes: int, max_batch: int, opts: CudaOptions,
                   driver) -> CudaWorkspace:
    """A workspace (one stream, buffers for ``max_batch`` rows) prepared for ``executor``."""
    ws = CudaWorkspace(driver, load_kernel(driver, opts.kernel_cache_dir), stages, num_classes, max_batch,
                       own_outputs=Capability.BINDS_OUTPUTS not in executor.capabilities,
                       mapped_io=opts.mapped_io, max_grid=opts.max_grid)
    executor.prepare(ws)
    return ws


def cuda_backend(executor, stages: Sequence, num_classes: int, max_batch: int, opts: CudaOptions = CudaOptions(),
                 driver=None):
    """``(executor, workspace)`` on ``opts.device_index`` (``driver``: a test double instead)."""
    drv = get_driver(opts.device_index, driver)
    return executor, cuda_workspace(executor, stages, num_classes, max_batch, opts, drv)


def cuda_pipeline(executor, stages: Sequence, num_classes: int, max_batch: int, opts: CudaOptions = CudaOptions(),
                  driver=None):
    """A ``CudaPipeline`` of ``opts.lanes`` workspaces sharing ``executor`` (micro-batch overlap)."""
    from jei_edge.runtime.cuda.pipeline import CudaPipeline

    drv = get_driver(opts.device_index, driver)
    return CudaPipeline(executor, [cuda_workspace(executor, stages, num_classes, max_batch, opts, drv)
                                   for _ in range(opts.lanes)])
