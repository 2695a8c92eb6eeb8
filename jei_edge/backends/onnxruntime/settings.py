"""Settings of the onnxruntime backend: one frozen dataclass, defaults in one place.

Several sessions share one CPU (one per stage, plus the plain backbone when benchmarking). A pool
that spin-waits between the operators of a run wakes no thread per operator (1.05-1.35x faster at
batch 1), but onnxruntime's pools go on spinning after the run returns, stealing the cores from the
stage that runs next. ``OrtSettings`` therefore lets pools spin inside a run and stops them when it
returns (``session.force_spinning_stop``; measured by ``benchmarks/settings_speedup.py`` at batch 1
and 64, both settings on the same bundle, docs/runtime.md "onnxruntime settings").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from jei_edge.backends.base import parse_settings
from jei_edge.errors import InputError

_OPT_LEVELS = ("disable", "basic", "extended", "all")
_QDQ_PROPAGATION = ("auto", "on", "off")


@dataclass(frozen=True)
class OrtSettings:
    """onnxruntime session settings shared by every stage session (defaults live here only).

    Attributes:
        intra_op_threads: threads per session; 0 = onnxruntime's default (one per core).
        inter_op_threads: threads for parallel graph branches (sequential execution uses 1).
        allow_spinning: let pool threads spin-wait for work between the operators of a run
            instead of sleeping (a sleeping thread costs a wake-up per parallel operator).
        spin_after_run: with ``allow_spinning``, keep the pool spinning after a run returns
            (onnxruntime's own behaviour). Off: spinning stops when the run returns
            (``session.force_spinning_stop``), so a stage's idle pool does not take the cores
            from the next stage's session; it restarts with the session's next run.
        global_thread_pool: all sessions share one process-wide pool (set once per process,
            before the first session; later settings cannot change it).
        graph_optimization: ``disable`` | ``basic`` | ``extended`` | ``all``.
        io_binding: run through IOBinding on the workspace's preallocated buffers (no output
            allocation per stage); False uses ``session.run`` and copies outputs.
        small_batch_rows: when > 0, every stage gets a second session with
            ``small_batch_threads`` intra-op threads, used whenever at most this many rows are
            live (batch-1 streaming, the tail of a batch after most rows exited). Splitting one
            row's work over a pool costs a thread wake-up and a barrier per stage, more than it
            saves on small stages. Costs a second copy of each stage's weights in memory.
            With ``row_workers`` it is the other way round: the small-batch sessions may have a
            pool (``small_batch_threads=0``: one thread per core) for calls too small to split.
        small_batch_threads: intra-op threads of the small-batch sessions (0: onnxruntime's default).
        qdq_propagation: onnxruntime's QDQ propagation (``QDQPropagationTransformer``: it moves a
            QuantizeLinear up past MaxPool, Reshape, Transpose, ...). ``auto`` turns it off for a
            graph where an FP32 MaxPool feeds a QuantizeLinear (an INT8 ResNet's FP32 stem): there
            it turns the float MaxPool into a uint8 one that onnxruntime runs ~10x slower (measured:
            914 vs 92 us at batch 1 on ResNet-18's 112-px stem, docs/runtime.md "INT8"); ``on`` /
            ``off`` for every graph.
        row_workers: when > 1, a stage call on at least ``2 * row_min_rows`` live rows is split into
            up to this many chunks of consecutive rows that run at the same time, each on one
            thread, through the same session (no second copy of the weights); every session then
            has one intra-op thread, so a batch-1 call wakes no pool either. Data parallelism needs
            no barrier per operator, which onnxruntime's intra-op pool pays (measured in
            docs/runtime.md "Row workers"). 0 or 1: off (whole calls, ``intra_op_threads``).
        row_min_rows: the fewest rows a chunk of a split call gets.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = True
    spin_after_run: bool = False
    global_thread_pool: bool = False
    graph_optimization: str = field(default="all", metadata={"choices": _OPT_LEVELS})
    io_binding: bool = True
    small_batch_rows: int = 0
    small_batch_threads: int = 1
    qdq_propagation: str = field(default="auto", metadata={"choices": _QDQ_PROPAGATION})
    row_workers: int = 0
    row_min_rows: int = 1

    def __post_init__(self):
        if self.row_workers > 1:
            clash = ([f"intra_op_threads={self.intra_op_threads}"] if self.intra_op_threads > 1 else []) \
                + (["global_thread_pool=True"] if self.global_thread_pool else [])
            if clash:
                raise InputError(f"onnxruntime option row_workers={self.row_workers} runs every chunk on one "
                                 f"thread of its own and cannot be combined with {', '.join(clash)}",
                                 hint="drop those options (or set row_workers=0 for intra-op threads)")
            if self.row_min_rows < 1:
                raise InputError("onnxruntime option row_min_rows must be >= 1", hint="e.g. row_min_rows=1")

    @property
    def session_threads(self) -> int:
        """Intra-op threads of every session (1 with row workers; 0 = onnxruntime's default)."""
        return 1 if self.row_workers > 1 else self.intra_op_threads

    @property
    def small_batch(self) -> Optional["OrtSettings"]:
        """Settings of the small-batch sessions (None when they are off or would equal the main ones)."""
        if self.small_batch_rows <= 0 or self.small_batch_threads == self.session_threads \
                or self.global_thread_pool:
            return None
        return dataclasses.replace(self, intra_op_threads=self.small_batch_threads, small_batch_rows=0, row_workers=0)

    @classmethod
    def from_options(cls, options: Optional[Dict[str, Any]] = None, base: Optional["OrtSettings"] = None) -> "OrtSettings":
        """Settings from a dict (a target's ``[onnxruntime]`` table or ``Runtime.load`` keywords)."""
        return parse_settings(cls, options, "onnxruntime", base=base)
