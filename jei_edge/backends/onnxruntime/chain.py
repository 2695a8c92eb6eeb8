"""Every stage graph of a bundle on every row (no exits): what each stage reads and writes.

``chain_stages`` feeds stage 0 the inputs and stage k > 0 stage k-1's ``hidden_out`` on the
same rows, through onnxruntime. It is not a way to run a bundle (``Runtime`` does that, with
early exit); it is what per-stage comparisons (``jei-edge selftest``) and the offsets search of
``jei-edge tune`` need: every exit's gate and probabilities for every sample.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np


def chain_stages(bundle, x: np.ndarray, batch: int = 256, settings=None) -> List[Tuple[Dict, Dict]]:
    """``[(feed, outputs)]`` per stage on the rows ``x``; arrays keep the graphs' dtypes.

    Args:
        bundle: an opened ``Bundle``.
        x: model inputs ``[N, ...]`` (float32).
        batch: rows per session call.
        settings: ``OrtSettings`` (default: defaults).
    """
    from jei_edge.backends.onnxruntime import OrtSettings
    from jei_edge.backends.onnxruntime.executor import create_session

    settings = settings or OrtSettings()
    out, h = [], np.ascontiguousarray(x, dtype=np.float32)
    for s in bundle.manifest.stages:
        sess = create_session(bundle.file(s.file), settings, f"stage {s.index}",
                              built_with=bundle.manifest.toolchain)
        names = [t.name for t in s.outputs]
        feed = {s.input.name: np.ascontiguousarray(h.astype(s.input.dtype, copy=False))}
        parts = [sess.run(names, {s.input.name: feed[s.input.name][i:i + batch]})
                 for i in range(0, len(h), batch)]
        outs = {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}
        out.append((feed, outs))
        if s.gated:
            h = outs["hidden_out"]
    return out


def exit_outputs(bundle, x: np.ndarray, batch: int = 256,
                 chain: Optional[List[Tuple[Dict, Dict]]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Every exit's gate and probabilities on every row: ``(gates [N, G], probs [N, E, C])``
    (merged stages contribute one column per exit they hold)."""
    chain = chain if chain is not None else chain_stages(bundle, x, batch)
    gates, probs = [], []
    for s, (_, outs) in zip(bundle.manifest.stages, chain):
        p = outs["probs"].astype(np.float32, copy=False)
        probs.append(p[:, None, :] if p.ndim == 2 else p)
        if "gate" in outs:
            g = outs["gate"].astype(np.float32, copy=False)
            gates.append(g[:, None] if g.ndim == 1 else g)
    n = len(x)
    g = np.concatenate(gates, axis=1) if gates else np.zeros((n, 0), np.float32)
    return g, np.concatenate(probs, axis=1)
