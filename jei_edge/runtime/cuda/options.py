"""Settings of the CUDA runtime core (any executor): one frozen dataclass, defaults in one place.

Executor backends extend it with their own fields (``jei_edge.backends.torch_cuda.settings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

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
    """

    device_index: int = 0
    mapped_io: bool = False
    max_grid: int = 1024
    kernel_cache_dir: Optional[str] = None
    lanes: int = 2

    @classmethod
    def from_options(cls, options: Optional[Dict[str, Any]] = None, base=None):
        """Settings from a dict (a target table or keywords); unknown keys are refused."""
        from jei_edge.backends.base import parse_settings

        opts = parse_settings(cls, options, "CUDA", base=base)
        if opts.lanes < 1 or opts.max_grid < 1:
            raise InputError("CUDA options lanes and max_grid must be >= 1")
        if opts.kernel_cache_dir is not None and not isinstance(opts.kernel_cache_dir, str):
            raise InputError(f"CUDA option kernel_cache_dir must be a path, got {opts.kernel_cache_dir!r}")
        return opts
