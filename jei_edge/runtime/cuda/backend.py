"""Assemble the CUDA backend: driver -> exit kernel -> StageExecutor + CudaWorkspace.

``make_backend(bundle, max_batch=..., **options)`` is what ``Runtime.load(bundle, device="cuda")``
calls (see the cross-team contract); ``make_backend_from_model`` does the same from a JEIModel
(tests, benchmarks, no bundle needed). Executors are looked up in ``EXECUTORS``; an entry of
``UNAVAILABLE`` says why an executor cannot be used instead of disappearing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Optional, Tuple

from jei_edge.errors import BundleError, InputError
from jei_edge.runtime.cuda.driver import CudaDriver, get_driver
from jei_edge.runtime.cuda.kernel import ExitKernel
from jei_edge.runtime.cuda.options import CudaOptions
from jei_edge.runtime.cuda.workspace import CudaWorkspace, StageSpec


def _torch_executor(model, opts: CudaOptions):
    from jei_edge.runtime.cuda.torch_executor import TorchCudaExecutor

    return TorchCudaExecutor(model, device_index=opts.device_index, graphs=opts.graphs,
                             graph_max_batch=opts.graph_max_batch, buckets=opts.buckets, tf32=opts.tf32)


# name -> factory(model, options) -> StageExecutor with num_stages, num_classes, stage_specs(), prepare(ws)
EXECUTORS: Dict[str, Callable] = {"torch": _torch_executor}
UNAVAILABLE: Dict[str, str] = {
    "tensorrt": "TensorRT (Jetson) stage executors arrive with the GPU-target work; use executor='torch'",
    "tensorrt_rtx": "TensorRT-RTX stage executors arrive with the GPU-target work; use executor='torch'",
}

_KERNELS: Dict[Tuple[int, Optional[str]], ExitKernel] = {}


def load_kernel(driver, cache_dir: Optional[str] = None) -> ExitKernel:
    """The exit kernel of ``driver``'s device, compiled (or read from the cache) once per process."""
    key = (id(driver), cache_dir)
    if key not in _KERNELS:
        _KERNELS[key] = ExitKernel(driver, cache_dir=cache_dir)
    return _KERNELS[key]


def _make_executor(model, opts: CudaOptions):
    if opts.executor in UNAVAILABLE:
        raise InputError(f"CUDA executor '{opts.executor}' is not available: {UNAVAILABLE[opts.executor]}")
    if opts.executor not in EXECUTORS:
        raise InputError(f"unknown CUDA executor '{opts.executor}'",
                         hint=f"choose one of {sorted(EXECUTORS)}")
    return EXECUTORS[opts.executor](model, opts)


def build_workspace(executor, driver, max_batch: int, opts: CudaOptions,
                    specs: Optional[List[StageSpec]] = None) -> CudaWorkspace:
    """A workspace (one stream, buffers for ``max_batch`` rows) prepared for ``executor``."""
    ws = CudaWorkspace(driver, load_kernel(driver, opts.kernel_cache_dir), specs or executor.stage_specs(),
                       executor.num_classes, max_batch, own_outputs=not getattr(executor, "binds_outputs", False),
                       mapped_io=opts.mapped_io, max_grid=opts.max_grid)
    executor.prepare(ws)
    return ws


def make_backend_from_model(model, max_batch: int = 256, *, driver=None, **options):
    """``(executor, workspace)`` running ``model`` (a JEIModel) on the GPU."""
    opts = CudaOptions.from_kwargs(**options)
    drv = get_driver(opts.device_index, driver)  # a clear "no CUDA driver" error comes first
    executor = _make_executor(model, opts)
    return executor, build_workspace(executor, drv, max_batch, opts)


def _bundle_model(bundle):
    from jei_edge._deps import require

    require("torch", purpose="the torch-cuda executor (it rebuilds stage modules from the bundle's model.pt)")
    from jei_edge.model.checkpoint import load_checkpoint

    path = getattr(bundle, "model_path", None)
    if path is None:
        raise BundleError(f"bundle '{getattr(bundle, 'path', bundle)}' carries no model.pt, which the torch-cuda "
                          "executor needs to rebuild its stage modules",
                          hint="rebuild the bundle with its model.pt included")
    model, _ = load_checkpoint(path)
    return model


