"""CUDA-graph batch bucketing, shared by every executor that captures graphs.

A graph is captured per (workspace, stage, bucket); ``n`` live rows replay the smallest bucket
>= n (rows n..bucket-1 are computed on stale but finite data and ignored: every stage op is
row-independent). Counts above ``graph_max_batch`` run without a graph.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple


def default_buckets(max_batch: int) -> Tuple[int, ...]:
    """1, 2, 4, 8, 16, then ~x1.25 steps rounded up to multiples of 8 (at most 25% padded rows),
    ending at ``max_batch``."""
    out = [b for b in (1, 2, 4, 8, 16) if b < max_batch]
    b = 16.0
    while True:
        b *= 1.25
        v = int(-(-int(b + 0.999) // 8) * 8)
        if v >= max_batch:
            break
        if v > out[-1]:
            out.append(v)
    out.append(max_batch)
    return tuple(out)


class Buckets:
    """The buckets of one executor: explicit ones or ``default_buckets``, capped at ``graph_max_batch``.

    Args:
        enabled: graphs on at all.
        graph_max_batch: the largest live-row count served by a graph.
        explicit: bucket sizes to use instead of the defaults.
    """

    def __init__(self, enabled: bool = True, graph_max_batch: int = 256, explicit: Optional[Sequence[int]] = None):
        self.enabled = bool(enabled)
        self.graph_max_batch = int(graph_max_batch)
        self.explicit = tuple(sorted(set(int(b) for b in explicit))) if explicit else None

    def sizes(self, capacity: int) -> Tuple[int, ...]:
        """The buckets a workspace of ``capacity`` rows captures."""
        top = min(capacity, self.graph_max_batch)
        b = self.explicit or default_buckets(top)
        return tuple(v for v in b if v <= top) or (top,)

    def bucket_for(self, n: int, capacity: int) -> Optional[int]:
        """The bucket that serves ``n`` live rows (None: run without a graph)."""
        if not self.enabled or n > min(capacity, self.graph_max_batch):
            return None
        for b in self.sizes(capacity):
            if b >= n:
                return b
        return None
