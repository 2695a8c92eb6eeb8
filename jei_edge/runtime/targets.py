"""Hardware targets: TOML data files in ``targets/`` (torch-free, typed, validated).

A target names the backend that builds and runs a bundle, the GPU generation (compute
capability), the precisions it supports, its batch profile, memory limits, the toolchain it
expects and the backend settings (the table named after the backend, parsed by that backend's
settings class when a runtime loads). ``load_target("cpu")`` reads the shipped
``targets/cpu.toml``; ``load_target("path/to/board.toml")`` reads any file with the same
validation: unknown keys are refused at every level, types and ranges are checked, and every
problem is one ``JeiEdgeError`` naming the file and the key.

Catalog naming (``jei-edge targets`` lists it):

* ``cpu``: any x86-64 / aarch64 CPU through onnxruntime (the default).
* ``rtx-<architecture>``: discrete NVIDIA GPUs through TensorRT-RTX, one file per compute
  capability: ``rtx-turing`` (7.5), ``rtx-ampere`` (8.6, GeForce/RTX A-series), ``rtx-ada`` (8.9),
  ``rtx-blackwell`` (12.0). A second compute capability of the same architecture gets an ``-smXY``
  suffix: ``rtx-ampere-sm80`` (8.0, A100-class). Engines are built ahead of time on any machine.
* ``gb10``: the GB10 superchip (DGX Spark, 12.1) through TensorRT-RTX.
* ``<board>-jp<JetPack major>``: Jetson boards through the JetPack's TensorRT, built on the
  board itself: ``orin-nano``, ``orin-nx``, ``agx-orin`` (8.7) and ``thor`` (11.0) with ``-jp6``
  (JetPack 6.1/6.2) or ``-jp7`` (JetPack 7.x). Memory-dependent values assume one module variant,
  named in the file's notes.

File layout (every key but ``backend`` is optional; defaults in brackets)::

    name = "orin-nano-jp6"          # [the file name]
    description = "one line"
    backend = "tensorrt"            # onnxruntime | tensorrt | tensorrt_rtx
    device = "cuda"                 # [the backend's: cpu for onnxruntime, else cuda]
    compute_capability = "8.7"      # required for cuda targets, absent for cpu
    precisions = ["fp32", "fp16"]   # subset of fp32 / fp16 / int8 [fp32]
    default_precision = "fp16"      # one of precisions [the first]
    dla = 0                         # DLA cores (tensorrt only) [0]
    notes = "free text"
    [onnx]       opset = 17
    [batch]      min = 1, opt = 1, max = 256       (1 <= min <= opt <= max)
    [memory]     device_mib, workspace_mib (builder workspace limit), shared (device memory is
                 the CPU's DRAM)
    [toolchain]  python, onnxruntime, cuda, tensorrt, tensorrt_rtx, jetpack: a version string
                 ("10.3", ">=1.17") or a list of accepted versions
    [BACKEND]    the backend's settings (validated by its settings class, not here)
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from jei_edge._data import data_dir, is_file_name
from jei_edge.errors import JeiEdgeError

try:  # Python >= 3.11
    import tomllib as _toml  # novermin (tomli below on 3.10)
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as _toml  # type: ignore[no-redef]

PRECISIONS = ("fp32", "fp16", "int8")  # what a build can produce (jei_edge.bundle.manifest.PRECISIONS)
BACKEND_DEVICE = {"onnxruntime": "cpu", "tensorrt": "cuda", "tensorrt_rtx": "cuda"}  # build backends
# compute capabilities TensorRT-RTX 1.7 builds engines for (Jetson Orin 8.7 and Thor 11.0 use tensorrt)
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
BUILT_HERE = "here"
BUILT_ON_BOARD = "on the board (jei-edge lower)"

_TOP = ("name", "description", "backend", "device", "compute_capability", "precisions", "default_precision",
        "dla", "notes", "onnx", "batch", "memory", "toolchain")
_TABLES = {"onnx": ("opset",), "batch": ("min", "opt", "max"), "memory": ("device_mib", "workspace_mib", "shared"),
           "toolchain": ("python", "onnxruntime", "cuda", "tensorrt", "tensorrt_rtx", "jetpack")}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_CC = re.compile(r"^[1-9][0-9]?\.[0-9]$")
_VERSION = re.compile(r"^(>=)?[0-9]+(\.[0-9]+){0,3}$")
_MAX_BATCH = 1 << 16  # jei_edge.bundle.manifest.MAX_BATCH
_EXAMPLE = "see targets/cpu.toml or targets/orin-nano-jp6.toml"


@dataclass(frozen=True)
class Target:
    """One hardware target (a validated target file).

    Attributes:
        name: the target's name (``rtx-ada``).
        backend: ``onnxruntime`` | ``tensorrt`` (JetPack) | ``tensorrt_rtx``.
        device: ``cpu`` | ``cuda``.
        description: one line.
        precisions: what the target runs (subset of fp32/fp16/int8).
        default_precision: the build's precision unless ``--precision`` says otherwise.
        opset: the ONNX opset of the exported stage graphs.
        max_batch: the batch profile's max (the runtime preallocates this many rows).
        backend_options: the ``[BACKEND]`` table (validated by the backend's settings class).
        source: the file it was read from.
        compute_capability: ``"8.9"`` etc.; None for cpu.
        min_batch, opt_batch: the rest of the batch profile (engines' optimisation profile).
        memory_mib: the device memory assumed (None: unspecified, e.g. the CPU's).
        workspace_mib: the engine builder's workspace limit (None: the backend's default).
        shared_memory: the device memory is the CPU's DRAM (Jetson, GB10).
        toolchain: component -> accepted versions (``{"tensorrt": ("10.3",)}``).
        dla: number of DLA cores (Jetson; FP16/INT8, static shapes).
        notes: free text (variants assumed, caveats).
    """

    name: str
    backend: str
    device: str = "cpu"
    description: str = ""
    precisions: Tuple[str, ...] = ("fp32",)
    default_precision: str = "fp32"
    opset: int = 17
    max_batch: int = 256
    backend_options: Dict[str, Any] = field(default_factory=dict, hash=False)
    source: str = ""
    compute_capability: Optional[str] = None
    min_batch: int = 1
    opt_batch: int = 1
    memory_mib: Optional[int] = None
    workspace_mib: Optional[int] = None
    shared_memory: bool = False
    toolchain: Dict[str, Tuple[str, ...]] = field(default_factory=dict, hash=False)
    dla: int = 0
    notes: str = ""

    @property
    def batch_profile(self) -> Tuple[int, int, int]:
        """``(min, opt, max)`` rows."""
        return (self.min_batch, self.opt_batch, self.max_batch)

    @property
    def builds_here(self) -> bool:
        """Engines (or graphs) for this target can be built on any machine; Jetson TensorRT
        engines are built on the board by its JetPack's TensorRT."""
        return self.backend != "tensorrt"

    @property
    def build_location(self) -> str:
        return BUILT_HERE if self.builds_here else BUILT_ON_BOARD

    def to_manifest(self):
        """The bundle manifest's copy of this target."""
        from jei_edge.bundle.manifest import TargetInfo

        return TargetInfo(name=self.name, backend=self.backend, device=self.device, description=self.description,
                          max_batch=self.max_batch, backend_options=dict(self.backend_options),
                          compute_capability=self.compute_capability)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (``jei-edge targets --json``)."""
        return {"name": self.name, "backend": self.backend, "device": self.device,
                "compute_capability": self.compute_capability, "description": self.description,
                "precisions": list(self.precisions), "default_precision": self.default_precision,
                "batch": {"min": self.min_batch, "opt": self.opt_batch, "max": self.max_batch},
                "memory": {"device_mib": self.memory_mib, "workspace_mib": self.workspace_mib,
                           "shared": self.shared_memory},
                "toolchain": {k: list(v) for k, v in self.toolchain.items()}, "dla": self.dla, "opset": self.opset,
                "build": self.build_location, "backend_options": dict(self.backend_options), "notes": self.notes,
                "source": self.source}


def available_targets() -> List[str]:
    """Names of the shipped targets (``targets/*.toml``), sorted."""
    return sorted(p.stem for p in data_dir("targets").glob("*.toml"))


def load_targets() -> List[Target]:
    """Every shipped target, loaded and validated."""
    return [load_target(n) for n in available_targets()]


def load_target(name_or_path) -> Target:
    """A target by name (``targets/NAME.toml``) or from a ``.toml`` file path."""
    name_or_path = str(name_or_path)
    if is_file_name(name_or_path):
        path = Path(name_or_path)
        if not path.exists():
            raise JeiEdgeError(f"target file '{path}' not found: the file does not exist",
                               hint=f"check the path, or give a target name ({', '.join(available_targets())})")
        if not path.is_file():
            raise JeiEdgeError(f"target file '{path}' is not a file", hint="give a .toml file or a target name")
    else:
        path = data_dir("targets") / f"{name_or_path}.toml"
        if not path.is_file():
            names = available_targets()
            close = difflib.get_close_matches(name_or_path, names, n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join(repr(c) for c in close)}? " if close else "") + \
                f"known targets: {', '.join(names) or '(none installed)'} (`jei-edge targets`), or a .toml file"
            raise JeiEdgeError(f"unknown target '{name_or_path}'", hint=hint)
    try:
        with open(path, "rb") as f:
            raw = _toml.load(f)
    except (OSError, _toml.TOMLDecodeError, UnicodeDecodeError) as exc:
        from jei_edge._io import shorten

        raise JeiEdgeError(f"target file '{path}' cannot be read: {shorten(exc, 160)}",
                           hint="it must be a UTF-8 TOML file; " + _EXAMPLE) from None
    return parse_target(raw, str(path), default_name=path.stem)


# -- validation -------------------------------------------------------------------------------------
def _shown(value: Any) -> str:
    from jei_edge._io import shorten

    return shorten(repr(value), 80)


class _File:
    """Error helper: every problem names the file and the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str, hint: str = _EXAMPLE) -> JeiEdgeError:
        return JeiEdgeError(f"target file '{self.source}': key '{key}' {problem}", hint=hint)

    def table(self, raw: Dict[str, Any], key: str) -> Dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table ([{key}]), got {_shown(value)}")
        unknown = sorted(set(value) - set(_TABLES[key]))
        if unknown:
            raise self.fail(f"{key}.{unknown[0]}", "is unknown",
                            hint=f"[{key}] takes {', '.join(_TABLES[key])}; unknown keys are refused")
        return value

    def string(self, raw: Dict[str, Any], key: str, default: Optional[str], label: Optional[str] = None) -> Optional[str]:
        value = raw.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(label or key, f"must be a string, got {_shown(value)}")
        return value

    def integer(self, raw: Dict[str, Any], key: str, default: Optional[int], label: str, lo: int = 1,
                hi: int = 1 << 31) -> Optional[int]:
        value = raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(label, f"must be an integer, got {_shown(value)}")
        if not lo <= value <= hi:
            raise self.fail(label, f"must be in {lo}..{hi}, got {value}")
        return value

    def boolean(self, raw: Dict[str, Any], key: str, default: bool, label: str) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(label, f"must be true or false, got {_shown(value)}")
        return value


def parse_target(raw: Dict[str, Any], source: str = "<dict>", default_name: str = "target") -> Target:
    """A validated ``Target`` from a parsed target file (``source`` names it in errors)."""
    f = _File(source)
    if not isinstance(raw, dict):
        raise JeiEdgeError(f"target file '{source}' is malformed: not a table", hint=_EXAMPLE)
    if "backend" not in raw:
        raise JeiEdgeError(f"target file '{source}' is malformed: key 'backend' is missing",
                           hint=f"add backend = one of {', '.join(BACKEND_DEVICE)}; {_EXAMPLE}")
    backend = raw["backend"]
    if not isinstance(backend, str):
        raise f.fail("backend", f"must be a string, one of {', '.join(BACKEND_DEVICE)}; got {_shown(backend)}",
                     hint=f"e.g. backend = \"onnxruntime\"; {_EXAMPLE}")
    if backend not in BACKEND_DEVICE:
        hint = f"use one of {', '.join(BACKEND_DEVICE)}"
        if backend == "torch-cuda":
            hint = "torch-cuda is a runtime choice (`jei-edge run --device cuda`), not a build target; " + hint
        raise f.fail("backend", f"is {_shown(backend)}, not a backend targets are built for", hint=hint)
    for key in raw:
        if key in _TOP or key == backend:
            continue
        if key in BACKEND_DEVICE or key == "torch-cuda":
            raise f.fail(key, f"is a table of another backend's settings (this target's backend is '{backend}')",
                         hint=f"only a [{backend}] table of backend settings is allowed")
        raise f.fail(key, "is unknown", hint=f"known keys: {', '.join(_TOP)} and a [{backend}] table")

    name = f.string(raw, "name", default_name)
    if not _NAME.match(name):
        raise f.fail("name", f"must be letters, digits, '.', '_' or '-' (at most 64), got {_shown(name)}")
    description = f.string(raw, "description", "")
    notes = f.string(raw, "notes", "")
    device = f.string(raw, "device", BACKEND_DEVICE[backend])
    if device != BACKEND_DEVICE[backend]:
        raise f.fail("device", f"is {_shown(device)}, but backend '{backend}' runs on {BACKEND_DEVICE[backend]}",
                     hint=f"set device = \"{BACKEND_DEVICE[backend]}\" or omit it")

    cc = raw.get("compute_capability")
    if device == "cpu":
        if cc is not None:
            raise f.fail("compute_capability", "is given for a cpu target", hint="remove it (cpu targets have none)")
    else:
        if cc is None:
            raise f.fail("compute_capability", "is missing", hint="a cuda target names its GPU generation, "
                         "e.g. compute_capability = \"8.9\"")
        if not isinstance(cc, str) or not _CC.match(cc):
            raise f.fail("compute_capability", f"must be a string like \"8.9\", got {_shown(cc)}",
                         hint="write MAJOR.MINOR in quotes (SM89 is \"8.9\", SM120 is \"12.0\")")
        if backend == "tensorrt_rtx" and cc not in RTX_COMPUTE_CAPABILITIES:
            raise f.fail("compute_capability", f"is {cc}, which TensorRT-RTX does not build for",
                         hint=f"TensorRT-RTX builds for {', '.join(RTX_COMPUTE_CAPABILITIES)}; Jetson Orin (8.7) and "
                              "Thor (11.0) use backend = \"tensorrt\"")

    precisions = raw.get("precisions", ["fp32"])
    if not isinstance(precisions, list) or not precisions or not all(isinstance(p, str) for p in precisions):
        raise f.fail("precisions", f"must be a non-empty list of strings, got {_shown(precisions)}",
                     hint=f"e.g. precisions = [\"fp32\", \"fp16\"] (from {', '.join(PRECISIONS)})")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise f.fail("precisions", f"lists {_shown(bad[0])}, which is not a build precision",
                     hint=f"choose from {', '.join(PRECISIONS)}")
    if len(set(precisions)) != len(precisions):
        raise f.fail("precisions", f"lists a precision twice: {precisions}", hint="list each precision once")
    default_precision = f.string(raw, "default_precision", precisions[0])
    if default_precision not in precisions:
        raise f.fail("default_precision", f"is {_shown(default_precision)}, which is not in precisions {precisions}",
                     hint="add it to precisions or choose one of them")

    dla = f.integer(raw, "dla", 0, "dla", lo=0, hi=16)
    if dla and backend != "tensorrt":
        raise f.fail("dla", f"is {dla}, but DLA cores are used through backend 'tensorrt' only (this is '{backend}')",
                     hint="set dla = 0 or remove it")

    onnx = f.table(raw, "onnx")
    opset = f.integer(onnx, "opset", 17, "onnx.opset", lo=1, hi=99)

    batch = f.table(raw, "batch")
    lo = f.integer(batch, "min", 1, "batch.min", hi=_MAX_BATCH)
    hi = f.integer(batch, "max", 256, "batch.max", hi=_MAX_BATCH)
    opt = f.integer(batch, "opt", lo, "batch.opt", hi=_MAX_BATCH)
    if lo > hi:
        raise f.fail("batch.min", f"= {lo} is larger than batch.max = {hi}", hint="need 1 <= min <= opt <= max")
    if not lo <= opt <= hi:
        raise f.fail("batch.opt", f"= {opt} is outside batch.min..batch.max = {lo}..{hi}",
                     hint="need 1 <= min <= opt <= max")

    memory = f.table(raw, "memory")
    memory_mib = f.integer(memory, "device_mib", None, "memory.device_mib")
    workspace_mib = f.integer(memory, "workspace_mib", None, "memory.workspace_mib")
    shared = f.boolean(memory, "shared", False, "memory.shared")
    if memory_mib is not None and workspace_mib is not None and workspace_mib > memory_mib:
        raise f.fail("memory.workspace_mib", f"= {workspace_mib} is larger than memory.device_mib = {memory_mib}",
                     hint="the builder's workspace must fit in the device's memory")

    toolchain: Dict[str, Tuple[str, ...]] = {}
    for key, value in f.table(raw, "toolchain").items():
        versions = [value] if isinstance(value, str) else value
        if not isinstance(versions, list) or not versions or \
                not all(isinstance(v, str) and _VERSION.match(v) for v in versions):
            raise f.fail(f"toolchain.{key}", f"must be a version string or a list of them, got {_shown(value)}",
                         hint="e.g. tensorrt = \"10.3\", onnxruntime = \">=1.17\" or jetpack = [\"6.1\", \"6.2\"]")
        toolchain[key] = tuple(versions)

    options = raw.get(backend, {})
    if not isinstance(options, dict):
        raise f.fail(backend, f"must be a table of {backend} settings ([{backend}]), got {_shown(options)}")

    return Target(name=name, backend=backend, device=device, description=description, precisions=tuple(precisions),
                  default_precision=default_precision, opset=opset, max_batch=hi, backend_options=dict(options),
                  source=source, compute_capability=cc, min_batch=lo, opt_batch=opt, memory_mib=memory_mib,
                  workspace_mib=workspace_mib, shared_memory=shared, toolchain=toolchain, dla=dla, notes=notes)
