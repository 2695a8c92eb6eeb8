"""The one exception root for user errors.

A ``JeiEdgeError`` means "the input, a file or an option is wrong": the CLI prints its message
(and hint) on one line and exits non-zero without a traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class JeiEdgeError(Exception):
    """A user-facing error: names the thing that is wrong and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class CheckpointError(JeiEdgeError):
    """A model.pt that cannot be loaded safely or is not a jei-edge checkpoint."""


class BundleError(JeiEdgeError):
    """A compiled bundle that is missing, corrupted, altered or incompatible."""


class InputError(JeiEdgeError):
    """Inference inputs of the wrong shape, dtype or values."""


class DependencyError(JeiEdgeError):
    """An optional dependency needed for this operation is not installed."""


class BuildError(JeiEdgeError):
    """The compiler could not produce a correct bundle (export, parity, engine build)."""
