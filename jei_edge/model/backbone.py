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
        module = _import_plugin_module(mod_name)
    except ImportError as exc:
        raise CheckpointError(f"backbone plugin '{spec}': cannot import module '{mod_name}' ({exc})",
                              hint="install the package that provides it, or run from the folder that holds "
                                   f"{mod_name.split('.')[0]}.py") from exc
    except Exception as exc:  # the (trusted) module itself failed while importing
        raise JeiEdgeError(f"backbone plugin '{spec}': importing module '{mod_name}' raised "
                           f"{type(exc).__name__}: {exc}", hint="fix the plugin module") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise CheckpointError(f"backbone plugin '{spec}': module '{mod_name}' has no function '{fn_name}'")
    return fn


def _import_plugin_module(mod_name: str):
    """Import a trusted plugin's module; a module in the current folder is found without PYTHONPATH."""
    import sys

    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != mod_name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)  # after everything installed: a local file never shadows a package
        return importlib.import_module(mod_name)


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
    except (ValueError, JeiEdgeError):
        raise  # the caller names the options (e.g. an img_size the patch size does not divide)
    except Exception as exc:  # a plugin factory failing in any other way: one clear line, not a traceback
        raise JeiEdgeError(f"backbone factory '{name}' raised {type(exc).__name__}: {exc}",
                           hint="fix the factory; it receives num_classes, in_chans, img_size and your "
                                "--backbone-opt values (docs/plugins.md)") from exc
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


def check_contract(spec: BackboneSpec, name: str, batch: int = 2) -> None:
    """Run ``spec`` on a dummy input of its ``input_shape`` before any training: the stem, every
    block (one tensor in, one tensor out, batch first), the head and every IM (``[batch,
    num_classes]`` logits). The first part that fails or returns the wrong thing is one clear error
    naming it and the shape it returned (docs/plugins.md has the contract)."""
    import torch

    def fail(part: str, what: str):
        raise JeiEdgeError(f"backbone '{name}': {part} {what}", hint="see the backbone contract in docs/plugins.md")

    def call(part: str, module, h):
        try:
            out = module(h)
        except Exception as exc:  # the plugin's own code
            fail(part, f"failed on a {list(h.shape)} input: {type(exc).__name__}: {exc}")
        if not isinstance(out, torch.Tensor):
            fail(part, f"returned {type(out).__name__}, not one tensor")
        if out.dim() < 2 or out.shape[0] != batch:
            fail(part, f"returned shape {list(out.shape)}; it must keep the batch dimension first ({batch})")
        return out

    was = [m.training for m in (spec.stem, spec.head, *spec.blocks)]
    for m in (spec.stem, spec.head, *spec.blocks):
        m.eval()
    try:
        with torch.no_grad():
            h = call("the stem", spec.stem, torch.zeros((batch,) + tuple(spec.input_shape)))
            for i, block in enumerate(spec.blocks):
                h2 = call(f"block {i}", block, h)
                if i < len(spec.blocks) - 1:
                    try:
                        im = spec.make_im(i)
                    except Exception as exc:
                        fail(f"make_im({i})", f"raised {type(exc).__name__}: {exc}")
                    z = call(f"the IM after block {i} (make_im({i}))", im.eval(), h2)
                    if tuple(z.shape) != (batch, spec.num_classes):
                        fail(f"the IM after block {i} (make_im({i}))",
                             f"returned shape {list(z.shape)}, not logits [{batch}, {spec.num_classes}]")
                h = h2
            z = call("the head", spec.head, h)
            if tuple(z.shape) != (batch, spec.num_classes):
                fail("the head", f"returned shape {list(z.shape)}, not logits [{batch}, {spec.num_classes}]")
    finally:
        for m, t in zip((spec.stem, spec.head, *spec.blocks), was):
            m.train(t)
