"""Hardware targets: TOML data files in ``jei_edge/targets/`` (torch-free loader).

A target names the backend that builds and runs a bundle, the precisions it supports, its batch
profile and backend settings. ``load_target("cpu")`` reads ``jei_edge/targets/cpu.toml``;
``load_target("path/to/board.toml")`` reads any file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

from jei_edge.errors import JeiEdgeError

try:  # Python >= 3.11
    import tomllib as _toml  # novermin (tomli below on 3.10)
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as _toml  # type: ignore[no-redef]

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"


@dataclass(frozen=True)
class Target:
    name: str
    backend: str
    device: str = "cpu"
    description: str = ""
    precisions: Tuple[str, ...] = ("fp32",)
    default_precision: str = "fp32"
    opset: int = 17
    max_batch: int = 256
    backend_options: Dict[str, Any] = field(default_factory=dict)
    source: str = ""
    raw: Dict[str, Any] = field(default_factory=dict)

    def to_manifest(self) -> Dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "device": self.device,
                "description": self.description, "max_batch": self.max_batch,
                "backend_options": dict(self.backend_options)}


def available_targets() -> List[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str) -> Target:
    """A target by name (``jei_edge/targets/NAME.toml``) or from a ``.toml`` file path."""
    p = Path(name_or_path)
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = p
    else:
        path = TARGETS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise JeiEdgeError(f"unknown target '{name_or_path}'",
                           hint=f"use one of {available_targets()} or a path to a target .toml file")
    try:
        with open(path, "rb") as f:
            raw = _toml.load(f)
    except (OSError, _toml.TOMLDecodeError) as exc:
        raise JeiEdgeError(f"target file '{path}' cannot be read: {exc}") from exc
    try:
        backend = raw["backend"]
        precisions = tuple(raw.get("precisions", ["fp32"]))
        return Target(
            name=str(raw.get("name", path.stem)), backend=str(backend), device=str(raw.get("device", "cpu")),
            description=str(raw.get("description", "")), precisions=precisions,
            default_precision=str(raw.get("default_precision", precisions[0])),
            opset=int(raw.get("onnx", {}).get("opset", 17)), max_batch=int(raw.get("batch", {}).get("max", 256)),
            backend_options=dict(raw.get(backend, {})), source=str(path), raw=raw)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise JeiEdgeError(f"target file '{path}' is malformed ({type(exc).__name__}: {exc})",
                           hint="it needs at least `backend = \"onnxruntime\"`; see jei_edge/targets/cpu.toml") from exc
