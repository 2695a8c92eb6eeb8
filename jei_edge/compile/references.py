"""Stored references (``reference/verify.npz``): inputs with the PyTorch model's outputs and exit
decisions on them, so a bundle can be re-checked without torch (``jei-edge verify``).

The export step computes them (``compute_references``, needs torch); ``jei_edge.compile.verify``
reads them (torch-free). Arrays in the file (N rows, G gates, C classes)::

    x           [N, ...] float16   model inputs (rounded to float16 *before* the PyTorch pass,
                                    so this copy is exact and half the size)
    exit_index  [N] int64          the PyTorch model's exit (offsets 0; G = the final head)
    probs       [N, C] float32     its probabilities at that exit
    margin      [N, G] float64     g - threshold at every gate a row reached (NaN after it left)
    gate        [N, G] float64     its gate values
    full_probs  [N, C] float32     the final head's probabilities (full mode)
    kind        [N] int8           index into kind_names (real, uniform_noise, ...)
    kind_names  [K] str

A build checks many inputs but stores at most ``STORE_BYTES`` of them (rows spread evenly over
all kinds), so a bundle of a large-input model stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from jei_edge._io import shorten
from jei_edge.errors import BundleError

REFERENCE_FILE = "reference/verify.npz"
STORE_BYTES = 16 << 20  # stored inputs (float16) at most this size ...
MIN_STORED = 64  # ... but at least this many rows (when checked)
_ARRAYS = ("x", "exit_index", "probs", "margin", "gate", "full_probs", "kind")


@dataclass(frozen=True)
class ReferenceSet:
    """Reference rows in memory (see the module docstring for the arrays); ``x`` is float32."""

    x: np.ndarray
    exit_index: np.ndarray
    probs: np.ndarray
    margin: np.ndarray
    gate: np.ndarray
    full_probs: np.ndarray
    kind: np.ndarray
    kind_names: Tuple[str, ...]

    def __len__(self) -> int:
        return len(self.x)

    @property
    def kinds(self) -> Dict[str, int]:
        """Rows of each kind, in ``kind_names`` order (kinds with no row left out)."""
        counts = np.bincount(self.kind, minlength=len(self.kind_names))
        return {name: int(c) for name, c in zip(self.kind_names, counts) if c}

    def take(self, rows: np.ndarray) -> "ReferenceSet":
        return ReferenceSet(**{f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "kind_names"},
                            kind_names=self.kind_names)

    def stored_subset(self, max_bytes: int = STORE_BYTES) -> "ReferenceSet":
        """The rows a bundle stores: all of them if their float16 inputs fit ``max_bytes``, else
        evenly spread rows (every kind keeps its share), at least ``MIN_STORED``."""
        row_bytes = max(1, 2 * int(np.prod(self.x.shape[1:])))
        k = min(len(self), max(MIN_STORED, max_bytes // row_bytes))
        if k == len(self):
            return self
        return self.take(np.unique(np.linspace(0, len(self) - 1, k).round().astype(np.int64)))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        arrays["x"] = self.x.astype(np.float16)
        with open(path, "wb") as f:
            np.savez(f, kind_names=np.array(self.kind_names, dtype=str), **arrays)

    @classmethod
    def load(cls, path: Path, num_gates: int, num_classes: int, input_shape: Sequence[int]) -> "ReferenceSet":
        """Read and check a reference file against the bundle's shapes (BundleError otherwise)."""
        where = f"reference file '{path}'"
        from jei_edge.errors import InputError
        from jei_edge.runtime.inputs import NpzReader

        try:  # header-first, bounded, never unpickling (the file may have been replaced)
            with NpzReader(path) as z:
                missing = [a for a in _ARRAYS + ("kind_names",) if a not in z.keys]
                if missing:
                    raise BundleError(f"{where} lacks array '{missing[0]}'",
                                      hint="rebuild the bundle with `jei-edge build`")
                raw = {name: z.read(name) for name in _ARRAYS + ("kind_names",)}
        except InputError as exc:
            raise BundleError(f"{where} cannot be read ({shorten(exc.message)})", hint="rebuild the bundle") from None
        n = len(raw["x"])
        want = {"x": (n, *input_shape), "exit_index": (n,), "probs": (n, num_classes), "margin": (n, num_gates),
                "gate": (n, num_gates), "full_probs": (n, num_classes), "kind": (n,)}
        for name, shape in want.items():
            if tuple(raw[name].shape) != tuple(shape):
                raise BundleError(f"{where}: array '{name}' has shape {list(raw[name].shape)}, the bundle needs "
                                  f"{list(shape)}", hint="the references belong to another model; rebuild the bundle")
        if n == 0 or raw["exit_index"].min() < 0 or raw["exit_index"].max() > num_gates:
            raise BundleError(f"{where}: no rows, or exit indices outside 0..{num_gates}", hint="rebuild the bundle")
        names = tuple(str(s) for s in raw["kind_names"])
        if raw["kind"].min() < 0 or raw["kind"].max() >= len(names):
            raise BundleError(f"{where}: array 'kind' indexes past kind_names", hint="rebuild the bundle")
        return cls(x=np.ascontiguousarray(raw["x"], dtype=np.float32),
                   exit_index=raw["exit_index"].astype(np.int64), probs=raw["probs"].astype(np.float32),
                   margin=raw["margin"].astype(np.float64), gate=raw["gate"].astype(np.float64),
                   full_probs=raw["full_probs"].astype(np.float32), kind=raw["kind"].astype(np.int8),
                   kind_names=names)


def compute_references(model, x: np.ndarray, kinds: Dict[str, int], batch: int = 256,
                       progress: Optional[Callable[[int], None]] = None) -> ReferenceSet:
    """The PyTorch model's outputs and exit decisions on ``x`` (needs torch).

    Args:
        model: the JEIModel.
        x: ``[N, C, H, W]`` float32 inputs, grouped by kind in the order of ``kinds``; rounded to
            float16 here (the stored copy is then exact).
        kinds: rows of each kind (``jei_edge.compile.inputs.parity_inputs``'s counts).
        batch: rows per PyTorch pass.
        progress: called with the rows done after every batch.

    Returns:
        ``ReferenceSet``.
    """
    from jei_edge.model.jei import exit_decisions

    x = np.ascontiguousarray(np.asarray(x, dtype=np.float16).astype(np.float32))
    d = exit_decisions(model, x, batch=batch, probs=True, progress=progress)
    kind = np.repeat(np.arange(len(kinds), dtype=np.int8), list(kinds.values()))
    return ReferenceSet(x=x, exit_index=d.levels, probs=d.probs, margin=d.margin, gate=d.gates,
                        full_probs=d.full_probs, kind=kind, kind_names=tuple(kinds))
