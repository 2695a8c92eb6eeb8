"""Hardware targets: TOML data files in ``targets/`` (torch-free loader).

A target names the backend that builds and runs a bundle, the precisions it supports, its batch
profile and backend settings (the table named after the backend, parsed by that backend's
settings class when a runtime loads). ``load_target("cpu")`` reads the shipped ``targets/cpu.toml``;
``load_target("path/to/board.toml")`` reads any file. Unknown keys are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

from jei_edge._data import data_dir
from jei_edge.errors import JeiEdgeError

try:  # Python >= 3.11
    import tomllib as _toml  # novermin (tomli below on 3.10)
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as _toml  # type: ignore[no-redef]

_KEYS = {"name", "description", "backend", "device", "precisions", "default_precision", "onnx", "batch"}


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

    def to_manifest(self):
        """The bundle manifest's copy of this target."""
        from jei_edge.bundle.manifest import TargetInfo

        return TargetInfo(name=self.name, backend=self.backend, device=self.device, description=self.description,
                          max_batch=self.max_batch, backend_options=dict(self.backend_options))


def available_targets() -> List[str]:
    return sorted(p.stem for p in data_dir("targets").glob("*.toml"))


def load_target(name_or_path: str) -> Target:
    """A target by name (``targets/NAME.toml``) or from a ``.toml`` file path."""
    p = Path(name_or_path)
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = p
    else:
        path = data_dir("targets") / f"{name_or_path}.toml"
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
        unknown = sorted(set(raw) - _KEYS - {backend})
        if unknown:
            raise JeiEdgeError(f"target file '{path}' has unknown key(s) {unknown}",
                               hint=f"known keys: {sorted(_KEYS)} and a [{backend}] table of backend settings")
        precisions = tuple(raw.get("precisions", ["fp32"]))
        return Target(
            name=str(raw.get("name", path.stem)), backend=str(backend), device=str(raw.get("device", "cpu")),
            description=str(raw.get("description", "")), precisions=precisions,
            default_precision=str(raw.get("default_precision", precisions[0])),
            opset=int(raw.get("onnx", {}).get("opset", 17)), max_batch=int(raw.get("batch", {}).get("max", 256)),
            backend_options=dict(raw.get(backend, {})), source=str(path))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise JeiEdgeError(f"target file '{path}' is malformed ({type(exc).__name__}: {exc})",
                           hint="it needs at least `backend = \"onnxruntime\"`; see targets/cpu.toml") from exc
