"""What every backend provides: a settings class, a device, and ``create`` (executor + workspace).

A backend is a folder under ``jei_edge/backends/`` whose ``__init__`` defines ``BACKEND``, an
instance of a ``Backend`` subclass. The registry (``jei_edge.backends``) imports it only when it
is asked for, so importing the runtime loads no backend library.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Dict, Optional, Tuple, Type, TypeVar

from jei_edge.errors import BundleError, InputError

S = TypeVar("S")


def parse_settings(cls: Type[S], options: Optional[Dict[str, Any]], what: str, base: Optional[S] = None) -> S:
    """A frozen settings dataclass from a dict (a target's ``[backend]`` table or keywords).

    Unknown keys are refused; each value must have the type of the field's default (bools are
    not integers; integers must be >= 0; tuples accept lists). ``base`` supplies the defaults.
    """
    base = base if base is not None else cls()
    options = dict(options or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise InputError(f"unknown {what} option(s) {unknown}", hint=f"valid options: {', '.join(sorted(names))}")
    defaults = cls()
    values = {}
    for key, value in options.items():
        default = getattr(defaults, key)
        choices = names[key].metadata.get("choices")
        if isinstance(default, bool):
            if type(value).__name__ not in ("bool", "bool_"):
                raise InputError(f"{what} option {key} must be true/false, got {value!r}")
            value = bool(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 0:
                raise InputError(f"{what} option {key} must be an integer >= 0, got {value!r}")
            value = int(value)
        elif isinstance(default, str) or choices:
            if choices and value not in choices:
                raise InputError(f"{what} option {key} must be one of {list(choices)}, got {value!r}")
            if not isinstance(value, str):
                raise InputError(f"{what} option {key} must be a string, got {value!r}")
        elif names[key].metadata.get("int_tuple"):
            if value is not None:
                try:
                    value = tuple(int(v) for v in value)
                except (TypeError, ValueError):
                    raise InputError(f"{what} option {key} must be a list of integers, got {value!r}") from None
                if not value or min(value) < 1:
                    raise InputError(f"{what} option {key} must list integers >= 1, got {list(value)}")
        values[key] = value
    return dataclasses.replace(base, **values)


class Backend(abc.ABC):
    """One way of executing a bundle's stages (see the module docstring).

    Attributes:
        name: the registry key, as a target's ``backend`` names it (its device: ``DEVICES`` there).
        settings_class: the frozen dataclass of its settings, with ``from_options(dict, base=None)``
            (built on ``parse_settings``).
    """

    name: str
    settings_class: type

    def settings(self, bundle, options: Optional[Dict[str, Any]] = None):
        """The target's table for this backend (when the bundle was built for it), then ``options``."""
        target = bundle.manifest.target
        base = self.settings_class.from_options(target.backend_options) if target.backend == self.name else None
        return self.settings_class.from_options(options, base=base)

    def unsupported(self, bundle) -> Optional[str]:
        """Why this backend cannot run ``bundle`` (None when it can)."""
        return None

    @abc.abstractmethod
    def create(self, bundle, max_batch: int, settings) -> Tuple[Any, Any]:
        """``(executor, workspace)`` for ``bundle`` with buffers for ``max_batch`` rows, the executor
        already prepared for the workspace (``executor.prepare(ws)``)."""

    def check(self, bundle) -> None:
        reason = self.unsupported(bundle)
        if reason:
            raise BundleError(f"bundle '{bundle.path}' cannot run on the {self.name} backend: {reason}")
