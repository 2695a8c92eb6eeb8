"""The CPU workspace: numpy buffers of one batch and the per-boundary work.

Buffers are allocated once for ``max_batch`` rows; a batch uses the first rows of each. At each
boundary the exit rule (``jei_edge.exit_rule.exit_mask``, the one implementation) picks the rows
that leave; they are written to their original output slots and the survivors' hidden state,
running gate sum ``S`` and original index are compacted with ``np.take(..., out=)`` into the next
stage's input buffer. When nobody exits (always in ``full`` mode) nothing is copied: the next
stage reads the previous stage's ``hidden_out`` buffer directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from jei_edge.exit_rule import exit_mask
from jei_edge.runtime.loop import Results, Workspace


@dataclass(frozen=True)
class TensorSpec:
    """One stage input/output: name, per-row shape (batch axis removed) and numpy dtype."""

    name: str
    shape: Tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def from_manifest(cls, entry: Dict) -> "TensorSpec":
        shape = entry["shape"]
        return cls(entry["name"], tuple(int(d) for d in shape[1:]), entry.get("dtype", "float32"))


@dataclass(frozen=True)
class StageSpec:
    """What the workspace needs to know about stage k."""

    index: int
    exit: int  # exit index taken by rows leaving at this stage's boundary (or the final head)
    input: TensorSpec
    outputs: Tuple[TensorSpec, ...]

    @classmethod
    def from_manifest(cls, entry: Dict) -> "StageSpec":
        (inp,) = entry["inputs"]
        return cls(int(entry["index"]), int(entry.get("exit", entry["index"])), TensorSpec.from_manifest(inp),
                   tuple(TensorSpec.from_manifest(o) for o in entry["outputs"]))


class NumpyWorkspace(Workspace):
    """Preallocated numpy buffers + numpy decide/scatter/compact (see the module docstring)."""

    def __init__(self, stages: Sequence[StageSpec], num_classes: int, max_batch: int):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.stages = list(stages)
        self.max_batch = int(max_batch)
        self.num_classes = int(num_classes)
        mb = self.max_batch
        self._own_in = [np.empty((mb,) + s.input.shape, dtype=s.input.dtype) for s in self.stages]
        self._out: List[Dict[str, np.ndarray]] = [
            {o.name: np.empty((mb,) + o.shape, dtype=o.dtype) for o in s.outputs} for s in self.stages]
        self._out_list = [[(o.name, self._out[k][o.name]) for o in s.outputs] for k, s in enumerate(self.stages)]
        self._in: List[np.ndarray] = list(self._own_in)  # current input array of each stage
        self._S = np.zeros(mb, dtype=np.float64)
        self._S_tmp = np.zeros(mb, dtype=np.float64)
        self._S_alt = np.zeros(mb, dtype=np.float64)
        self._idx = np.zeros(mb, dtype=np.int64)
        self._idx_alt = np.zeros(mb, dtype=np.int64)
        self._arange = np.arange(mb, dtype=np.int64)
        self._probs = np.zeros((mb, self.num_classes), dtype=np.float32)
        self._exit = np.zeros(mb, dtype=np.int64)
        self._B = 0
        self._identity = True  # row i of the live set is still original row i

    # -- executor side -------------------------------------------------------------------------
    def stage_input(self, k: int) -> np.ndarray:
        """The array holding stage ``k``'s input rows (use its first ``n`` rows)."""
        return self._in[k]

    def stage_outputs(self, k: int) -> List[Tuple[str, np.ndarray]]:
        """``(name, buffer)`` of stage ``k``'s outputs, in manifest order."""
        return self._out_list[k]

    # -- loop side ------------------------------------------------------------------------------
    def begin(self, x) -> int:
        b = int(x.shape[0])
        if b > self.max_batch:
            raise ValueError(f"batch {b} > workspace max_batch {self.max_batch}")
        if x.dtype == self._own_in[0].dtype and x.flags.c_contiguous:
            self._in[0] = x  # zero-copy: the caller keeps x alive for the call
        else:
            self._own_in[0][:b] = x
            self._in[0] = self._own_in[0]
        self._S[:b] = 0.0
        self._idx[:b] = self._arange[:b]
        self._B = b
        self._identity = True
        return b

    def exit_and_compact(self, k: int, n: int, delta: float, early_exit: bool) -> int:
        out = self._out[k]
        g = out["gate"]
        hidden = out["hidden_out"]
        if early_exit and n == 1:  # batch-1 streaming: scalar decision, no index arrays
            if exit_mask(g[0], self._S[0], delta):
                row = 0 if self._identity else int(self._idx[0])
                self._probs[row] = out["probs"][0]
                self._exit[row] = self.stages[k].exit
                return 0
            self._S[0] += g[0]
            self._in[k + 1] = hidden
            return 1
        g = g[:n]
        S = self._S[:n]
        if early_exit:
            mask = exit_mask(g, S, delta)
            if mask.any():
                ex = np.flatnonzero(mask)
                rows = ex if self._identity else self._idx[ex]
                self._probs[rows] = out["probs"][ex]
                self._exit[rows] = self.stages[k].exit
                keep = np.flatnonzero(~mask)
                m = int(keep.size)
                if m:
                    # mode="clip": indices are valid, and numpy buffers `out` for the default "raise"
                    np.add(S, g, out=self._S_tmp[:n])
                    np.take(self._S_tmp[:n], keep, out=self._S_alt[:m], mode="clip")
                    np.take(self._idx[:n], keep, out=self._idx_alt[:m], mode="clip")
                    self._S, self._S_alt = self._S_alt, self._S
                    self._idx, self._idx_alt = self._idx_alt, self._idx
                    nxt = self._own_in[k + 1]
                    np.take(hidden[:n], keep, axis=0, out=nxt[:m], mode="clip")
                    self._in[k + 1] = nxt
                    self._identity = False
                return m
        np.add(S, g, out=S)
        self._in[k + 1] = hidden  # nobody left: the next stage reads hidden_out as is
        return n

    def finish(self, k: int, n: int) -> None:
        probs = self._out[k]["probs"][:n]
        if self._identity:
            self._probs[:n] = probs
            self._exit[:n] = self.stages[k].exit
        else:
            rows = self._idx[:n]
            self._probs[rows] = probs
            self._exit[rows] = self.stages[k].exit

    def collect(self, reach: List[int]) -> Results:
        b = self._B
        self._in[0] = self._own_in[0]  # drop the reference to the caller's array
        return Results(probs=self._probs[:b].copy(), exit_index=self._exit[:b].copy(), reach=list(reach))
