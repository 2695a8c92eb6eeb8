"""The CUDA runtime path: cuda-python driver wrappers, device/pinned/mapped buffers, streams and
events, the fused exit kernel (``exit_kernel.cu``, compiled with NVRTC at load time), the CUDA
``Workspace``, the torch-cuda ``StageExecutor``, CUDA graphs and micro-batch pipelining.

Importing this package imports neither torch nor the CUDA bindings; they load when a backend is
built. Entry points:

- ``make_backend(bundle, max_batch=256, **options) -> (executor, workspace)`` (``Runtime.load``);
- ``make_backend_from_model(model, max_batch=256, **options)`` (no bundle needed);
- ``make_pipeline(bundle, max_batch=256, lanes=2, **options) -> CudaPipeline`` (micro-batch overlap).

See docs/cuda.md.
"""

from __future__ import annotations


def make_backend(bundle, max_batch: int = 256, **options):
    """``(executor, workspace)`` for ``Runtime.load(bundle, device="cuda")``; see ``backend.make_backend``."""
    from jei_edge.runtime.cuda.backend import make_backend as _make

    return _make(bundle, max_batch=max_batch, **options)


def make_backend_from_model(model, max_batch: int = 256, **options):
    """``(executor, workspace)`` for a JEIModel; see ``backend.make_backend_from_model``."""
    from jei_edge.runtime.cuda.backend import make_backend_from_model as _make

    return _make(model, max_batch=max_batch, **options)


def make_pipeline(bundle=None, max_batch: int = 256, **options):
    """A multi-stream ``CudaPipeline``; see ``backend.make_pipeline``."""
    from jei_edge.runtime.cuda.backend import make_pipeline as _make

    return _make(bundle, max_batch=max_batch, **options)


__all__ = ["make_backend", "make_backend_from_model", "make_pipeline"]
