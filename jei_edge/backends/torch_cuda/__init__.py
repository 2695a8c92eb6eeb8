"""The torch-cuda backend: the bundle's stages rebuilt by PyTorch from its ``model.pt``, run on
the workspace's CUDA stream, around the torch-free CUDA core (``jei_edge.runtime.cuda``: exit
kernel, workspace, pipeline). It runs on any GPU PyTorch supports (Hopper included, which
TensorRT-RTX does not) and is how the CUDA path is validated.

- ``settings.py``: ``TorchCudaSettings`` (``CudaOptions`` + graphs, buckets, tf32);
- ``executor.py``: ``TorchCudaExecutor`` (CUDA graphs per (stage, bucket)), ``stages_from_model``.

Only this backend needs torch; it loads ``model.pt`` itself (``weights_only``), after checking
that a CUDA driver exists, so a machine without a GPU gets the "no CUDA driver" error first.
"""

from __future__ import annotations

from typing import Tuple

from jei_edge.backends.base import Backend
from jei_edge.backends.torch_cuda.settings import TorchCudaSettings
from jei_edge.errors import BundleError


def _executor(model, s: TorchCudaSettings, spans=None):
    from jei_edge.backends.torch_cuda.executor import TorchCudaExecutor

    return TorchCudaExecutor(model, device_index=s.device_index, graphs=s.graphs, graph_max_batch=s.graph_max_batch,
                             buckets=s.buckets, tf32=s.tf32, spans=spans)


def _bundle_model(bundle):
    from jei_edge._deps import require

    require("torch", purpose="the torch-cuda executor (it rebuilds stage modules from the bundle's model.pt)")
    from jei_edge.model.checkpoint import load_checkpoint

    if bundle.model_path is None:
        raise BundleError(f"bundle '{bundle.path}' carries no model.pt, which the torch-cuda executor needs to rebuild "
                          "its stage modules", hint="rebuild the bundle with its model.pt included, or use --device cpu")
    model, _ = load_checkpoint(bundle.model_path)
    return model


class TorchCudaBackend(Backend):
    name = "torch-cuda"
    settings_class = TorchCudaSettings

    def unsupported(self, bundle):
        if bundle.manifest.model_file is None:
            return "it carries no model.pt (rebuild without --no-model, or use --device cpu)"
        return None

    def _parts(self, bundle, settings: TorchCudaSettings):
        from jei_edge.backends.torch_cuda.executor import check_model_matches, stages_from_model
        from jei_edge.runtime.cuda.driver import get_driver

        self.check(bundle)
        get_driver(settings.device_index)  # a clear "no CUDA driver" error before torch loads
        m = bundle.manifest
        spans = [(st.exits[0], st.exits[-1]) for st in m.stages]  # merged stages of a --plan bundle
        executor = _executor(_bundle_model(bundle), settings, spans)
        check_model_matches(m, stages_from_model(executor.model, executor.torch, executor.device, executor.spans),
                            m.num_classes, f"bundle '{bundle.path}'")
        return executor, m

    def create(self, bundle, max_batch: int, settings: TorchCudaSettings) -> Tuple:
        from jei_edge.runtime.cuda.backend import cuda_backend

        executor, m = self._parts(bundle, settings)
        return cuda_backend(executor, m.stages, m.num_classes, max_batch, settings)

    def pipeline(self, bundle, max_batch: int = 256, **options):
        """A multi-lane ``CudaPipeline`` for ``bundle`` (micro-batch overlap; ``lanes`` option)."""
        from jei_edge.runtime.cuda.backend import cuda_pipeline

        settings = self.settings(bundle, options)
        executor, m = self._parts(bundle, settings)
        return cuda_pipeline(executor, m.stages, m.num_classes, max_batch, settings)


def from_model(model, max_batch: int = 256, *, driver=None, pipeline: bool = False, spans=None, **options):
    """``(executor, workspace)`` (or a ``CudaPipeline`` with ``pipeline``) running ``model`` (a
    JEIModel) on the GPU without a bundle: for tests and benchmarks. ``spans``: ``(first, last)``
    exit of each stage to merge exits as a ``--plan`` bundle does (default one stage per exit)."""
    from jei_edge.backends.torch_cuda.executor import stages_from_model
    from jei_edge.runtime.cuda.backend import cuda_backend, cuda_pipeline
    from jei_edge.runtime.cuda.driver import get_driver

    settings = TorchCudaSettings.from_options(options)
    drv = get_driver(settings.device_index, driver)
    executor = _executor(model, settings, spans)
    stages = stages_from_model(executor.model, executor.torch, executor.device, executor.spans)
    make = cuda_pipeline if pipeline else cuda_backend
    return make(executor, stages, executor.num_classes, max_batch, settings, driver=drv)


BACKEND = TorchCudaBackend()
__all__ = ["BACKEND", "TorchCudaSettings", "from_model"]
