"""The ``model.pt`` checkpoint: a versioned dict of plain data + tensors.

It always loads with ``torch.load(weights_only=True)``: nothing in it is ever executed. Layout::

    {
      "format": "jei-edge/model", "format_version": 1, "jei_edge_version": "...",
      "config": {"backbone": NAME, "backbone_kwargs": {...}, "exits": [block indices]},
      "state_dict": {name: tensor},
      "exits": {"positions": [...], "pos_weights": [per gate]},
      "costs": CostTable.to_dict(),
      "calibration": {"alphas": [...], "qhat": [[per alpha] per exit], "split_size": n},
      "class_names": [...],
      "preprocessing": {"input_shape": [C, H, W], "mean": [per channel], "std": [per channel]},
      "training": {free-form record of how it was trained: lambda, seed, metrics},
      "warmup_ims": {"ims.<name>": tensor}   (optional: the IM weights as they were after the
                                              warm-up phase, for the thresholding baselines)
    }

Checkpoints without ``warmup_ims`` (written before it existed, or by ``make_checkpoint`` without
it) load as before; ``warmup_model`` says when it is absent.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from jei_edge import __version__
from jei_edge._io import atomic_write_bytes  # noqa: F401  (re-exported)
from jei_edge._io import shorten
from jei_edge.errors import CheckpointError, JeiEdgeError

FORMAT = "jei-edge/model"
FORMAT_VERSION = 1
REQUIRED = ("config", "state_dict", "exits", "costs", "calibration", "class_names", "preprocessing")
WARMUP_PREFIX = "ims."  # warmup_ims holds the state_dict entries of model.ims, under their full names


def _plain(obj):
    """Tuples -> lists, numpy scalars -> Python, recursively (what weights_only loads back)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, torch.Tensor):
        return obj.item()
    return obj


def default_preprocessing(model) -> Dict:
    c = model.input_shape[0]
    return {"input_shape": list(model.input_shape), "mean": [0.0] * c, "std": [1.0] * c}


def make_checkpoint(model, *, pos_weights: Optional[Sequence[float]] = None, calibration: Optional[Dict] = None,
                    class_names: Optional[Sequence[str]] = None, preprocessing: Optional[Dict] = None,
                    training: Optional[Dict] = None,
                    warmup_ims: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, Any]:
    """Assemble the checkpoint dict for ``model`` (a JEIModel); costs are counted here.

    ``warmup_ims``: the ``ims.*`` state_dict entries saved after the IM warm-up (optional)."""
    from jei_edge.model.costs import count_costs

    n_exits = model.num_exits
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jei_edge_version": __version__,
        "config": _plain(model.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "exits": {"positions": list(model.exits),
                  "pos_weights": _plain(list(pos_weights) if pos_weights is not None else [1.0] * model.num_gates)},
        "costs": count_costs(model).to_dict(),
        "calibration": _plain(calibration or {"alphas": [], "qhat": [[] for _ in range(n_exits)], "split_size": 0}),
        "class_names": [str(c) for c in (class_names or range(model.num_classes))],
        "preprocessing": _plain(preprocessing or default_preprocessing(model)),
        "training": _plain(training or {}),
    }
    if warmup_ims is not None:
        ckpt["warmup_ims"] = {str(k): v.detach().cpu().clone() for k, v in warmup_ims.items()}
    return ckpt


def save_checkpoint(path, model=None, *, checkpoint: Optional[Dict] = None, **kwargs) -> Path:
    """Save atomically (no half-written file if interrupted). Pass ``model`` + metadata or a ready dict."""
    ckpt = checkpoint if checkpoint is not None else make_checkpoint(model, **kwargs)
    atomic_write_bytes(Path(path), lambda f: torch.save(ckpt, f))
    return Path(path)


_ADVICE = ("weights_only", "safe_globals", "add_safe_globals", "allowlist", "allow_pickle", "trust", "pickle_module",
           "file an issue", "check the documentation", "do it only if", "do those steps only")


