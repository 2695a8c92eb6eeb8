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
    }
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from jei_edge import __version__
from jei_edge._io import atomic_write_bytes  # noqa: F401  (re-exported)
from jei_edge.errors import CheckpointError, JeiEdgeError

FORMAT = "jei-edge/model"
FORMAT_VERSION = 1
REQUIRED = ("config", "state_dict", "exits", "costs", "calibration", "class_names", "preprocessing")


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
                    training: Optional[Dict] = None) -> Dict[str, Any]:
    """Assemble the checkpoint dict for ``model`` (a JEIModel); costs are counted here."""
    from jei_edge.model.costs import count_costs

    n_exits = model.num_exits
    return {
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


def save_checkpoint(path, model=None, *, checkpoint: Optional[Dict] = None, **kwargs) -> Path:
    """Save atomically (no half-written file if interrupted). Pass ``model`` + metadata or a ready dict."""
    ckpt = checkpoint if checkpoint is not None else make_checkpoint(model, **kwargs)
    atomic_write_bytes(Path(path), lambda f: torch.save(ckpt, f))
    return Path(path)


def _load_reason(exc: Exception) -> str:
    """The useful line of torch.load's error (never its advice to disable weights_only)."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return "refused by the weights-only unpickler: " + " ".join(detail.split())[:200]
    first = text.splitlines()[0] if text else type(exc).__name__
    if "weights_only" in first or "Weights only load failed" in first:
        return "refused by the weights-only unpickler"
    return first[:300]


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
            hint="it is truncated, of another format, or contains pickled code (never executed)",
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a jei-edge model checkpoint (format tag missing)",
                              hint="produce one with `jei-edge train`")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint '{path}' has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format version {version}, newer than this jei-edge supports ({FORMAT_VERSION})",
            hint="upgrade jei-edge",
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {missing}")
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint '{path}': state_dict is not a dict of tensors")
    cfg = ckpt["config"]
    if not isinstance(cfg, dict) or not isinstance(cfg.get("backbone"), str):
        raise CheckpointError(f"checkpoint '{path}': config must name a backbone")
    return ckpt


def model_from_checkpoint(ckpt: Dict[str, Any], source: str = "checkpoint"):
    """Rebuild the JEIModel of a validated checkpoint dict and load its weights (eval mode)."""
    from jei_edge.model.jei import build_model

    try:
        model = build_model(ckpt["config"])
    except JeiEdgeError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{source}: cannot rebuild backbone '{ckpt['config'].get('backbone')}': {exc}") from exc
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not match the architecture in its config: "
                              f"{str(exc).splitlines()[0][:300]}") from exc
    return model.eval()


def load_checkpoint(path) -> Tuple[Any, Dict[str, Any]]:
    """``(model, checkpoint_dict)`` from ``model.pt``."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, source=f"checkpoint '{path}'"), ckpt
