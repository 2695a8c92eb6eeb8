"""The bundle manifest (``manifest.json``), schema version 2: typed, torch-free, parsed in one place.

Every reader of a bundle goes through ``parse_manifest``: it validates every field (types, ranges,
cross-field consistency) and turns any malformed manifest into one ``BundleError`` naming the
field (``stages[2].outputs[0].shape[1]``) and the fix. Writers build the dataclasses and call
``Manifest.to_dict()``, so the JSON on disk and the objects in memory cannot drift apart.

Schema v1 bundles (jei-edge 0.1 before the typed manifest) load through the same parser: their
few missing keys (``engines``, ``references``, per-stage ``exits``/``gates`` of the earliest
builds) get the values v1 implied; everything else is validated as strictly as v2.

Layout of a bundle (paths are relative, POSIX, inside the bundle)::

    NAME.jei/
      manifest.json            this schema
      stages/stageK.onnx       one graph per stage (``x``/``hidden_in`` -> ``hidden_out, probs, gate``)
      engines/...              TensorRT / TensorRT-RTX engines per stage (``Stage.engines``)
      plain.onnx               the plain backbone (no IMs, no gates): ``x`` -> ``probs``
      reference/verify.npz     stored reference inputs, outputs and decisions (``jei-edge verify``)
      model.pt                 optional: the checkpoint (the torch-cuda executor rebuilds stages from it)
      report.json, report.txt  the build report

Tensor shapes are stored with the batch axis first (``["batch", 17, 64]``); in memory
``TensorSpec.shape`` is the per-row shape ``(17, 64)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from jei_edge._io import shorten
from jei_edge.errors import BundleError

SCHEMA = "jei-edge/bundle"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB; refuse absurd files before parsing
MAX_DIM = 1 << 24  # largest single per-row dimension
MAX_ROW_ELEMENTS = 1 << 28  # largest per-row tensor (elements)
MAX_CLASSES = 1 << 20
MAX_STAGES = 4096
MAX_BATCH = 1 << 16
MAX_DEPTH = 32  # nesting of free-form (informative) JSON objects
# element types a stage tensor may have; gates and probabilities are always float32
DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}
# a quantized hidden state (an INT8 bundle's stage edge): its element type and zero-point range;
# real value = (q - zero_point) * scale, one scale and zero point per edge
QUANTIZED = {"uint8": (0, 255), "int8": (-128, 127)}
PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_BACKENDS = ("tensorrt", "tensorrt_rtx")
REBUILD = "rebuild the bundle with `jei-edge build MODEL.pt --target T -o NAME.jei --force`"


# -- the dataclasses -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One stage input or output: name, per-row shape (batch axis removed) and element type.

    A quantized hidden state (``uint8``/``int8``, an INT8 bundle's stage edge) also carries its
    ``scale`` and ``zero_point``: real value = ``(q - zero_point) * scale``. ``channels_last``: a
    quantized feature-map edge stored ``[H, W, C]`` per row (the layout onnxruntime's quantized
    convolutions compute in) instead of the model's ``[C, H, W]``; the runtime moves rows, never
    looks inside them, so only the build (parity) and tools reading the values care.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str = "float32"
    scale: Optional[float] = None
    zero_point: Optional[int] = None
    channels_last: bool = False

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def row_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        return self.row_elements * self.itemsize

    def to_dict(self) -> Dict[str, Any]:
        d = {"name": self.name, "shape": ["batch", *self.shape], "dtype": self.dtype}
        if self.scale is not None:
            d.update(scale=self.scale, zero_point=self.zero_point)
        if self.channels_last:
            d["channels_last"] = True
        return d


@dataclass(frozen=True)
class Engine:
    """A compiled engine of one stage, keyed by what it is compatible with.

    Attributes:
        file: the serialized engine inside the bundle.
        backend: ``tensorrt`` (JetPack) or ``tensorrt_rtx``.
        toolchain: the TensorRT / TensorRT-RTX version that built it (engines do not cross versions).
        compute_capability: ``"8.9"`` etc. (the GPU generation it runs on).
        precision: ``fp32`` | ``fp16`` | ``int8``.
        profile: the optimisation profile's batch range ``(min, opt, max)``.
    """

    file: str
    backend: str
    toolchain: str
    compute_capability: str
    precision: str
    profile: Tuple[int, int, int]

    def to_dict(self) -> Dict[str, Any]:
        return {"file": self.file, "backend": self.backend, "toolchain": self.toolchain,
                "compute_capability": self.compute_capability, "precision": self.precision,
                "profile": list(self.profile)}


@dataclass(frozen=True)
class Lowering:
    """The lowering plan of a TensorRT / TensorRT-RTX bundle: how one engine per stage graph is built.

    ``jei-edge build`` writes it from the target; the engines are then built on the host
    (TensorRT-RTX builds ahead of time, without a GPU) or on the board (``jei-edge lower``, with
    JetPack's TensorRT). Every engine of the bundle has the plan's precision and batch profile.

    Attributes:
        backend: ``tensorrt`` or ``tensorrt_rtx``.
        precision: ``fp32`` | ``fp16`` | ``int8`` (the stage graphs are already in it: strongly typed).
        compute_capability: the target GPU's (``"8.6"``; Orin ``"8.7"``).
        profile: the optimisation profile's batch range ``(min, opt, max)``.
        toolchain: the toolchain versions the target expects (``("10.3",)``: prefixes).
        int8: how int8 is expressed: ``qdq`` (activations and weights, TensorRT) or
            ``weight-only`` (INT8 weights, FP16 compute: TensorRT-RTX); None for fp32/fp16.
        workspace_mib: the builder's workspace limit (None: the toolchain's default).
        optimization_level: ``builder_optimization_level`` 0-5 (None: the default).
    """

    backend: str
    precision: str
    compute_capability: str
    profile: Tuple[int, int, int]
    toolchain: Tuple[str, ...] = ()
    int8: Optional[str] = None
    workspace_mib: Optional[int] = None
    optimization_level: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "compute_capability": self.compute_capability,
                "profile": list(self.profile), "toolchain": list(self.toolchain), "int8": self.int8,
                "workspace_mib": self.workspace_mib, "optimization_level": self.optimization_level}


@dataclass(frozen=True)
class Stage:
    """Stage k: the blocks between two boundaries, compiled as one graph (plus engines).

    ``exits`` are the exits inside the stage (one unless merged); rows leave after the stage
    through ``gates`` (every exit but the final head) or at the final head (the last stage).
    """

    index: int
    file: str
    blocks: Tuple[int, int]
    exits: Tuple[int, ...]
    gates: Tuple[int, ...]
    macs: int
    input_guard: bool
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    engines: Tuple[Engine, ...] = ()

    @property
    def exit(self) -> int:
        """The exit at the stage's end (the final head for the last stage)."""
        return self.exits[-1]

    @property
    def gated(self) -> bool:
        """Rows leave through a boundary after this stage (it outputs ``hidden_out``)."""
        return any(o.name == "hidden_out" for o in self.outputs)

    @property
    def merged(self) -> bool:
        return len(self.exits) > 1

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    def output(self, name: str) -> Optional[TensorSpec]:
        for o in self.outputs:
            if o.name == name:
                return o
        return None

    @property
    def hidden(self) -> Optional[TensorSpec]:
        """The ``hidden_out`` spec (None for the last stage)."""
        return self.output("hidden_out")

    def to_dict(self) -> Dict[str, Any]:
        return {"index": self.index, "file": self.file, "blocks": list(self.blocks), "exit": self.exit,
                "exits": list(self.exits), "gates": list(self.gates), "gated": self.gated, "macs": self.macs,
                "input_guard": self.input_guard, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "engines": [e.to_dict() for e in self.engines]}


