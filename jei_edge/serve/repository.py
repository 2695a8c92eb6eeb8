"""Write a Triton model repository that serves a bundle (``jei-edge export triton``, ``jei-edge serve``).

Layout (one Triton model per ``ModelSpec``; ``NAME`` is the first, early-exit model)::

    REPO/NAME/config.pbtxt         backend "python", dynamic batching, instance_group, parameters
    REPO/NAME/1/model.py           imports jei_edge.serve.model.TritonPythonModel
    REPO/NAME/1/model.jei/         the bundle (export; ``jei-edge serve`` names the user's bundle instead)
    REPO/NAME_full/...             optional: the same bundle in mode full (parameter bundle ../NAME/1/model.jei)
    REPO/NAME_plain/...            optional: the bundle's plain backbone graph

Every model takes ``x`` (model input, float32 ``[C, H, W]`` per sample) or ``x_raw`` (raw values in
[0, 1]; the bundle's preprocessing is applied), both optional inputs of which a request gives one.
Written atomically: into a temporary sibling folder, renamed into place when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from jei_edge.errors import InputError
from jei_edge.serve.handler import INPUT, MODES, RAW_INPUT, ModelSpec

TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}
MODEL_PY = '''"""Triton Python-backend model: a jei-edge bundle with per-sample early exit (written by jei-edge)."""

from jei_edge.serve.model import TritonPythonModel  # noqa: F401  (needs jei-edge's runtime in this Python)
'''


@dataclass(frozen=True)
class RepositoryOptions:
    """How the models are served.

    Attributes:
        name: the early-exit model's name (the others get ``_full`` / ``_plain`` appended).
        modes: which models to write (``exit`` first; ``full`` and ``plain`` are for comparisons).
        max_batch_size: the largest batch the dynamic batcher forms (and a request may carry).
        max_queue_delay_us: how long the batcher waits for more requests to batch.
        instances: model instances (stub processes, each with its own runtime).
        offsets, use_deploy, alpha: as ``ModelSpec``.
        backend_options: runtime backend settings (``KEY=VALUE``, e.g. ``intra_op_threads=1``).
    """

    name: str = "jei"
    modes: Tuple[str, ...] = ("exit",)
    max_batch_size: int = 64
    max_queue_delay_us: int = 100
    instances: int = 1
    offsets: Optional[Tuple[float, ...]] = None
    use_deploy: bool = True
    alpha: Optional[float] = 0.05
    backend_options: Tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> "RepositoryOptions":
        import re

        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", self.name):
            raise InputError(f"model name {self.name!r} is not a valid Triton model name",
                             hint="letters, digits, '_', '.', '-' (e.g. jei)")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes or len(set(self.modes)) != len(self.modes):
            raise InputError(f"models {list(self.modes)} must be distinct names from {list(MODES)}",
                             hint="e.g. --models exit,full,plain")
        for what, v, lo, hi in (("max batch size", self.max_batch_size, 1, 4096),
                                ("max queue delay (us)", self.max_queue_delay_us, 0, 10_000_000),
                                ("instances", self.instances, 1, 64)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise InputError(f"{what} must be an integer in [{lo}, {hi}], got {v!r}")
        for opt in self.backend_options:
            if "=" not in opt or "," in opt or '"' in opt:
                raise InputError(f"backend option {opt!r} is not KEY=VALUE", hint="e.g. intra_op_threads=1")
        return self

    def model_name(self, mode: str) -> str:
        return self.name if mode == "exit" else f"{self.name}_{mode}"

    def specs(self) -> List[ModelSpec]:
        return [ModelSpec(self.model_name(m), m, self.offsets, self.use_deploy, self.alpha) for m in self.modes]


def _param(key: str, value: str) -> str:
    value = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}'


def config_text(spec: ModelSpec, opts: RepositoryOptions, bundle_ref: str, sample_shape: Sequence[int],
                outputs) -> str:
    """A model's config.pbtxt: Python backend, dynamic batching, CPU instances, I/O, parameters."""
    dims = ", ".join(str(int(d)) for d in sample_shape)
    inputs = ",\n".join(f'  {{ name: "{n}" data_type: TYPE_FP32 dims: [ {dims} ] optional: true }}'
                        for n in (INPUT, RAW_INPUT))
    outs = ",\n".join(f'  {{ name: "{o.name}" data_type: {TRITON_TYPES[o.dtype]} '
                      f'dims: [ {", ".join(str(d) for d in o.dims)} ] }}' for o in outputs)
    params = {"bundle": bundle_ref, "mode": spec.mode,
              "offsets": ",".join(repr(float(o)) for o in spec.offsets) if spec.offsets is not None else "",
              "use_deploy": "true" if spec.use_deploy else "false",
              "alpha": repr(float(spec.alpha)) if spec.alpha is not None else "",
              "backend_options": ",".join(opts.backend_options)}
    return "\n".join([
        f"# jei-edge: bundle served by the Python backend (mode {spec.mode}); see docs/serving.md",
        f'name: "{spec.name}"', 'backend: "python"', f"max_batch_size: {opts.max_batch_size}",
        f"dynamic_batching {{ max_queue_delay_microseconds: {opts.max_queue_delay_us} }}",
        f"instance_group [ {{ count: {opts.instances} kind: KIND_CPU }} ]",
        f"input [\n{inputs}\n]", f"output [\n{outs}\n]",
        "parameters [\n" + ",\n".join(_param(k, v) for k, v in params.items()) + "\n]", ""])


def write_repository(bundle, out, opts: RepositoryOptions, copy_bundle: bool = True, force: bool = False) -> Path:
    """Write the model repository for ``bundle`` at ``out`` (see the module docstring).

    ``copy_bundle=False`` names the bundle by its absolute path instead of copying it (``serve``).
    The bundle is opened and verified first; its runtime is loaded with the backend options to
    derive the outputs (so a bundle or an option the runtime refuses is refused here, not when
    Triton loads the model).
    """
    from jei_edge.runtime import Runtime
    from jei_edge.serve.handler import Handler

    opts.check()
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists", hint="choose another -o or pass --force to replace it")
    bundle = Path(bundle)
    specs = opts.specs()
    from jei_edge.runtime.output import parse_backend_options

    with Runtime.load(bundle, device="cpu", **parse_backend_options(opts.backend_options)) as rt:
        handlers = [Handler(rt, s) for s in specs]  # checks offsets, alpha and the plain graph
        shape = handlers[0].sample_shape
        outputs = [h.outputs() for h in handlers]
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        first = specs[0].name  # holds the bundle copy
        for spec, outs in zip(specs, outputs):
            d = tmp / spec.name
            (d / "1").mkdir(parents=True)
            (d / "1" / "model.py").write_text(MODEL_PY)
            if not copy_bundle:
                ref = str(bundle.resolve())
            elif spec.name == first:
                shutil.copytree(bundle, d / "1" / "model.jei", symlinks=False)
                ref = "1/model.jei"
            else:
                ref = f"../{first}/1/model.jei"
            (d / "config.pbtxt").write_text(config_text(spec, opts, ref, shape, outs))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
