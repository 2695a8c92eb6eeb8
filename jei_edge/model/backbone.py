"""The backbone contract and the backbone registry (built-ins + plugins).

A backbone factory is a function ``factory(**kwargs) -> BackboneSpec``. The spec splits a network
into the parts early exits need:

- ``stem``: ``input -> hidden`` (patch embedding + CLS token, or the conv stem);
- ``blocks``: a list of modules, each taking and returning ONE tensor (the hidden state);
- ``head``: ``hidden after the last block -> logits`` (the final exit, no gate);
- ``make_im(i)``: builds the IM (inference module) placed after block ``i``: ``hidden -> logits``.
  An IM may use frozen backbone modules (e.g. the ViT's shared final LayerNorm) without owning
  them: hold them in a plain attribute, not as a registered submodule.
- ``input_shape`` ``(C, H, W)`` and ``num_classes``.

Register a factory with ``@register_backbone("name")``, with a package entry point in the group
``jei_edge.backbones``, or name it as ``"module:function"``. A checkpoint stores that name; as a
``module:function`` plugin imports code, it is only loaded when trusted: registered in this
process, installed as an entry point, passed as ``--plugin module:function`` or listed in the
``JEI_EDGE_PLUGINS`` environment variable (comma separated).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

from torch import nn

from jei_edge.errors import CheckpointError, JeiEdgeError

ENTRY_POINT_GROUP = "jei_edge.backbones"
PLUGIN_ENV = "JEI_EDGE_PLUGINS"


@dataclass
class BackboneSpec:
    """A backbone split for early exits (see the module docstring for the contract)."""

    stem: nn.Module
    blocks: List[nn.Module]
    head: nn.Module
    make_im: Callable[[int], nn.Module]
    input_shape: Tuple[int, int, int]
    num_classes: int
    family: str = "custom"
    extra: Dict = field(default_factory=dict)

    def validate(self, name: str) -> "BackboneSpec":
        problems = []
        if not isinstance(self.stem, nn.Module):
            problems.append("stem is not an nn.Module")
        if not isinstance(self.head, nn.Module):
            problems.append("head is not an nn.Module")
        if not self.blocks or not all(isinstance(b, nn.Module) for b in self.blocks):
            problems.append("blocks must be a non-empty list of nn.Module")
        if not callable(self.make_im):
            problems.append("make_im is not callable")
        if len(tuple(self.input_shape)) != 3:
            problems.append(f"input_shape must be (C, H, W), got {self.input_shape}")
        if int(self.num_classes) < 2:
            problems.append(f"num_classes must be >= 2 (the gate needs a top-2), got {self.num_classes}")
        if problems:
            raise JeiEdgeError(f"backbone '{name}' does not follow the contract: " + "; ".join(problems),
                               hint="see jei_edge.model.backbone for the BackboneSpec contract")
        self.input_shape = tuple(int(v) for v in self.input_shape)
        self.num_classes = int(self.num_classes)
        return self


_REGISTRY: Dict[str, Callable[..., BackboneSpec]] = {}
_TRUSTED_PLUGINS: set = set()


def register_backbone(name: str):
    """Decorator: register ``factory(**kwargs) -> BackboneSpec`` under ``name``."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def trust_plugin(spec: str) -> None:
    """Allow a ``module:function`` backbone plugin to be imported (e.g. from ``--plugin``)."""
    _TRUSTED_PLUGINS.add(spec.strip())


def _env_plugins() -> set:
    return {s.strip() for s in os.environ.get(PLUGIN_ENV, "").split(",") if s.strip()}


def _entry_points() -> Dict[str, object]:
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # pragma: no cover - Python < 3.10 API
        eps = entry_points().get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep for ep in eps}


def _ensure_builtins() -> None:
    # importing registers them
    from jei_edge.model import resnet, vit  # noqa: F401


def available_backbones() -> List[str]:
    """Names that resolve without further trust: built-ins, registered and entry points."""
    _ensure_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _load_plugin(spec: str) -> Callable[..., BackboneSpec]:
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise CheckpointError(f"backbone plugin '{spec}' is not of the form module:function")
    if spec not in _TRUSTED_PLUGINS and spec not in _env_plugins():
        raise CheckpointError(
            f"backbone plugin '{spec}' would import code and is not trusted",
            hint=f"if you trust it, pass --plugin {spec} or set {PLUGIN_ENV}={spec}",
        )
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise CheckpointError(f"backbone plugin '{spec}': cannot import module '{mod_name}' ({exc})",
                              hint="install the package that provides it or fix PYTHONPATH") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise CheckpointError(f"backbone plugin '{spec}': module '{mod_name}' has no function '{fn_name}'")
    return fn


def get_backbone(name: str) -> Callable[..., BackboneSpec]:
    """Resolve a backbone factory by registry name, entry point or trusted ``module:function``."""
    _ensure_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name in eps:
        return eps[name].load()
    if ":" in name:
        return _load_plugin(name)
    raise CheckpointError(
        f"unknown backbone '{name}'",
        hint=f"known: {', '.join(available_backbones())}; a plugin is named as module:function",
    )


def build_backbone(name: str, kwargs: Dict) -> BackboneSpec:
    factory = get_backbone(name)
    try:
        spec = factory(**dict(kwargs))
    except TypeError as exc:
        raise JeiEdgeError(f"backbone '{name}' rejected its options {sorted(kwargs)}: {exc}") from exc
    if not isinstance(spec, BackboneSpec):
        raise JeiEdgeError(f"backbone factory '{name}' returned {type(spec).__name__}, not a BackboneSpec")
    return spec.validate(name)


def default_exits(num_blocks: int) -> List[int]:
    """JEI-DNN default: an exit after every block but the last."""
    return list(range(num_blocks - 1))


def normalize_exits(exits: Sequence[int] | None, num_blocks: int) -> List[int]:
    if exits is None:
        return default_exits(num_blocks)
    out = sorted({int(e) for e in exits})
    bad = [e for e in out if e < 0 or e >= num_blocks - 1]
    if bad:
        raise JeiEdgeError(f"exit positions {bad} are out of range",
                           hint=f"exits are block indices 0..{num_blocks - 2} (the last block has the final head)")
    return out