def check_manifest(manifest: dict, specs: List[StageSpec], model, where: str) -> List[StageSpec]:
    """The bundle's stages must be the model's stages (same block ranges, shapes and classes).

    Returns the specs with each stage's exit index taken from the manifest (``"exit"``, default k).
    """
    stages = manifest.get("stages") or []
    merged = [st.get("index") for st in stages if len(st.get("exits") or [0]) > 1]
    if merged:
        raise BundleError(f"{where}: stage(s) {merged} merge several exits, which the torch-cuda executor does not "
                          "run yet", hint="rebuild the bundle with `jei-edge build --plan every` for --device cuda")
    if len(stages) != len(specs):
        raise BundleError(f"{where}: manifest has {len(stages)} stages but its model.pt has {len(specs)}",
                          hint="rebuild the bundle from this model")
    if int(manifest.get("num_classes", model.num_classes)) != int(model.num_classes):
        raise BundleError(f"{where}: manifest num_classes {manifest.get('num_classes')} != model {model.num_classes}")
    ranges = model.stage_ranges()
    for k, (st, spec) in enumerate(zip(stages, specs)):
        blocks = st.get("blocks")
        s, e = ranges[k]
        if blocks is not None and list(blocks) not in ([s, e], [s, e - 1]):
            raise BundleError(f"{where}: stage {k} covers blocks {blocks} in the manifest but {[s, e]} in model.pt",
                              hint="merged stages are not supported by the torch-cuda executor yet")
        expect = {"hidden_out": spec.hidden_shape}
        for out in st.get("outputs", []):
            if out.get("name") in expect and expect[out["name"]] is not None:
                shape = tuple(out.get("shape", [])[1:])
                if shape != tuple(expect[out["name"]]):
                    raise BundleError(f"{where}: stage {k} output '{out['name']}' has row shape {list(shape)} in the "
                                      f"manifest but {list(expect[out['name']])} from model.pt")
    return [replace(spec, exit_index=int(st.get("exit", spec.exit_index))) for st, spec in zip(stages, specs)]


def make_backend(bundle, max_batch: int = 256, **options):
    """``(executor, workspace)`` for ``Runtime.load(bundle, device="cuda")``.

    Args:
        bundle: the loaded bundle (``.manifest``, ``.path``, ``.model_path``).
        max_batch: rows the workspace buffers are sized for.
        **options: ``CudaOptions`` fields (device_index, executor, graphs, mapped_io, ...).

    Raises:
        CudaUnavailableError: no CUDA driver / GPU; BundleError: no model.pt or a mismatching one;
        InputError: a bad option.
    """
    opts = CudaOptions.from_kwargs(**options)
    driver = CudaDriver.get(opts.device_index)
    executor = _make_executor(_bundle_model(bundle), opts)
    specs = check_manifest(getattr(bundle, "manifest", {}) or {}, executor.stage_specs(), executor.model,
                           f"bundle '{getattr(bundle, 'path', '')}'")
    return executor, build_workspace(executor, driver, max_batch, opts, specs)


def make_pipeline(bundle=None, max_batch: int = 256, *, model=None, driver=None, **options):
    """A ``CudaPipeline`` of ``lanes`` workspaces sharing one executor (micro-batch overlap)."""
    from jei_edge.runtime.cuda.pipeline import CudaPipeline

    opts = CudaOptions.from_kwargs(**options)
    drv = get_driver(opts.device_index, driver)
    if model is None:
        if bundle is None:
            raise InputError("make_pipeline needs a bundle or a model")
        model = _bundle_model(bundle)
    executor = _make_executor(model, opts)
    specs = executor.stage_specs()
    if bundle is not None:
        specs = check_manifest(getattr(bundle, "manifest", {}) or {}, specs, executor.model, f"bundle '{bundle.path}'")
    lanes = [build_workspace(executor, drv, max_batch, opts, specs) for _ in range(opts.lanes)]
    return CudaPipeline(executor, lanes)