@dataclass(frozen=True)
class Graph:
    """A whole-model graph (the plain backbone): ``x`` -> ``probs``."""

    file: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    macs: int

    def to_dict(self) -> Dict[str, Any]:
        return {"file": self.file, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs], "macs": self.macs}


@dataclass(frozen=True)
class TargetInfo:
    """The target a bundle was built for (a copy of the target file's essentials)."""

    name: str
    backend: str
    device: str
    max_batch: int
    description: str = ""
    backend_options: Dict[str, Any] = field(default_factory=dict)
    compute_capability: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "device": self.device, "description": self.description,
                "max_batch": self.max_batch, "backend_options": dict(self.backend_options),
                "compute_capability": self.compute_capability}


@dataclass(frozen=True)
class Exits:
    """Exit positions, gate pos_weights, per-exit costs and the conformal table."""

    positions: Tuple[int, ...]
    pos_weights: Tuple[float, ...]
    exit_macs: Tuple[int, ...]
    cost: Tuple[float, ...]
    cost_vs_plain: Tuple[float, ...]
    alphas: Tuple[float, ...] = ()
    qhat: Tuple[Tuple[float, ...], ...] = ()
    calibration_split_size: int = 0

    @property
    def num_gates(self) -> int:
        return len(self.positions)

    @property
    def num_exits(self) -> int:
        return len(self.positions) + 1

    def to_dict(self) -> Dict[str, Any]:
        return {"positions": list(self.positions), "pos_weights": list(self.pos_weights),
                "alphas": list(self.alphas), "qhat": [list(r) for r in self.qhat],
                "calibration_split_size": self.calibration_split_size, "exit_macs": list(self.exit_macs),
                "cost": list(self.cost), "cost_vs_plain": list(self.cost_vs_plain)}