def _load_reason(exc: Exception) -> str:
    """The useful part of torch.load's refusal, in our words: never its advice to load unsafely
    (weights_only=False) or to allowlist the class found in the file."""
    text = str(exc).strip()
    found = re.search(r"GLOBAL\s+([A-Za-z_][\w.]*)", text)
    if found:
        return (f"it holds a Python object reference ('{shorten(found.group(1), 80)}'), not plain data and tensors; "
                "it was refused and nothing in it was imported or run")
    operand = re.search(r"Unsupported operand\s+(\d+)", text)
    if operand:
        return f"it uses a pickle instruction (opcode {operand.group(1)}) that a weights-only load refuses"
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        return "it holds something other than plain data and tensors (refused, nothing was run)"
    # any other failure (truncated or foreign file): its first sentences, without advice
    sentences = re.split(r"(?<=[.!?])\s+|\n+", text or type(exc).__name__)
    kept = [t for t in sentences if t.strip() and not any(a in t.lower() for a in _ADVICE)]
    return shorten(" ".join(kept[:2]) if kept else type(exc).__name__, 200)


def read_checkpoint(path) -> Dict[str, Any]:
    """Load and validate the checkpoint dict. Never unpickles code; every failure is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty", hint="re-run `jei-edge train`")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all mean "not loadable"
        raise CheckpointError(
            f"checkpoint '{path}' cannot be loaded safely: {_load_reason(exc)}",
            hint="a jei-edge checkpoint holds only plain data and tensors: this file is truncated, of another "
                 "format, or contains pickled objects (never executed); re-create it with `jei-edge train`",
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a jei-edge model checkpoint (format tag missing)",
                              hint="produce one with `jei-edge train`")
    version = ckpt.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint '{path}' has an invalid format_version {shorten(repr(version), 60)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format version {version}, newer than this jei-edge supports ({FORMAT_VERSION})",
            hint="upgrade jei-edge",
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {missing}", hint=_REMAKE)
    check_fields(ckpt, f"checkpoint '{path}'")
    return ckpt


# -- field validation: the one place that says what a well-formed checkpoint dict is ------------------
_REMAKE = "the file is damaged or was not written by `jei-edge train`; re-create it with `jei-edge train`"
MAX_EXITS = 4096  # jei_edge.bundle.manifest.MAX_STAGES
MAX_CLASSES = 1 << 20  # jei_edge.bundle.manifest.MAX_CLASSES
MAX_SIDE = 1 << 16  # input C, H, W


class _Fields:
    """Typed access to the checkpoint dict; every problem is one CheckpointError naming the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, name: str, problem: str, value: Any = ..., hint: str = _REMAKE) -> CheckpointError:
        got = "" if value is ... else f", got {shorten(repr(value), 80)}"
        return CheckpointError(f"{self.where}: field '{name}' {problem}{got}", hint=hint)

    def table(self, value: Any, name: str, keys: Sequence[str] = (), optional: Sequence[str] = ()) -> Dict:
        if not isinstance(value, dict):
            raise self.fail(name, "must be a dict", value)
        for key in keys:
            if key not in value and key not in optional:
                raise self.fail(f"{name}.{key}", "is missing")
        return value

    def integer(self, value: Any, name: str, lo: int = 0, hi: int = 1 << 62) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, "must be an integer", value)
        if not lo <= value <= hi:
            raise self.fail(name, f"must be in {lo}..{hi}", value)
        return value

    def number(self, value: Any, name: str, lo: float = -math.inf, hi: float = math.inf,
               lo_open: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(name, "must be a finite number", value)
        if value < lo or value > hi or (lo_open and value == lo):
            if math.isinf(hi):
                raise self.fail(name, f"must be {'>' if lo_open else '>='} {lo:g}", value)
            raise self.fail(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]", value)
        return float(value)

    def items(self, value: Any, name: str, length: Optional[int] = None, max_len: int = 1 << 20) -> list:
        if not isinstance(value, list):
            raise self.fail(name, "must be a list", value)
        if length is not None and len(value) != length:
            raise self.fail(name, f"must have {length} entries, not {len(value)}", value)
        if len(value) > max_len:
            raise self.fail(name, f"has {len(value)} entries, more than {max_len}")
        return value

    def integers(self, value: Any, name: str, length: Optional[int] = None, lo: int = 0, hi: int = 1 << 62) -> list:
        return [self.integer(v, f"{name}[{i}]", lo, hi) for i, v in enumerate(self.items(value, name, length))]

    def numbers(self, value: Any, name: str, length: Optional[int] = None, **range_) -> list:
        return [self.number(v, f"{name}[{i}]", **range_) for i, v in enumerate(self.items(value, name, length))]


def check_fields(ckpt: Dict[str, Any], where: str = "checkpoint") -> None:
    """Check the types, lengths and ranges of every field a checkpoint dict is read for (module
    docstring); a ``CheckpointError`` names the first field that is wrong (``where`` names the file).
    What needs the rebuilt model (exit positions, input shape, classes, tensor shapes) is checked
    by ``model_from_checkpoint``."""
    f = _Fields(where)
    cfg = f.table(ckpt.get("config"), "config", ("backbone",))
    if not isinstance(cfg["backbone"], str) or not cfg["backbone"].strip():
        raise f.fail("config.backbone", "must name a backbone (a non-empty string)", cfg["backbone"])
    kwargs = cfg.get("backbone_kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise f.fail("config.backbone_kwargs", "must be a dict of backbone options", kwargs)
    if cfg.get("exits") is not None:
        f.integers(cfg["exits"], "config.exits", lo=0, hi=MAX_EXITS)

    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict) or not sd:
        raise f.fail("state_dict", "must be a non-empty dict of tensors", type(sd).__name__ if sd else sd)
    for k, v in sd.items():
        if not isinstance(k, str):
            raise f.fail("state_dict", "must have tensor names (strings) as keys", k)
        if not isinstance(v, torch.Tensor):
            raise f.fail(f"state_dict['{shorten(k, 80)}']", "must be a tensor", type(v).__name__)
        if v.layout != torch.strided or v.is_quantized or v.is_complex():
            raise f.fail(f"state_dict['{shorten(k, 80)}']", "must be a dense real tensor", f"{v.dtype}, {v.layout}")

    exits = f.table(ckpt.get("exits"), "exits", ("positions", "pos_weights"))
    positions = f.integers(exits["positions"], "exits.positions", hi=MAX_EXITS)
    if len(positions) >= MAX_EXITS:
        raise f.fail("exits.positions", f"lists {len(positions)} exits, more than {MAX_EXITS - 1}")
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise f.fail("exits.positions", "must be strictly increasing block indices", positions)
    G = len(positions)
    f.numbers(exits["pos_weights"], "exits.pos_weights", G, lo=0.0, hi=1e6)

    costs = f.table(ckpt.get("costs"), "costs", ("stem_macs", "block_macs", "im_macs", "gate_macs", "head_macs",
                                                  "exit_macs", "full_macs", "plain_macs", "cost", "cost_vs_plain"))
    for key in ("stem_macs", "head_macs"):
        f.integer(costs[key], f"costs.{key}")
    for key in ("full_macs", "plain_macs"):
        f.integer(costs[key], f"costs.{key}", lo=1)
    f.integers(costs["block_macs"], "costs.block_macs")
    f.integers(costs["im_macs"], "costs.im_macs", G)
    f.integers(costs["gate_macs"], "costs.gate_macs", G)
    f.integers(costs["exit_macs"], "costs.exit_macs", G + 1)
    f.numbers(costs["cost"], "costs.cost", G + 1, lo=0.0, hi=1.0 + 1e-6, lo_open=True)
    f.numbers(costs["cost_vs_plain"], "costs.cost_vs_plain", G + 1, lo=0.0, hi=1e6, lo_open=True)

    calib = f.table(ckpt.get("calibration"), "calibration")
    alphas = f.numbers(calib.get("alphas", []), "calibration.alphas", lo=0.0, hi=1.0, lo_open=True)
    qhat = f.items(calib.get("qhat", []), "calibration.qhat")
    if qhat or alphas:
        f.items(qhat, "calibration.qhat", G + 1)
        for i, row in enumerate(qhat):
            f.numbers(row, f"calibration.qhat[{i}]", len(alphas), lo=-1.0, hi=2.0)
    f.integer(calib.get("split_size", 0), "calibration.split_size")

    names = f.items(ckpt.get("class_names"), "class_names", max_len=MAX_CLASSES)
    if not names:
        raise f.fail("class_names", "must list at least one class")
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise f.fail(f"class_names[{i}]", "must be a string", n)

    pre = f.table(ckpt.get("preprocessing"), "preprocessing", ("input_shape", "mean", "std"))
    shape = f.integers(pre["input_shape"], "preprocessing.input_shape", 3, lo=1, hi=MAX_SIDE)
    f.numbers(pre["mean"], "preprocessing.mean", shape[0])
    f.numbers(pre["std"], "preprocessing.std", shape[0], lo=0.0, lo_open=True)

    warm = ckpt.get("warmup_ims")
    if warm is not None:
        if not isinstance(warm, dict):
            raise f.fail("warmup_ims", "must be a dict of tensors", type(warm).__name__)
        for k, v in warm.items():
            if not isinstance(k, str) or not k.startswith(WARMUP_PREFIX):
                raise f.fail("warmup_ims", f"must have IM tensor names ('{WARMUP_PREFIX}...') as keys", k)
            if not isinstance(v, torch.Tensor):
                raise f.fail(f"warmup_ims['{shorten(k, 80)}']", "must be a tensor", type(v).__name__)
            if v.layout != torch.strided or v.is_quantized or v.is_complex():
                raise f.fail(f"warmup_ims['{shorten(k, 80)}']", "must be a dense real tensor", f"{v.dtype}, {v.layout}")

    training = ckpt.get("training", {})
    if training is not None:
        f.table(training, "training")
        data = training.get("data")
        if data is not None:
            f.table(data, "training.data")
            if data.get("source") is not None and not isinstance(data["source"], str):
                raise f.fail("training.data.source", "must be a data source (a string)", data["source"])
            if data.get("split_seed") is not None:
                f.integer(data["split_seed"], "training.data.split_seed", hi=2**63 - 1)


def _tensor_problem(name: str, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    if tuple(got.shape) != tuple(want.shape):
        return f"tensor '{name}' has shape {list(got.shape)}, the architecture in its config needs {list(want.shape)}"
    if want.is_floating_point() and not got.is_floating_point():
        return f"tensor '{name}' is {str(got.dtype).replace('torch.', '')}, the architecture needs floating point"
    return None


def _check_weights(ckpt: Dict[str, Any], model, source: str) -> None:
    """Every tensor of the architecture present with its shape, no extra ones, finite parameters:
    a CheckpointError names the first tensor that is wrong (and how many more are)."""
    sd, own = ckpt["state_dict"], model.state_dict()
    problems = [f"tensor '{k}' is missing" for k in own if k not in sd]
    problems += [f"tensor '{k}' is not part of the architecture in its config" for k in sd if k not in own]
    problems += [p for k, t in sd.items() if k in own for p in [_tensor_problem(k, t, own[k])] if p]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"{source}: weights do not match the architecture in its config: "
                              f"{shorten(problems[0], 200)}{more}", hint=_REMAKE)
    for k, _ in model.named_parameters():
        t = sd[k]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: tensor '{k}' holds NaN or infinite values", hint=_REMAKE)
    warm = ckpt.get("warmup_ims")
    if warm is not None:
        ims = {k: v for k, v in own.items() if k.startswith(WARMUP_PREFIX)}
        problems = [f"tensor '{k}' is missing" for k in ims if k not in warm]
        problems += [f"tensor '{k}' is not an IM tensor of the architecture" for k in warm if k not in ims]
        problems += [p for k, t in warm.items() if k in ims for p in [_tensor_problem(k, t, ims[k])] if p]
        problems += [f"tensor '{k}' holds NaN or infinite values" for k, t in warm.items()
                     if k in ims and t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CheckpointError(f"{source}: field 'warmup_ims' does not match the IMs of its architecture: "
                                  f"{shorten(problems[0], 200)}{more}", hint=_REMAKE)


def _check_against_model(ckpt: Dict[str, Any], model, source: str) -> None:
    """The fields that must agree with the architecture rebuilt from ``config``."""
    f = _Fields(source)
    positions = list(ckpt["exits"]["positions"])
    if positions != list(model.exits):
        raise f.fail("exits.positions", f"must match the exits {list(model.exits)} of its config", positions)
    shape = list(ckpt["preprocessing"]["input_shape"])
    if shape != list(model.input_shape):
        raise f.fail("preprocessing.input_shape", f"must match the input shape {list(model.input_shape)} of its "
                     "backbone", shape)
    n = len(ckpt["class_names"])
    if n != model.num_classes:
        raise f.fail("class_names", f"must name the {model.num_classes} classes of its backbone, not {n}")
    blocks = ckpt["costs"]["block_macs"]
    if len(blocks) != len(model.blocks):
        raise f.fail("costs.block_macs", f"must have one entry per block ({len(model.blocks)}), not {len(blocks)}")


def _named(exc: JeiEdgeError, source: str) -> CheckpointError:
    """A backbone / exits error from rebuilding the model, as a CheckpointError naming the file."""
    message = exc.message if source in exc.message else f"{source}: {exc.message}"
    return CheckpointError(message, hint=exc.hint or _REMAKE)


def _build(config: Dict[str, Any], source: str):
    from jei_edge.model.jei import build_model

    try:
        return build_model(config)
    except JeiEdgeError as exc:
        raise _named(exc, source) from None
    except Exception as exc:
        raise CheckpointError(f"{source}: cannot rebuild backbone '{config.get('backbone')}': "
                              f"{shorten(str(exc) or type(exc).__name__, 200)}", hint=_REMAKE) from None


def model_from_checkpoint(ckpt: Dict[str, Any], source: str = "checkpoint"):
    """Rebuild the JEIModel of a checkpoint dict and load its weights (eval mode).

    The dict's fields are checked first (``check_fields``); the architecture is first built on
    the meta device (no memory) to check every tensor's name and shape, so a config asking for a
    huge model is refused by its weights before anything is allocated."""
    from jei_edge.model.backbone import get_backbone
    from jei_edge.model.jei import build_model

    check_fields(ckpt, source)
    try:
        get_backbone(ckpt["config"]["backbone"])  # imports a plugin's module outside the meta context below
    except JeiEdgeError as exc:
        raise _named(exc, source) from None
    try:
        with torch.device("meta"):
            skeleton = build_model(ckpt["config"])
    except JeiEdgeError as exc:
        raise _named(exc, source) from None
    except Exception:  # invalid options (the real build below says so) or a plugin the meta device cannot build
        skeleton = None
    if skeleton is not None:
        _check_against_model(ckpt, skeleton, source)
        _check_weights(ckpt, skeleton, source)
    model = _build(ckpt["config"], source)
    if skeleton is None:
        _check_against_model(ckpt, model, source)
        _check_weights(ckpt, model, source)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise CheckpointError(f"{source}: weights do not match the architecture in its config: "
                              f"{shorten(detail, 200)}", hint=_REMAKE) from None
    return model.eval()


def warmup_model(ckpt: Dict[str, Any], model, source: str = "checkpoint"):
    """A copy of ``model`` (rebuilt from ``ckpt``, already checked) with the IM weights it had after
    the warm-up phase; ``None`` when the checkpoint does not carry them (older checkpoints)."""
    import copy

    warm = ckpt.get("warmup_ims")
    if warm is None:
        return None
    twin = copy.deepcopy(model)
    try:
        twin.load_state_dict({**twin.state_dict(), **warm}, strict=True)
    except RuntimeError as exc:
        detail = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise CheckpointError(f"{source}: field 'warmup_ims' does not match the IMs of its architecture: "
                              f"{shorten(detail, 200)}", hint=_REMAKE) from None
    return twin.eval()


def load_checkpoint(path) -> Tuple[Any, Dict[str, Any]]:
    """``(model, checkpoint_dict)`` from ``model.pt``."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, source=f"checkpoint '{path}'"), ckpt
