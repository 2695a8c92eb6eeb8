"""Settings of the CUDA runtime core (any executor): one frozen dataclass, defaults in one place.

Executor backends extend it with their own fields (``jei_edge.backends.torch_cuda.settings``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from jei_edge.errors import InputError


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA workspace's settings.

    Attributes:
        device_index: CUDA device ordinal.
        mapped_io: stage the input and write results in mapped pinned host memory (zero-copy),
            the better choice on integrated GPUs (Jetson) where host and device share DRAM.
        max_grid: most thread blocks one exit-kernel launch uses.
        kernel_cache_dir: where NVRTC output is cached (default ``~/.cache/jei-edge/cuda``).
        lanes: pipeline lanes (streams + workspaces) for micro-batch overlap (``cuda_pipeline``).
        graphs: run stages as CUDA graphs per (stage, batch bucket) where the executor can
            (``jei_edge.runtime.cuda.graphs``).
        graph_max_batch: largest live-row count served by a graph (above: plain execution).
        buckets: explicit graph batch buckets (default: 1, 2, 4, 8, 16, then x1.25 steps).
    """

    device_index: int = 0
    mapped_io: bool = False
    max_grid: int = 1024
    kernel_cache_dir: Optional[str] = None
    lanes: int = 2
    graphs: bool = True
    graph_max_batch: int = 256
    buckets: Optional[Tuple[int, ...]] = field(default=None, metadata={"int_tuple": True})

    def graph_buckets(self):
        """The ``Buckets`` these settings describe."""
        from jei_edge.runtime.cuda.graphs import Buckets

        return Buckets(self.graphs, self.graph_max_batch, self.buckets)

    @classmethod
    def from_options(cls, options: Optional[Dict[str, Any]] = None, base=None):
        """Settings from a dict (a target table or keywords); unknown keys are refused."""
        from jei_edge.backends.base import parse_settings

        opts = parse_settings(cls, options, "CUDA", base=base)
        if opts.lanes < 1 or opts.max_grid < 1 or opts.graph_max_batch < 1:
            raise InputError("CUDA options lanes, max_grid and graph_max_batch must be >= 1")
        if opts.kernel_cache_dir is not None and not isinstance(opts.kernel_cache_dir, str):
            raise InputError(f"CUDA option kernel_cache_dir must be a path, got {opts.kernel_cache_dir!r}")
        return opts
