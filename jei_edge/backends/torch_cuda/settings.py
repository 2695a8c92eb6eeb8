"""Settings of the torch-cuda backend: the CUDA core's options plus the executor's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from jei_edge.errors import InputError
from jei_edge.runtime.cuda.options import CudaOptions


@dataclass(frozen=True)
class TorchCudaSettings(CudaOptions):
    """``CudaOptions`` (device_index, mapped_io, max_grid, kernel_cache_dir, lanes) plus:

    Attributes:
        graphs: capture CUDA graphs per (stage, batch bucket).
        graph_max_batch: largest live-row count served by a graph (above: eager execution).
        buckets: explicit graph batch buckets (default: 1, 2, 4, 8, 16, then x1.25 steps).
        tf32: allow TF32 math (faster, but results are no longer FP32-identical to the CPU runtime).
    """

    graphs: bool = True
    graph_max_batch: int = 256
    buckets: Optional[Tuple[int, ...]] = field(default=None, metadata={"int_tuple": True})
    tf32: bool = False

    @classmethod
    def from_options(cls, options=None, base=None) -> "TorchCudaSettings":
        from jei_edge.backends.base import parse_settings

        opts = parse_settings(cls, options, "torch-cuda", base=base)
        if opts.lanes < 1 or opts.max_grid < 1 or opts.graph_max_batch < 1:
            raise InputError("torch-cuda options lanes, max_grid and graph_max_batch must be >= 1")
        return opts
