"""The CPU workspace: numpy buffers of one batch and the per-boundary work.

Buffers are allocated once for ``max_batch`` rows; a batch uses the first rows of each. At each
boundary the exit rule (``jei_edge.exit_rule.exit_mask``, the one implementation) picks the rows
that leave; they are written to their original output slots, and the survivors are compacted **in
place** in the stage's ``hidden_out`` buffer, which the next stage then reads as its input: the
survivors found after row ``m`` (the survivor count) move into the holes the exited rows left in
the first ``m`` rows, together with their running gate sum ``S`` and original index. At most
``min(exited, survivors)`` rows move (none when nobody exits, always the case in ``full`` mode),
instead of every survivor as an order-preserving gather would.

A batch of one row (streaming) keeps ``S`` in a Python float and decides on Python floats through
the same ``exit_mask``; the row never moves, so its result is copied straight from the probs
buffer of the stage it left at. A boundary of a single-exit stage on a few live rows
(``SMALL_ROWS``) also decides on Python floats and compacts the same way with fewer numpy calls
(merged stages always decide on arrays). ``full`` mode does no boundary work at all.

Stage 0 reads a large float32 C-contiguous batch where the caller keeps it (no copy); a small one
(``COPY_INPUT_BYTES``), or one of another dtype or layout, is copied into the workspace's own
buffer, so that the executor's binding to it stays valid (``input_owned``).

With ``input_guard`` (stage 0's graph carries the input guard, see ``jei_edge.runtime.validate``)
the first boundary also checks stage 0's gate values for NaN, in both modes, and raises
``GuardTripped`` with the rows; the runtime turns that into the input error.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from jei_edge.bundle.manifest import Stage
from jei_edge.exit_rule import exit_mask
from jei_edge.runtime.loop import Capability, Results, Workspace
from jei_edge.runtime.validate import GuardTripped


# Live-row counts up to this decide in Python (``_boundary_rows``, ``NumpyWorkspace.small_rows``).
# Measured in real runs (boundaries right after stage runs, 2-core host): the boundary time per
# batch at batch 8-16 was 0.57-0.65x of the numpy path's on the quickstart, vit and resnet
# benchmark models, at batch 64 0.71-0.90x; at batch 256 (the first boundaries on > 64 rows in
# numpy either way) 0.98-1.00x, while deciding 128-256 rows in Python was 1.00-1.14x.
SMALL_ROWS = 64
# Batches of at most this many bytes are copied into the workspace's own stage-0 buffer, whose
# onnxruntime binding is then kept: binding a new input address costs a run ~5-10% at 1-8 rows of
# the quickstart model, more than copying them; at 150 KB and up the two are even (measured).
COPY_INPUT_BYTES = 256 * 1024


class NumpyWorkspace(Workspace):
    """Preallocated numpy buffers + numpy decide/scatter/compact (see the module docstring).

    Args:
        stages: the manifest's stages (per-row shapes and dtypes of every input and output).
        num_classes: C.
        max_batch: rows every buffer holds.
        input_guard: stage 0's gate carries the verified in-graph NaN/inf guard.
    """

    capabilities = frozenset({Capability.MERGED_STAGES})

    def __init__(self, stages: Sequence[Stage], num_classes: int, max_batch: int, input_guard: bool = False):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.stages = list(stages)
        # stage 0's gate is NaN for non-finite input rows (checked at the first boundary)
        self.input_guard = bool(input_guard) and len(self.stages) > 1
        self.max_batch = int(max_batch)
        self.num_classes = int(num_classes)
        mb = self.max_batch
        # stage 0 reads the caller's array (or this copy of it); stage k > 0 reads stage k-1's hidden_out
        self._x = np.empty((mb,) + self.stages[0].input.shape, dtype=self.stages[0].input.dtype)
        self._out: List[Dict[str, np.ndarray]] = [
            {o.name: np.empty((mb,) + o.shape, dtype=o.dtype) for o in s.outputs} for s in self.stages]
        self._in: List[np.ndarray] = [self._x] + [self._out[k]["hidden_out"] for k in range(len(self.stages) - 1)]
        self._S = np.zeros(mb, dtype=np.float64)
        self._idx = np.zeros(mb, dtype=np.int64)
        self._arange = np.arange(mb, dtype=np.int64)
        self._probs = np.zeros((mb, self.num_classes), dtype=np.float32)
        self._exit = np.zeros(mb, dtype=np.int64)
        self.small_rows = SMALL_ROWS
        self._B = 0
        self._identity = True  # row i of the live set is still original row i
        # batch 1: S as a Python float, and (exit-index array, probs buffer) of the exit taken
        self._s1 = 0.0
        self._last: Optional[Tuple[np.ndarray, np.ndarray]] = None
        # batch-1 exit index arrays, copied into each result: building a one-element array from a
        # list costs ~6 us more right after a stage run has evicted numpy's code (measured)
        n_exits = max(e for st in self.stages for e in st.exits) + 1
        self._exit_of = [np.array([e], dtype=np.int64) for e in range(n_exits)]
        self._exit_one = [self._exit_of[st.exit] for st in self.stages]
        # merged stages (several exits): probs [mb, E, C], gate [mb, E or E - 1]
        self._merged = [st.merged for st in self.stages]
        self._exit_ids = [np.asarray(st.exits, dtype=np.int64) for st in self.stages]

    # -- executor side -------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.max_batch

    @property
    def input_owned(self) -> bool:
        """Stage 0 reads the workspace's own buffer (not the caller's array) in the current batch."""
        return self._in[0] is self._x

    def stage_input(self, k: int) -> np.ndarray:
        """The array holding stage ``k``'s input rows (use its first ``n`` rows)."""
        return self._in[k]

    def stage_outputs(self, k: int) -> Dict[str, np.ndarray]:
        """Stage ``k``'s output arrays by name, in manifest order."""
        return self._out[k]

    # -- loop side ------------------------------------------------------------------------------
    def begin(self, x) -> int:
        b = int(x.shape[0])
        if b > self.max_batch:
            raise ValueError(f"batch {b} > workspace max_batch {self.max_batch}")
        if x.nbytes > COPY_INPUT_BYTES and x.dtype == self._x.dtype and x.flags.c_contiguous:
            self._in[0] = x  # zero-copy: the caller keeps x alive for the call
        else:  # small (or not float32 C-contiguous): copied; the executor keeps its binding to _x
            self._x[:b] = x
            self._in[0] = self._x
        self._B = b
        self._identity = True
        if b == 1:  # batch-1 streaming: S lives in a Python float, rows never move
            self._s1 = 0.0
            self._last = None
            return 1
        self._S[:b] = 0.0
        self._idx[:b] = self._arange[:b]
        return b

    def _check_guard(self, g: np.ndarray) -> None:
        s = g.sum()  # gates are in [0, 1] (no overflow): NaN exactly when some row's gate is NaN
        if s != s:
            raise GuardTripped(np.flatnonzero(np.isnan(g)))

    def exit_and_compact(self, k: int, n: int, delta, early_exit: bool) -> int:
        if self._merged[k]:
            return self._decide_merged(k, n, delta, early_exit, last=False)
        out = self._out[k]
        if not early_exit:  # ``full``: nobody exits, nothing moves (S is only needed to decide)
            if k == 0 and self.input_guard:
                self._check_guard(out["gate"][:n])
            return n
        if self._B == 1:  # batch-1 streaming: a scalar decision on Python floats (float64, as below)
            gv = out["gate"].item(0)  # a Python float
            if exit_mask(gv, self._s1, float(delta)):  # float(): a numpy float32 offset would make it float32
                self._last = (self._exit_one[k], out["probs"])  # collect() copies the row before the next run
                return 0
            if gv != gv and k == 0 and self.input_guard:  # NaN never exits: only this path can see it
                raise GuardTripped([0])
            self._s1 += gv
            return 1
        g = out["gate"][:n]
        if n <= self.small_rows:
            return self._boundary_rows(k, n, g, delta)
        if k == 0 and self.input_guard:
            self._check_guard(g)
        hidden = out["hidden_out"]
        S = self._S[:n]
        mask = exit_mask(g, S, delta)
        np.add(S, g, out=S)  # after the decision; S of exited rows is not used again
        if not mask.any():
            return n
        ex = np.flatnonzero(mask)
        self._retire(ex, out["probs"][ex], self.stages[k].exit)
        return self._compact(hidden, S, n, mask, ex)

    def _boundary_rows(self, k: int, n: int, g: np.ndarray, delta) -> int:
        """``exit_and_compact`` of a single-exit stage for a few live rows (``SMALL_ROWS``): the
        same decisions (``exit_mask`` on Python floats, float64 as on arrays), the same in-place
        compaction, with about six numpy calls instead of about twenty; each costs more than the
        Python work it replaces right after a stage run has evicted numpy's code (measured)."""
        gl = g.tolist()
        delta = float(delta)  # float64 as on arrays (a numpy float32 offset would make the rule float32)
        if k == 0 and self.input_guard:
            total = sum(gl)  # NaN exactly when some row's gate is NaN (gates are in [0, 1])
            if total != total:
                raise GuardTripped([i for i, v in enumerate(gl) if v != v])
        S = self._S
        sl = S[:n].tolist()
        ex = [i for i in range(n) if exit_mask(gl[i], sl[i], delta)]
        if not ex:
            S[:n] = [s + v for s, v in zip(sl, gl)]
            return n
        out = self._out[k]
        ids = None if self._identity else self._idx[:n].tolist()
        rows = ex if ids is None else [ids[i] for i in ex]
        self._probs[rows] = out["probs"][ex]
        self._exit[rows] = self.stages[k].exit
        m = n - len(ex)
        if m:
            # the survivors after row m fill the holes exited rows left before it (as ``_compact``)
            keep = list(range(m))
            gone = set(ex)
            fill = [i for i in range(m, n) if i not in gone]
            if fill:
                hidden = out["hidden_out"]
                for dst, src in zip([i for i in ex if i < m], fill):
                    hidden[dst] = hidden[src]
                    keep[dst] = src
                if ids is None:
                    ids = self._idx[:n].tolist()
                self._idx[:m] = [ids[i] for i in keep]
                self._identity = False
            S[:m] = [sl[i] + gl[i] for i in keep]
        return m

    def _compact(self, hidden: np.ndarray, S: np.ndarray, n: int, mask: np.ndarray, ex: np.ndarray) -> int:
        """Survivors (``~mask``) of the first ``n`` rows into the first ``m`` rows; returns ``m``."""
        m = n - int(ex.size)
        if m:
            # Compact by filling the holes that exited rows leave in the first m rows with the
            # survivors found after row m: at most min(exited, survivors) rows move, and the
            # original index travels with each row, so results still land in input order.
            holes = ex[:np.searchsorted(ex, m)]
            if holes.size:
                fill = np.flatnonzero(~mask[m:]) + m
                # row by row: a hole is always before row m and a fill row at or after it, so
                # source and destination never overlap; unlike hidden[holes] = hidden[fill] this
                # builds no temporary copy of the moved rows (measured 1.6-2.2x faster for 10 rows
                # of 40-128 KB)
                for dst, src in zip(holes.tolist(), fill.tolist()):
                    hidden[dst] = hidden[src]
                S[holes] = S[fill]
                self._idx[holes] = self._idx[fill]  # begin() set idx = arange, so this is valid
                self._identity = False
        return m

    def _decide_merged(self, k: int, n: int, deltas, early_exit: bool, last: bool) -> int:
        """A stage holding several exits: their gates in order, the earliest that fires wins (the
        exit rule of the unmerged model, with ``S`` accumulated gate by gate); with ``last`` the
        rows no gate took leave at the stage's final head. ``deltas``: one offset per gate."""
        out = self._out[k]
        P, G = out["probs"], out["gate"]
        ids = self._exit_ids[k]
        ng = G.shape[1]
        # Python floats (float64 decisions on the scalar path too, whatever type the caller passed)
        deltas = tuple(float(d) for d in deltas) if isinstance(deltas, tuple) else (float(deltas),) * ng
        if self._B == 1:
            if k == 0 and self.input_guard:
                g0 = G.item(0, 0)
                if g0 != g0:
                    raise GuardTripped([0])
            if early_exit:
                s = self._s1
                for j in range(ng):
                    gv = G.item(0, j)
                    if exit_mask(gv, s, deltas[j]):
                        self._last = (self._exit_of[int(ids[j])], P[:, j])
                        return 0
                    s += gv
                self._s1 = s
            if last:
                self._last = (self._exit_of[int(ids[-1])], P[:, -1])
                return 0
            return 1
        if k == 0 and self.input_guard:
            self._check_guard(G[:n, 0])
        if not early_exit:
            if last:
                self._retire(np.arange(n), P[:n, -1], int(ids[-1]))
                return 0
            return n
        S = self._S[:n]
        code = np.full(n, -1, dtype=np.int64)  # column of the exit taken (-1: still live)
        live = np.ones(n, dtype=bool)
        for j in range(ng):
            g = G[:n, j]
            m = exit_mask(g, S, deltas[j]) & live
            code[m] = j
            live &= ~m
            np.add(S, g, out=S)  # S of rows that left is not used again
        if last:
            code[live] = len(ids) - 1
        mask = code >= 0
        if not mask.any():
            return n
        ex = np.flatnonzero(mask)
        cols = code[ex]
        self._retire(ex, P[ex, cols], ids[cols])
        if last:
            return 0
        return self._compact(out["hidden_out"], S, n, mask, ex)

    def _retire(self, ex: np.ndarray, probs: np.ndarray, exit_ids) -> None:
        """Rows ``ex`` of the live set leave: their probs and exit index go to their original slots."""
        rows = ex if self._identity else self._idx[ex]
        self._probs[rows] = probs
        self._exit[rows] = exit_ids

    def finish(self, k: int, n: int, delta=0.0, early_exit: bool = True) -> None:
        if self._merged[k]:
            self._decide_merged(k, n, delta, early_exit, last=True)
            return
        if self._B == 1:
            self._last = (self._exit_one[k], self._out[k]["probs"])
            return
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
        self._in[0] = self._x  # drop the workspace's reference to the caller's array
        if b == 1:
            exit_arr, probs = self._last
            return Results(probs[:1].copy(), exit_arr.copy(), reach)
        # ``reach`` is the loop's own list, made for this call: no copy
        return Results(self._probs[:b].copy(), self._exit[:b].copy(), reach)
