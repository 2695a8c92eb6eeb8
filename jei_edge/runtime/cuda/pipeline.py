"""Micro-batch pipelining across CUDA streams.

A ``CudaPipeline`` holds several *lanes*, each a ``CudaWorkspace`` with its own compute and copy
streams, buffers and (torch) CUDA graphs, all sharing one executor and its weights. A large input is
split into micro-batches; lane ``i`` runs micro-batches ``i, i + L, i + 2L, ...`` through the very
same conditional loop (``run_conditional``) on its own host thread. While one lane's host thread
waits for a survivor count (the per-boundary sync) or copies a micro-batch in or out, the other
lanes keep the GPU busy: copy-in, stage execution and copy-out of different micro-batches overlap.
Host waits (event synchronisation) release the GIL.
"""

from __future__ import annotations

import queue
import threading
from typing import List, Optional, Sequence

from jei_edge.errors import InputError
from jei_edge.runtime.loop import Results, run_conditional


class CudaPipeline:
    """Run inputs of any size through ``executor`` on several lanes (``CudaWorkspace``s).

    Args:
        executor: the shared StageExecutor (prepared for every lane).
        workspaces: one per lane.
    """

    def __init__(self, executor, workspaces: Sequence):
        if not workspaces:
            raise InputError("a CUDA pipeline needs at least one lane")
        self.executor = executor
        self.lanes = list(workspaces)
        self.max_batch = min(ws.max_batch for ws in self.lanes)
        # One long-lived thread per lane (not a pool): lanes must run concurrently, and each lane
        # keeps its thread-local CUDA context / PyTorch stream state.
        self._inbox = [queue.Queue() for _ in self.lanes]
        self._done: "queue.Queue" = queue.Queue()
        self._threads = []
        if len(self.lanes) > 1:
            for i in range(len(self.lanes)):
                t = threading.Thread(target=self._serve, args=(i,), name=f"jei-cuda-lane{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def _serve(self, lane: int) -> None:
        while True:
            job = self._inbox[lane].get()
            if job is None:
                return
            try:
                self._done.put((lane, self._lane_work(lane, *job), None))
            except BaseException as exc:  # re-raised on the calling thread
                self._done.put((lane, None, exc))

    @property
    def kernel_launches(self) -> int:
        return sum(ws.kernel_launches for ws in self.lanes)

    @property
    def boundaries(self) -> int:
        return sum(ws.boundaries for ws in self.lanes)

    def _lane_work(self, lane: int, x, chunks, mode: str, offsets) -> List:
        ws = self.lanes[lane]
        out = []
        for i in range(lane, len(chunks), len(self.lanes)):
            a, b = chunks[i]
            out.append((i, run_conditional(self.executor, ws, x[a:b], mode, offsets)))
        return out

    def run(self, x, mode: str = "exit", offsets: Optional[Sequence[float]] = None,
            micro_batch: Optional[int] = None) -> Results:
        """Results of every row of ``x``, in input order (micro-batches of ``micro_batch`` rows)."""
        n = len(x)
        if n == 0:
            raise InputError("input 'x' has no rows")
        mb = int(micro_batch or self.max_batch)
        if not 1 <= mb <= self.max_batch:
            raise InputError(f"micro_batch={mb} is outside 1..{self.max_batch} (the lanes' max_batch)")
        chunks = [(a, min(a + mb, n)) for a in range(0, n, mb)]
        used = min(len(self.lanes), len(chunks))
        if used == 1:  # one lane, or one micro-batch: stay on the calling thread
            parts = [run_conditional(self.executor, self.lanes[0], x[a:b], mode, offsets) for a, b in chunks]
            return parts[0] if len(parts) == 1 else Results.concat(parts)
        for i in range(used):
            self._inbox[i].put((x, chunks, mode, offsets))
        parts: List = [None] * len(chunks)
        error = None
        for _ in range(used):
            _, out, exc = self._done.get()
            if exc is not None:
                error = error or exc
                continue
            for i, r in out:
                parts[i] = r
        if error is not None:
            raise error
        return Results.concat(parts)

    def close(self) -> None:
        for q in self._inbox:
            q.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        for ws in self.lanes:
            self.executor.release(ws)
            ws.close()
