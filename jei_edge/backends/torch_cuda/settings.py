"""Settings of the torch-cuda backend: the CUDA core's options plus the executor's own."""

from __future__ import annotations

from dataclasses import dataclass

from jei_edge.errors import InputError
from jei_edge.runtime.cuda.options import CudaOptions


@dataclass(frozen=True)
class TorchCudaSettings(CudaOptions):
    """``CudaOptions`` (device_index, mapped_io, max_grid, kernel_cache_dir, lanes, graphs,
    graph_max_batch, buckets: PyTorch CUDA graphs per (stage, batch bucket)) plus:

    Attributes:
        tf32: allow TF32 math (faster, but results are no longer FP32-identical to the CPU runtime).
    """

    tf32: bool = False

    @classmethod
    def from_options(cls, options=None, base=None) -> "TorchCudaSettings":
        from jei_edge.backends.base import parse_settings

        opts = parse_settings(cls, options, "torch-cuda", base=base)
        if opts.lanes < 1 or opts.max_grid < 1 or opts.graph_max_batch < 1:
            raise InputError("torch-cuda options lanes, max_grid and graph_max_batch must be >= 1")
        return opts
