"""The conditional loop: the heart of the runtime, written once for every backend.

A backend supplies two things:

- a **StageExecutor**: "run stage k on the first n rows of its input buffer, into its output
  buffers" (onnxruntime sessions, torch modules on CUDA, TensorRT engines);
- a **Workspace**: owns the buffers of one batch and does the per-boundary work: apply the exit
  rule to the live rows, write exited rows to their original output slots, compact survivors
  (hidden state, running gate sum ``S``, original index) into the next stage's input. On CPU that
  is numpy; on CUDA it is one fused exit-kernel launch.

For a batch of B rows: ``live = all``, ``S = 0``; for each stage k: execute on the live rows only
(batch = n live), decide + compact, stop when no row is live or after the last stage.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Sequence

import numpy as np

from jei_edge.exit_rule import conformal_sets as conformal_membership

MODES = ("exit", "full")


@dataclass
class Results:
    """Per-sample outputs of one batch, in input order."""

    probs: np.ndarray  # [B, C] float32: softmax of the exiting head
    exit_index: np.ndarray  # [B] int: 0..G (G = final head)
    reach: List[int] = field(default_factory=list)  # rows that entered each stage (n_k)

    @classmethod
    def concat(cls, parts: Sequence["Results"]) -> "Results":
        """Results of several batches, in order; ``reach`` summed stage by stage."""
        reach: List[int] = []
        for p in parts:
            for k, r in enumerate(p.reach):
                if k == len(reach):
                    reach.append(0)
                reach[k] += r
        return cls(probs=np.concatenate([p.probs for p in parts]),
                   exit_index=np.concatenate([p.exit_index for p in parts]), reach=reach)

    @property
    def pred(self) -> np.ndarray:
        return np.argmax(self.probs, axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return np.max(self.probs, axis=1)

    def conformal_sets(self, qhat_per_exit: Optional[Sequence[float]]) -> Optional[np.ndarray]:
        """``[B, C]`` membership ``p_k >= 1 - qhat[exit]`` (None without a calibrated table)."""
        if qhat_per_exit is None:
            return None
        return conformal_membership(self.probs, np.asarray(qhat_per_exit, dtype=np.float64)[self.exit_index])

    def exit_histogram(self, num_exits: int) -> List[int]:
        return np.bincount(self.exit_index, minlength=num_exits).tolist()


class Capability:
    """Capabilities an executor or workspace declares (``capabilities``), instead of being probed.

    - ``BINDS_OUTPUTS`` (executor): stage outputs live in the executor's own memory; after running
      stage k it hands their addresses to the workspace with ``ws.bind_outputs(k, ...)``. Without
      it the executor writes into ``ws.stage_outputs(k)``.
    - ``MERGED_STAGES`` (executor and workspace): runs stages that hold several exits.
    - ``DEVICE_INPUT`` (workspace): ``begin`` accepts device arrays (``__cuda_array_interface__``).
    - ``BINDS_OUTPUTS`` (workspace): accepts ``bind_outputs`` (the CUDA workspace).
    """

    BINDS_OUTPUTS = "binds_outputs"
    MERGED_STAGES = "merged_stages"
    DEVICE_INPUT = "device_input"


class StageExecutor(abc.ABC):
    """Runs stage graphs on workspace buffers. Knows nothing of exits.

    What an executor may call on the workspace (declared in ``Workspace``'s executor side):
    ``stage_input(k)``, ``stage_outputs(k)``, ``bind_outputs(k, ...)`` (with ``BINDS_OUTPUTS``),
    ``stream``, ``capacity``, ``input_owned``, ``synchronize()``.
    """

    num_stages: int
    capabilities: FrozenSet[str] = frozenset()

    def prepare(self, ws: "Workspace") -> None:
        """Set up per-workspace state (bindings, CUDA graphs) before the first run; default: nothing."""

    @abc.abstractmethod
    def execute(self, k: int, n: int, ws: "Workspace") -> None:
        """Run stage ``k`` on the first ``n`` rows of ``ws``'s stage-k input, into its outputs."""

    def release(self, ws: "Workspace") -> None:
        """Drop what ``prepare`` made for ``ws`` (before the workspace closes); default: nothing."""

    def close(self) -> None:
        """Free sessions, engines and contexts; default: nothing."""


class Workspace(abc.ABC):
    """Buffers of one batch plus the boundary work (decide, scatter exits, compact survivors).

    Two sides: the **loop side** (``begin``, ``exit_and_compact``, ``finish``, ``collect``) is what
    ``run_conditional`` calls; the **executor side** (``stage_input``, ``stage_outputs``,
    ``bind_outputs``, ``stream``, ``capacity``, ``input_owned``, ``synchronize``) is all an executor
    may use.
    """

    capabilities: FrozenSet[str] = frozenset()
    input_guard: bool = False  # stage 0's verified in-graph NaN/inf guard is checked at the first boundary
    stream: Optional[int] = None  # the CUDA stream stages must run on (None on the CPU)
    # the current batch's stage-0 input is the workspace's own buffer (the same object batch after
    # batch, so an executor may keep a binding to it); False (the safe default): it may be the
    # caller's array, which an executor must neither hold nor assume at the same address next batch
    input_owned: bool = False

    # -- executor side -----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """Rows every buffer holds (the most live rows one ``execute`` call can be given)."""

    @abc.abstractmethod
    def stage_input(self, k: int):
        """Stage ``k``'s input buffer (``capacity`` rows; the stage reads the first ``n``)."""

    @abc.abstractmethod
    def stage_outputs(self, k: int) -> Optional[Dict[str, object]]:
        """Stage ``k``'s output buffers by name (``hidden_out``, ``probs``, ``gate``; manifest order),
        or None where the executor binds its own (``Capability.BINDS_OUTPUTS``)."""

    def bind_outputs(self, k: int, *, probs: int, hidden: int = 0, gate: int = 0) -> None:
        """Point stage ``k``'s next boundary at outputs the executor wrote elsewhere (addresses)."""
        raise NotImplementedError(f"{type(self).__name__} does not accept bound outputs")

    def synchronize(self) -> None:
        """Wait until all work queued on the workspace's stream is done (no-op on the CPU)."""

    # -- loop side ---------------------------------------------------------------------------
    @abc.abstractmethod
    def begin(self, x) -> int:
        """Load a batch into the stage-0 input, reset ``S = 0`` and the original indices; return B."""

    @abc.abstractmethod
    def exit_and_compact(self, k: int, n: int, delta, early_exit: bool) -> int:
        """Boundary after stage ``k`` (not the last) on ``n`` live rows; return the survivor count.

        ``delta``: the threshold offset of the stage's gate, or a tuple with one per gate for a
        merged stage (several exits). With ``early_exit=False`` (``full`` mode) nobody exits:
        survivors are all ``n`` rows.
        """

    @abc.abstractmethod
    def finish(self, k: int, n: int, delta=0.0, early_exit: bool = True) -> None:
        """After the last stage: its ``n`` rows exit at the final head (or, in a merged last
        stage, at the first of its gates that fires; ``delta`` as for ``exit_and_compact``)."""

    @abc.abstractmethod
    def collect(self, reach: List[int]) -> Results:
        """Results of the batch, in input order."""

    def close(self) -> None:
        """Free buffers, streams and events; default: nothing."""


def run_conditional(executor: StageExecutor, ws: Workspace, x, mode: str = "exit",
                    offsets: Optional[Sequence] = None) -> Results:
    """Run one batch through the stages with per-sample early termination (``mode='exit'``)
    or through every stage (``mode='full'``).

    ``offsets``: threshold offsets per **stage**: entry k is the offset of stage k's gate (a float)
    or, for a merged stage, a tuple with one per gate; the last stage's entry may be missing. With
    one exit per stage that is simply the per-gate list delta_l (``Runtime.run`` maps per-gate
    offsets onto the stages)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    last = executor.num_stages - 1
    early = mode == "exit"
    n = ws.begin(x)
    reach: List[int] = []
    for k in range(executor.num_stages):
        reach.append(n)
        executor.execute(k, n, ws)
        if k == last:
            ws.finish(k, n, offsets[k] if offsets is not None and k < len(offsets) else 0.0, early)
            break
        n = ws.exit_and_compact(k, n, 0.0 if offsets is None else offsets[k], early)
        if n == 0:
            break
    return ws.collect(reach)