@dataclass(frozen=True)
class Costs:
    full_macs: int
    plain_macs: int
    stage_macs: Tuple[int, ...]

    def to_dict(self) -> Dict[str, Any]:
        return {"full_macs": self.full_macs, "plain_macs": self.plain_macs, "stage_macs": list(self.stage_macs)}


@dataclass(frozen=True)
class Preprocessing:
    """Raw ``[0, 1]`` values -> model input: ``(x - mean) / std`` per channel."""

    input_shape: Tuple[int, ...]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def to_dict(self) -> Dict[str, Any]:
        return {"input_shape": list(self.input_shape), "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class References:
    """Stored verification data (``jei-edge verify``): inputs, the PyTorch model's outputs and
    exit decisions on them, written by the export step.

    Attributes:
        file: an ``.npz`` inside the bundle (arrays ``x``, ``exit_index``, ``probs``, ``margin``,
            ``full_probs``, ``gate``; see ``jei_edge.compile.verify``).
        samples: rows stored.
        kinds: how many rows of each kind (real, uniform_noise, ...).
    """

    file: str
    samples: int
    kinds: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"file": self.file, "samples": self.samples, "kinds": dict(self.kinds)}


@dataclass(frozen=True)
class Deploy:
    """The deploy profile ``jei-edge tune`` chose: threshold offsets used by default at run time,
    and the conformal table recomputed for them.

    Attributes:
        offsets: per-gate threshold offsets ``delta_l`` (``num_gates`` values).
        alphas: the conformal alphas of ``qhat``.
        qhat: per-exit conformal thresholds ``[num_exits][len(alphas)]`` for these offsets
            (calibration data disjoint from the data that chose them), or empty.
        budget: what was asked (``cost<=0.5``, ``latency-ms<=2.0 at batch 8``).
        info: how it was chosen (data source, sizes, validation accuracy and cost, seed).
    """

    offsets: Tuple[float, ...]
    alphas: Tuple[float, ...] = ()
    qhat: Tuple[Tuple[float, ...], ...] = ()
    budget: str = ""
    info: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"offsets": list(self.offsets), "alphas": list(self.alphas), "qhat": [list(r) for r in self.qhat],
                "budget": self.budget, "info": dict(self.info)}


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. Build one with ``parse_manifest`` (reading) or the
    constructor (writing; ``validate()`` then checks it as a reader would)."""

    name: str
    created: str
    target: TargetInfo
    precision: str
    input: TensorSpec
    num_classes: int
    class_names: Tuple[str, ...]
    preprocessing: Preprocessing
    stages: Tuple[Stage, ...]
    exits: Exits
    costs: Costs
    toolchain: Dict[str, Any]
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    plain: Optional[Graph] = None
    backbone: Dict[str, Any] = field(default_factory=dict)
    model_file: Optional[str] = None
    report: Optional[str] = None
    report_text: Optional[str] = None
    references: Optional[References] = None
    plan: Dict[str, Any] = field(default_factory=dict)
    quantization: Optional[Dict[str, Any]] = None
    lowering: Optional[Lowering] = None
    deploy: Optional[Deploy] = None
    schema_version: int = SCHEMA_VERSION

    # -- derived -----------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_gates(self) -> int:
        return self.exits.num_gates

    @property
    def num_exits(self) -> int:
        return self.exits.num_exits

    @property
    def int8_fallback(self) -> Optional[Dict[str, Any]]:
        """The INT8 build's per-stage fallback record (``quantization["fallback"]``, informative
        JSON: ``mode``, ``fp32_stages``, ...), or None."""
        f = self.quantization.get("fallback") if isinstance(self.quantization, dict) else None
        return f if isinstance(f, dict) else None

    @property
    def stage_gates(self) -> List[Tuple[int, ...]]:
        """The gate indices each stage evaluates (they cover 0..G-1 once, in order)."""
        return [s.gates for s in self.stages]

    def referenced_files(self) -> List[str]:
        """Every path the manifest refers to besides ``files`` itself."""
        refs = [s.file for s in self.stages] + [e.file for s in self.stages for e in s.engines]
        if self.plain is not None:
            refs.append(self.plain.file)
        if self.references is not None:
            refs.append(self.references.file)
        refs += [p for p in (self.model_file, self.report, self.report_text) if p]
        return refs

    def replace(self, **changes) -> "Manifest":
        from dataclasses import replace

        return replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "name": self.name, "created": self.created,
            "target": self.target.to_dict(), "precision": self.precision, "backbone": dict(self.backbone),
            "input": self.input.to_dict(), "num_classes": self.num_classes, "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(), "stages": [s.to_dict() for s in self.stages],
            "plain": self.plain.to_dict() if self.plain else None, "exits": self.exits.to_dict(),
            "costs": self.costs.to_dict(), "model_file": self.model_file, "report": self.report,
            "report_text": self.report_text,
            "references": self.references.to_dict() if self.references else None,
            "plan": dict(self.plan), "quantization": self.quantization,
            "lowering": self.lowering.to_dict() if self.lowering else None,
            "deploy": self.deploy.to_dict() if self.deploy else None,
            "toolchain": dict(self.toolchain), "files": {k: dict(v) for k, v in self.files.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def validate(self) -> "Manifest":
        """Round-trip through the parser (what a reader will see); returns the parsed copy."""
        return parse_manifest(json.loads(self.to_json()), "manifest")


# -- parsing ----------------------------------------------------------------------------------------
class _Field:
    """A cursor into the raw JSON that names the field in every error."""

    def __init__(self, value: Any, path: str, where: str):
        self.value, self.path, self.where = value, path, where

    def fail(self, what: str) -> BundleError:
        shown = repr(self.value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return BundleError(f"{self.where}: manifest field '{self.path}' {what}, got {shown}", hint=REBUILD)

    def sub(self, key, value: Any = None) -> "_Field":
        path = f"{self.path}[{key}]" if isinstance(key, int) else (f"{self.path}.{key}" if self.path else key)
        return _Field(value, path, self.where)

    # containers
    def obj(self) -> Dict[str, Any]:
        if not isinstance(self.value, dict):
            raise self.fail("must be an object")
        return self.value

    def key(self, name: str, default: Any = ..., required: bool = True) -> "_Field":
        d = self.obj()
        if name not in d:
            if default is not ...:
                return self.sub(name, default)
            raise BundleError(f"{self.where}: manifest lacks field '{self.sub(name).path}'", hint=REBUILD)
        return self.sub(name, d[name])

    def items(self, max_len: int = 1 << 20) -> List["_Field"]:
        if not isinstance(self.value, list):
            raise self.fail("must be a list")
        if len(self.value) > max_len:
            raise self.fail(f"must have at most {max_len} entries (has {len(self.value)})")
        return [self.sub(i, v) for i, v in enumerate(self.value)]

    # scalars
    def string(self, allow_empty: bool = True, max_len: int = 4096) -> str:
        if not isinstance(self.value, str) or (not allow_empty and not self.value) or len(self.value) > max_len:
            raise self.fail("must be a " + ("" if allow_empty else "non-empty ") + f"string (<= {max_len} chars)")
        return self.value

    def opt_string(self) -> Optional[str]:
        return None if self.value is None else self.string()

    def integer(self, lo: int = 0, hi: int = 1 << 62) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int) or not lo <= self.value <= hi:
            raise self.fail(f"must be an integer in [{lo}, {hi}]")
        return int(self.value)

    def number(self, lo: float = -1e300, hi: float = 1e300) -> float:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:  # NaN fails too
            raise self.fail(f"must be a finite number in [{lo:g}, {hi:g}]")
        return float(v)

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail("must be true or false")
        return self.value

    def choice(self, options: Sequence[str]) -> str:
        if self.value not in options:
            raise self.fail(f"must be one of {list(options)}")
        return self.value

    def relpath(self) -> str:
        from jei_edge.bundle.bundle import check_relpath

        try:
            return check_relpath(self.string(allow_empty=False), f"manifest field '{self.path}'")
        except BundleError as exc:
            raise BundleError(f"{self.where}: {exc.message}", hint=exc.hint) from None

    def free(self) -> Any:
        """Informative JSON (plan, quantization, toolchain, backbone kwargs): any JSON, bounded depth."""
        _check_depth(self, self.value, 0)
        return self.value


def _check_depth(f: _Field, v: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise f.fail(f"is nested deeper than {MAX_DEPTH} levels")
    if isinstance(v, dict):
        for x in v.values():
            _check_depth(f, x, depth + 1)
    elif isinstance(v, list):
        for x in v:
            _check_depth(f, x, depth + 1)


def _tensor(f: _Field) -> TensorSpec:
    name = f.key("name").string(allow_empty=False, max_len=256)
    dims = f.key("shape").items(max_len=16)
    if not dims or dims[0].value != "batch":
        raise f.key("shape").fail('must start with the dynamic batch axis "batch"')
    shape = tuple(d.integer(1, MAX_DIM) for d in dims[1:])
    dtype = f.key("dtype", "float32").choice(tuple(DTYPES))
    scale_f, zp_f = f.key("scale", None), f.key("zero_point", None)
    scale = zero_point = None
    if scale_f.value is not None or zp_f.value is not None:
        if dtype not in QUANTIZED:
            raise (scale_f if scale_f.value is not None else zp_f).fail(
                f"is only allowed on a quantized tensor ({' or '.join(QUANTIZED)}), not {dtype}")
        scale = scale_f.number(1e-30, 1e30)
        zero_point = zp_f.integer(*QUANTIZED[dtype])
    channels_last = f.key("channels_last", False).boolean()
    if channels_last and (scale is None or len(shape) != 3):
        raise f.key("channels_last").fail("is only allowed on a quantized hidden state of per-row shape [H, W, C]")
    spec = TensorSpec(name, shape, dtype, scale, zero_point, channels_last)
    if spec.row_elements > MAX_ROW_ELEMENTS:
        raise f.key("shape").fail(f"holds more than {MAX_ROW_ELEMENTS} elements per row")
    return spec


def _ints(f: _Field, lo: int = 0, hi: int = 1 << 62, max_len: int = 1 << 16) -> Tuple[int, ...]:
    return tuple(x.integer(lo, hi) for x in f.items(max_len))


def _floats(f: _Field, lo: float = -1e300, hi: float = 1e300, max_len: int = 1 << 16) -> Tuple[float, ...]:
    return tuple(x.number(lo, hi) for x in f.items(max_len))


def _engine(f: _Field) -> Engine:
    profile = _profile(f.key("profile"))
    return Engine(file=f.key("file").relpath(), backend=f.key("backend").choice(ENGINE_BACKENDS),
                  toolchain=f.key("toolchain").string(allow_empty=False, max_len=64),
                  compute_capability=f.key("compute_capability").string(allow_empty=False, max_len=16),
                  precision=f.key("precision").choice(PRECISIONS), profile=profile)


INT8_FORMS = ("qdq", "weight-only")


def _profile(f: _Field) -> Tuple[int, int, int]:
    profile = _ints(f, 1, MAX_BATCH, max_len=3)
    if len(profile) != 3 or not profile[0] <= profile[1] <= profile[2]:
        raise f.fail("must be [min, opt, max] batch sizes with min <= opt <= max")
    return profile


def _lowering(f: _Field, precision: str, target: "TargetInfo", stages: Sequence["Stage"]) -> "Lowering":
    def opt_int(name: str, lo: int, hi: int) -> Optional[int]:
        x = f.key(name, None)
        return None if x.value is None else x.integer(lo, hi)

    int8_f = f.key("int8", None)
    low = Lowering(backend=f.key("backend").choice(ENGINE_BACKENDS), precision=f.key("precision").choice(PRECISIONS),
                   compute_capability=f.key("compute_capability").string(allow_empty=False, max_len=16),
                   profile=_profile(f.key("profile")),
                   toolchain=tuple(x.string(allow_empty=False, max_len=64) for x in f.key("toolchain", []).items(16)),
                   int8=None if int8_f.value is None else int8_f.choice(INT8_FORMS),
                   workspace_mib=opt_int("workspace_mib", 1, 1 << 24),
                   optimization_level=opt_int("optimization_level", 0, 5))
    if low.backend != target.backend:
        raise f.key("backend").fail(f"must be the target's backend '{target.backend}'")
    if low.precision != precision:
        raise f.key("precision").fail(f"must be the bundle's precision '{precision}'")
    if (low.int8 is not None) != (precision == "int8"):
        raise f.key("int8").fail("must name the int8 form (qdq or weight-only) exactly when the precision is int8")
    if low.profile[2] > target.max_batch:
        raise f.key("profile").fail(f"must not exceed the target's max_batch {target.max_batch}")
    built = [bool(s.engines) for s in stages]
    if any(built) and not all(built):
        none = [s.index for s in stages if not s.engines]
        raise f.fail(f"a lowered bundle has engines for every stage; stages {none} have none")
    for s in stages:
        for e in s.engines:
            # an INT8 plan's stage kept FP32 by the build's fallback has an FP32 engine
            fallback = low.precision == "int8" and e.precision == "fp32"
            if (e.precision != low.precision and not fallback) or e.profile != low.profile:
                raise f.fail(f"stage {s.index}'s engine '{e.file}' is {e.precision} {list(e.profile)}, not the plan's "
                             f"{low.precision} {list(low.profile)}"
                             + (" (or fp32 for a stage kept FP32)" if low.precision == "int8" else ""))
    return low


def _deploy(f: _Field, num_gates: int, num_exits: int) -> "Deploy":
    offsets = _floats(f.key("offsets"), -1.0, 1.0, max_len=MAX_STAGES)
    if len(offsets) != num_gates:
        raise f.key("offsets").fail(f"must have one offset per gate ({num_gates}), got {len(offsets)}")
    alphas = _floats(f.key("alphas", []), 1e-9, 1.0, max_len=64)
    qf = f.key("qhat", [])
    qhat = tuple(_floats(r, -1.0, 2.0, max_len=64) for r in qf.items(max_len=MAX_STAGES))
    if qhat and (len(qhat) != num_exits or any(len(r) != len(alphas) for r in qhat)):
        raise qf.fail(f"must have {num_exits} rows (one per exit) of {len(alphas)} values (one per alpha)")
    info = f.key("info", {}).free() or {}
    if not isinstance(info, dict):
        raise f.key("info").fail("must be an object")
    return Deploy(offsets=offsets, alphas=alphas, qhat=qhat, budget=f.key("budget", "").string(max_len=256), info=info)


def _stage(f: _Field, k: int, last: bool, version: int) -> Stage:
    index = f.key("index").integer(0, MAX_STAGES)
    if index != k:
        raise f.key("index").fail(f"must be {k} (stages are listed in order)")
    exit_ = f.key("exit", k).integer(0, MAX_STAGES)
    exits_f = f.key("exits", [exit_] if version == 1 else ...)
    exits = _ints(exits_f, 0, MAX_STAGES, max_len=MAX_STAGES)
    if not exits or list(exits) != list(range(exits[0], exits[0] + len(exits))) or exits[-1] != exit_:
        raise exits_f.fail(f"must be consecutive exit indices ending with the stage's exit {exit_}")
    gates_default = (list(exits[:-1]) if last else list(exits)) if version == 1 else ...
    gates_f = f.key("gates", gates_default)
    gates = _ints(gates_f, 0, MAX_STAGES, max_len=MAX_STAGES)
    if gates != (exits[:-1] if last else exits):
        raise gates_f.fail("must list the stage's exits" + (" except the final head" if last else ""))
    blocks = _ints(f.key("blocks"), 0, 1 << 20, max_len=2)
    if len(blocks) != 2 or blocks[0] >= blocks[1]:
        raise f.key("blocks").fail("must be a half-open block range [start, end) with start < end")
    inputs = tuple(_tensor(x) for x in f.key("inputs").items(max_len=1))
    want_in = "x" if k == 0 else "hidden_in"
    if len(inputs) != 1 or inputs[0].name != want_in:
        raise f.key("inputs").fail(f"must hold exactly one tensor named '{want_in}'")
    outputs = tuple(_tensor(x) for x in f.key("outputs").items(max_len=3))
    names = [o.name for o in outputs]
    for side, tensors in (("inputs", inputs), ("outputs", outputs)):
        for i, t in enumerate(tensors):
            if t.name in ("hidden_in", "hidden_out") and t.dtype in QUANTIZED and not t.quantized:
                raise f.key(side).items()[i].key("scale", None).fail(f"is required for a {t.dtype} hidden state "
                                                            "(with its zero_point)")
    want = (["probs", "gate"] if len(exits) > 1 else ["probs"]) if last else ["hidden_out", "probs", "gate"]
    if names != want:
        raise f.key("outputs").fail(f"must be tensors {want} in this order")
    engines = tuple(_engine(x) for x in f.key("engines", []).items(max_len=256))
    stage = Stage(index=index, file=f.key("file").relpath(), blocks=(blocks[0], blocks[1]), exits=exits,
                  gates=gates, macs=f.key("macs", 0).integer(0), input_guard=f.key("input_guard", False).boolean(),
                  inputs=inputs, outputs=outputs, engines=engines)
    if "gated" in f.obj() and f.key("gated").boolean() != stage.gated:
        raise f.key("gated").fail(f"contradicts the stage's outputs ({names})")
    return stage


def _check_stage_tensors(f: _Field, stage: Stage, num_classes: int) -> None:
    E = len(stage.exits)
    probs, gate = stage.output("probs"), stage.output("gate")
    out = f.key("outputs")
    want_p = (E, num_classes) if E > 1 else (num_classes,)
    if probs.shape != want_p or probs.dtype != "float32":
        raise out.fail(f"'probs' must be float32 of per-row shape {list(want_p)}")
    if gate is not None:
        want_g = (len(stage.gates),) if E > 1 else ()
        if gate.shape != want_g or gate.dtype != "float32":
            raise out.fail(f"'gate' must be float32 of per-row shape {list(want_g)}")


def _exits(f: _Field, num_stages_exits: int) -> Exits:
    G = num_stages_exits - 1
    positions = _ints(f.key("positions"), 0, 1 << 20)
    if len(positions) != G:
        raise f.key("positions").fail(f"must list {G} gated exit positions (the stages hold {G + 1} exits)")
    n = G + 1

    def per_exit(name, conv):
        x = f.key(name)
        vals = conv(x)
        if len(vals) != n:
            raise x.fail(f"must have one value per exit ({n})")
        return vals

    pos_w = _floats(f.key("pos_weights"), 0.0)
    if len(pos_w) not in (0, G):
        raise f.key("pos_weights").fail(f"must have one value per gate ({G})")
    alphas = _floats(f.key("alphas", []), 0.0, 1.0)
    qf = f.key("qhat", [])
    qhat = tuple(_floats(r, -1e9, 1e9, max_len=1024) for r in qf.items(max_len=n))
    if qhat and (len(qhat) != n or any(len(r) != len(alphas) for r in qhat)):
        raise qf.fail(f"must be {n} rows (exits) of {len(alphas)} values (alphas)")
    return Exits(positions=positions, pos_weights=pos_w, exit_macs=per_exit("exit_macs", lambda x: _ints(x, 0)),
                 cost=per_exit("cost", lambda x: _floats(x, 0.0, 1e6)),
                 cost_vs_plain=per_exit("cost_vs_plain", lambda x: _floats(x, 0.0, 1e6)),
                 alphas=alphas, qhat=qhat,
                 calibration_split_size=f.key("calibration_split_size", 0).integer(0))


def parse_manifest(raw: Any, where: str = "bundle") -> Manifest:
    """Validate raw manifest JSON and return the typed ``Manifest`` (BundleError otherwise).

    Args:
        raw: the decoded ``manifest.json``.
        where: what to call the bundle in errors (its path).
    """
    root = _Field(raw, "", where)
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise BundleError(f"{where}: {MANIFEST} is not a jei-edge bundle manifest (schema tag missing)",
                          hint="point at a NAME.jei directory written by `jei-edge build`")
    version_f = root.key("schema_version")
    if isinstance(version_f.value, int) and not isinstance(version_f.value, bool) and version_f.value > SCHEMA_VERSION:
        raise BundleError(f"{where} has schema version {version_f.value}; this jei-edge reads up to {SCHEMA_VERSION}",
                          hint="upgrade jei-edge on this device, or build with the jei-edge installed here")
    version = version_f.integer(1, SCHEMA_VERSION)
    if version not in READABLE_VERSIONS:
        raise version_f.fail(f"must be one of {list(READABLE_VERSIONS)}")

    num_classes = root.key("num_classes").integer(1, MAX_CLASSES)
    t = root.key("target")
    target = TargetInfo(
        name=t.key("name").string(allow_empty=False, max_len=256), backend=t.key("backend").string(allow_empty=False, max_len=64),
        device=t.key("device", "cpu").choice(("cpu", "cuda")), max_batch=t.key("max_batch", 256).integer(1, MAX_BATCH),
        description=t.key("description", "").string(), backend_options=t.key("backend_options", {}).free() or {},
        compute_capability=t.key("compute_capability", None).opt_string())
    if not isinstance(target.backend_options, dict):
        raise t.key("backend_options").fail("must be an object")

    stages_f = root.key("stages").items(max_len=MAX_STAGES)
    if not stages_f:
        raise root.key("stages").fail("must list at least one stage")
    stages = tuple(_stage(s, k, k == len(stages_f) - 1, version) for k, s in enumerate(stages_f))
    for s, sf in zip(stages, stages_f):
        _check_stage_tensors(sf, s, num_classes)
    flat = [e for s in stages for e in s.exits]
    if flat != list(range(len(flat))):
        raise root.key("stages").fail(f"must hold exits 0..{len(flat) - 1} once each, in order (they hold {flat})")
    for a, b, bf in zip(stages[:-1], stages[1:], stages_f[1:]):
        if a.hidden.shape != b.input.shape or a.hidden.dtype != b.input.dtype:
            raise bf.key("inputs").fail(f"must match stage {a.index}'s hidden_out {list(a.hidden.shape)} {a.hidden.dtype}")
        if (a.hidden.scale, a.hidden.zero_point) != (b.input.scale, b.input.zero_point):
            raise bf.key("inputs").items()[0].key("scale", None).fail(
                f"and zero_point must equal stage {a.index}'s hidden_out ({a.hidden.scale}, {a.hidden.zero_point})")
        if a.hidden.channels_last != b.input.channels_last:
            raise bf.key("inputs").items()[0].key("channels_last", False).fail(
                f"must equal stage {a.index}'s hidden_out ({str(a.hidden.channels_last).lower()})")
        if a.blocks[1] != b.blocks[0] and a.blocks[1] - 1 != b.blocks[0]:
            raise bf.key("blocks").fail(f"must continue stage {a.index}'s blocks {list(a.blocks)}")

    inp = _tensor(root.key("input"))
    if inp.shape != stages[0].input.shape or inp.name != "x":
        raise root.key("input").fail(f"must be 'x' of per-row shape {list(stages[0].input.shape)} (stage 0's input)")
    if inp.dtype != "float32":
        raise root.key("input").fail("must be float32")

    p = root.key("preprocessing")
    pre = Preprocessing(input_shape=_ints(p.key("input_shape"), 1, MAX_DIM, max_len=8),
                        mean=_floats(p.key("mean"), max_len=4096), std=_floats(p.key("std"), 1e-30, max_len=4096))
    if pre.input_shape != inp.shape:
        raise p.key("input_shape").fail(f"must equal the input's per-row shape {list(inp.shape)}")
    if len(pre.mean) != len(pre.std) or len(pre.mean) not in (1, inp.shape[0] if inp.shape else 1):
        raise p.key("mean").fail("must have one value (or one per input channel), like std")

    names_f = root.key("class_names", [str(i) for i in range(num_classes)])
    class_names = tuple(x.string(max_len=1024) for x in names_f.items(max_len=MAX_CLASSES))
    if len(class_names) != num_classes:
        raise names_f.fail(f"must have {num_classes} names (num_classes)")

    exits = _exits(root.key("exits"), len(flat))
    c = root.key("costs")
    costs = Costs(full_macs=c.key("full_macs").integer(0), plain_macs=c.key("plain_macs").integer(0),
                  stage_macs=_ints(c.key("stage_macs", [s.macs for s in stages])))

    plain = None
    pf = root.key("plain", None)
    if pf.value is not None:
        p_in = tuple(_tensor(x) for x in pf.key("inputs").items(max_len=1))
        p_out = tuple(_tensor(x) for x in pf.key("outputs").items(max_len=1))
        if [t_.name for t_ in p_in] != ["x"] or [t_.name for t_ in p_out] != ["probs"]:
            raise pf.fail("must map 'x' to 'probs'")
        plain = Graph(file=pf.key("file").relpath(), inputs=p_in, outputs=p_out,
                      macs=pf.key("macs", costs.plain_macs).integer(0))

    refs = None
    rf = root.key("references", None)
    if rf.value is not None:
        kinds_f = rf.key("kinds", {})
        kinds = {k: kinds_f.sub(k, v).integer(0) for k, v in kinds_f.obj().items()}
        refs = References(file=rf.key("file").relpath(), samples=rf.key("samples").integer(1, 1 << 24), kinds=kinds)

    files_f = root.key("files")
    files: Dict[str, Dict[str, Any]] = {}
    for rel, entry in files_f.obj().items():
        ef = files_f.sub(rel, entry)
        ef.obj()
        files[rel] = {"sha256": ef.key("sha256").string(allow_empty=False, max_len=64),
                      "size": ef.key("size", None).value if ef.key("size", None).value is None
                      else ef.key("size").integer(0)}

    def opt_path(name: str) -> Optional[str]:
        x = root.key(name, None)
        return None if x.value is None else x.relpath()

    quant = root.key("quantization", None).free()
    if quant is not None and not isinstance(quant, dict):
        raise root.key("quantization").fail("must be an object or null")
    plan = root.key("plan", {}).free() or {}
    toolchain = root.key("toolchain").free()
    backbone = root.key("backbone", {}).free() or {}
    for name, value in (("plan", plan), ("toolchain", toolchain), ("backbone", backbone)):
        if not isinstance(value, dict):
            raise root.key(name).fail("must be an object")
    precision = root.key("precision").choice(PRECISIONS)
    lf = root.key("lowering", None)
    lowering = None if lf.value is None else _lowering(lf, precision, target, stages)
    if lowering is None and any(s.engines for s in stages):
        raise root.key("lowering").fail("must describe how the stages' engines were built (the bundle has engines)")
    df = root.key("deploy", None)
    deploy = None if df.value is None else _deploy(df, exits.num_gates, exits.num_exits)
    return Manifest(
        name=root.key("name", "bundle").string(max_len=256), created=root.key("created", "").string(max_len=64),
        target=target, precision=precision, input=inp, num_classes=num_classes,
        class_names=class_names, preprocessing=pre, stages=stages, exits=exits, costs=costs, toolchain=toolchain,
        files=files, plain=plain, backbone=backbone, model_file=opt_path("model_file"), report=opt_path("report"),
        report_text=opt_path("report_text"), references=refs, plan=plan, quantization=quant, lowering=lowering,
        deploy=deploy, schema_version=version)


def decode_manifest(data: bytes, where: str = "bundle") -> Manifest:
    """``parse_manifest`` of the bytes of a ``manifest.json`` (size, encoding and JSON checked)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: {MANIFEST} is {len(data):,} bytes, more than any real manifest "
                          f"({MAX_MANIFEST_BYTES:,})", hint=REBUILD)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({shorten(exc)})", hint=REBUILD) from None
    except RecursionError:
        raise BundleError(f"{where}: {MANIFEST} is nested too deeply to be a manifest", hint=REBUILD) from None
    return parse_manifest(raw, where)
