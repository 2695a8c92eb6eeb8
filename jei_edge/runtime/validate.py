"""Input validation: every bad batch becomes an ``InputError`` before it reaches a backend.

Policy (also in docs/runtime.md):

- ``x`` is the **model input** ``[B, C, H, W]`` (after the bundle's preprocessing).
- float16/float32/float64 are accepted and cast to float32; integer, bool, complex and object
  arrays are refused (raw pixels must be scaled and normalised first; ``jei-edge run`` does it).
- A single sample ``[C, H, W]`` is refused with a hint to add the batch axis (``x[None]``).
- NaN or +-inf anywhere is refused, naming the first bad rows. Bundles whose stage 0 carries the
  input guard (``input_guard`` in the manifest, verified when the runtime loads) are checked by
  the graph: the guard makes stage 0's gate NaN for such a row, the workspace sees it at the first
  boundary (``GuardTripped``) and the runtime then names the rows with ``nonfinite_error``, the
  same error as before the run. Checking B gate values instead of every input value saves ~20 us
  per call at batch 1 on the build host (the check read the whole input right after a stage run
  had evicted numpy's code and data; the in-graph sum adds ~1 us to stage 0). A finite row whose
  stage-0 gate is NaN (values so large the network overflows) is refused too.
- An empty batch (``B = 0``) is valid and gives empty results.
- Batches larger than the runtime's ``max_batch`` are run in chunks of ``max_batch``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jei_edge.errors import InputError

_FLOATS = (np.float16, np.float32, np.float64)
_F32 = np.dtype(np.float32)


class GuardTripped(Exception):
    """Raised by a workspace when stage 0's guarded gate is NaN: ``rows`` of the batch it ran."""

    def __init__(self, rows):
        super().__init__(f"non-finite stage-0 gate in rows {list(rows)[:5]}")
        self.rows = [int(r) for r in rows]


def _rows_text(rows) -> str:
    return ", ".join(str(int(i)) for i in rows[:5]) + (", ..." if len(rows) > 5 else "")


def nonfinite_error(x: np.ndarray, guard_rows: Sequence[int] = (), what: str = "input") -> InputError:
    """The error for a batch whose stage-0 guard tripped on ``guard_rows`` (indices into ``x``)."""
    bad = np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))
    if bad.size:
        return InputError(f"{what} has NaN or infinite values in {bad.size} row(s) (rows {_rows_text(bad)})",
                          hint="drop or repair those samples before running")
    rows = list(guard_rows)
    peak = float(np.max(np.abs(x[rows]))) if rows else float("nan")
    return InputError(f"{what} rows {_rows_text(rows)} are finite but the model's stage 0 overflows on them "
                      f"(gate is NaN; largest |value| {peak:.3g})",
                      hint="check the preprocessing: the model takes normalised inputs (see `jei-edge inspect`)")


def to_float32(x: np.ndarray, what: str = "input") -> np.ndarray:
    """``x`` (any float or integer array ``[B, ...]``) as float32, refusing finite values that
    float32 cannot hold (|value| > 3.4e38 would silently become inf) with one InputError."""
    if x.dtype == np.float32:
        return x
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below, not warned about
        out = x.astype(np.float32)
    if x.dtype.kind == "f" and x.dtype.itemsize > 4 and x.size and not np.isfinite(out).all():
        big = np.isfinite(x) & ~np.isfinite(out)
        if big.any():
            rows = np.flatnonzero(big.reshape(len(x), -1).any(axis=1)) if x.ndim else np.zeros(1, np.int64)
            peak = float(np.max(np.abs(x[np.isfinite(x)])))
            raise InputError(f"{what} has values beyond the float32 range in {rows.size} row(s) "
                             f"(rows {_rows_text(rows)}; largest |value| {peak:.3g})",
                             hint="the model computes in float32: check the data and its scaling")
    return out


def check_batch(x, input_shape: Sequence[int], what: str = "input", finite: bool = True) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 ``[B, C, H, W]`` array or raise ``InputError``.

    ``finite=False`` skips the NaN/inf check: only for a runtime whose stage 0 carries the
    verified input guard (the module docstring)."""
    expected = tuple(input_shape)
    # The common case, checked cheaply (batch-1 streaming calls this per sample): shape[1:] equal
    # to ``expected`` also fixes the rank; ``dtype is`` the native float32 singleton.
    if (type(x) is np.ndarray and x.dtype is _F32 and x.shape[1:] == expected and x.flags.c_contiguous
            and (not finite or np.isfinite(x).all())):
        return x
    expected = tuple(int(d) for d in expected)
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise InputError(f"{what} cannot be converted to a numpy array ({exc})") from exc
    if x.dtype.type not in _FLOATS:
        raise InputError(
            f"{what} has dtype {x.dtype}; the model takes floating-point input (float32)",
            hint="scale raw pixels to [0, 1] and apply the bundle's preprocessing (`jei-edge run` does both)")
    want = "[B, " + ", ".join(str(d) for d in expected) + "]"
    if x.ndim != len(expected) + 1:
        if x.shape == expected:
            raise InputError(f"{what} has shape {list(x.shape)}: one sample without a batch axis; expected {want}",
                             hint="add the batch axis, e.g. x[None]")
        raise InputError(f"{what} has rank {x.ndim} (shape {list(x.shape)}); expected rank {len(expected) + 1}: {want}")
    if tuple(x.shape[1:]) != expected:
        raise InputError(f"{what} has shape {list(x.shape)}; the bundle expects {want}",
                         hint="resize to the model's input size (see `jei-edge inspect BUNDLE`)")
    x = to_float32(x, what)
    if finite and x.shape[0] and not np.isfinite(x).all():
        raise nonfinite_error(x, what=what)  # some row is non-finite: that is the error it names
    return np.ascontiguousarray(x)


def check_offsets(offsets: Optional[Sequence[float]], num_gates: int) -> Optional[np.ndarray]:
    """Per-gate threshold offsets: ``None`` or ``num_gates`` finite numbers."""
    if offsets is None:
        return None
    try:
        arr = np.asarray(offsets, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"offsets {offsets!r} are not numbers") from exc
    if arr.size != num_gates:
        raise InputError(f"offsets must have one value per gated exit ({num_gates}), got {arr.size}",
                         hint="e.g. --offsets " + ",".join(["0"] * num_gates))
    if not np.isfinite(arr).all():
        raise InputError(f"offsets must be finite, got {arr.tolist()}")
    return arr


def check_mode(mode: str) -> str:
    from jei_edge.runtime.loop import MODES

    if mode not in MODES:
        raise InputError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return mode
