"""Frozen-backbone features for the IM and gate phases.

Once the backbone is frozen (JEI-DNN phases 2 and 3), the hidden state after every exit block and
the final head's logits never change, so they are computed once per split and kept in memory
(below ``limit_mb``; above it they are recomputed per batch). IMs and gates then train on them.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def backbone_pass(model, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """``x`` -> (hidden state after each gated exit's block, final-head logits)."""
    h = model.stem(x)
    wanted = {b: j for j, b in enumerate(model.exits)}
    hs: List[torch.Tensor] = [None] * len(model.exits)  # type: ignore[list-item]
    for i, block in enumerate(model.blocks):
        h = block(h)
        if i in wanted:
            hs[wanted[i]] = h
    return hs, model.head(h)


def freeze_backbone(model) -> None:
    """No gradients and eval mode (frozen BatchNorm statistics) for stem, blocks and head."""
    for p in model.backbone_parameters():
        p.requires_grad_(False)
    for m in (model.stem, model.blocks, model.head):
        m.eval()


def heads_train_mode(model, on: bool) -> None:
    """Train/eval mode for IMs and gates only; the backbone always stays in eval mode."""
    model.ims.train(on)
    model.gates.train(on)


class FrozenFeatures:
    """Per-split hidden states at the exits + final logits of a frozen backbone."""

    def __init__(self, model, x: np.ndarray, batch_size: int = 256, limit_mb: int = 1024):
        self.model = model
        self.x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        self.n = len(self.x)
        self.cached = False
        self.hs: List[torch.Tensor] = []
        self.final: torch.Tensor | None = None
        if self.n == 0:
            return
        probe, _ = backbone_pass(model, self.x[:1])
        per_sample = sum(h.numel() for h in probe) * 4
        if per_sample * self.n / 2 ** 20 <= limit_mb:
            parts = [backbone_pass(model, self.x[i:i + batch_size]) for i in range(0, self.n, batch_size)]
            self.hs = [torch.cat([p[0][j] for p in parts]) for j in range(len(model.exits))]
            self.final = torch.cat([p[1] for p in parts])
            self.cached = True

    def batch(self, idx: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        if self.cached:
            return [h[idx] for h in self.hs], self.final[idx]
        return backbone_pass(self.model, self.x[idx])

    def batches(self, batch_size: int):
        for i in range(0, self.n, batch_size):
            yield self.batch(torch.arange(i, min(i + batch_size, self.n)))


def im_logits(ims: nn.ModuleList, hs: List[torch.Tensor]) -> List[torch.Tensor]:
    return [im(h) for im, h in zip(ims, hs)]


@torch.no_grad()
def exit_outputs(model, feats: FrozenFeatures, batch_size: int = 512) -> Tuple[np.ndarray, np.ndarray]:
    """All exits' logits ``[N, G+1, C]`` and gate outputs (sigmoid) ``[N, G]`` as numpy float32."""
    was = model.ims.training
    heads_train_mode(model, False)
    logits, gates = [], []
    for hs, final in feats.batches(batch_size):
        zs = im_logits(model.ims, hs)
        gl = [gate(z) for gate, z in zip(model.gates, zs)]
        logits.append(torch.stack(zs + [final], dim=1))
        gates.append(torch.sigmoid(torch.stack(gl, dim=1)) if gl else final.new_zeros((len(final), 0)))
    heads_train_mode(model, was)
    return torch.cat(logits).numpy(), torch.cat(gates).numpy()
