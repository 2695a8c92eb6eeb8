"""Settings of the CUDA backend: one frozen dataclass, defaults in one place."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

from jei_edge.errors import InputError


@dataclass(frozen=True)
class CudaOptions:
    """Options accepted by ``make_backend(bundle, max_batch=..., **options)``.

    Attributes:
        device_index: CUDA device ordinal.
        executor: which StageExecutor runs the stages (see ``EXECUTORS``; "torch" today).
        graphs: capture CUDA graphs per (stage, batch bucket) where the executor allows it.
        graph_max_batch: largest live-row count served by a graph (above: eager execution).
        buckets: explicit graph batch buckets (default: 1, 2, 4, 8, 16, then x1.25 steps).
        mapped_io: stage the input and write results in mapped pinned host memory (zero-copy),
            the better choice on integrated GPUs (Jetson) where host and device share DRAM.
        tf32: allow TF32 math (faster, but results are no longer FP32-identical to the CPU runtime).
        max_grid: most thread blocks one exit-kernel launch uses.
        kernel_cache_dir: where NVRTC output is cached (default ``~/.cache/jei-edge/cuda``).
        lanes: pipeline lanes (streams + workspaces) for micro-batch overlap (``make_pipeline``).
    """

    device_index: int = 0
    executor: str = "torch"
    graphs: bool = True
    graph_max_batch: int = 256
    buckets: Optional[Tuple[int, ...]] = None
    mapped_io: bool = False
    tf32: bool = False
    max_grid: int = 1024
    kernel_cache_dir: Optional[str] = None
    lanes: int = 2

    @classmethod
    def from_kwargs(cls, **options) -> "CudaOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InputError(f"unknown CUDA backend option(s) {unknown}",
                             hint=f"valid options: {', '.join(sorted(names))}")
        if "buckets" in options and options["buckets"] is not None:
            options["buckets"] = tuple(int(b) for b in options["buckets"])
        opts = cls(**options)
        if opts.lanes < 1 or opts.max_grid < 1 or opts.graph_max_batch < 1:
            raise InputError("CUDA options lanes, max_grid and graph_max_batch must be >= 1")
        return opts
