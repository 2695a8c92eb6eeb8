"""Exits: the gate (four softmax features -> Linear(4, 1) as multiply-add -> sigmoid) and the torch exit rule.

Everything is written with ONNX-exportable ops (log_softmax, exp, topk, reductions, where) so the
gate is computed inside every stage graph. Features are computed in float32 whatever the input
dtype, and detached: no gradient flows from a gate into its IM.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` logits -> ``[..., 4]``: p_max, entropy, margin, entropy of softmax(2z)."""
    z = logits.float()
    lp = torch.log_softmax(z, dim=-1)
    p = torch.exp(lp)
    lq = torch.log_softmax(2.0 * z, dim=-1)
    q = torch.exp(lq)
    top2 = torch.topk(p, 2, dim=-1).values
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    ent = -torch.where(p > 0, p * lp, zero).sum(-1)
    ent_q = -torch.where(q > 0, q * lq, zero).sum(-1)
    pmax = top2[..., 0]
    return torch.stack([pmax, ent, pmax - top2[..., 1], ent_q], dim=-1)


class Gate(nn.Module):
    """JEI-DNN gating module: ``Linear(4, 1)`` on the IM's softmax features; returns the gate logit."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, im_logits: torch.Tensor) -> torch.Tensor:
        # ``Linear(4, 1)`` written as multiply-add: the same value, and no FP32 GEMM in the stage
        # graph (TensorRT-RTX refuses any FP32 GEMM for Turing, even this one, inside FP16 stages)
        f = gate_features(im_logits.detach())
        w, b = self.linear.weight, self.linear.bias
        return (f * w[0].to(f.dtype)).sum(-1) + b[0].to(f.dtype)

    def extra_macs(self, inputs, output) -> int:
        """The Linear(4, 1)'s MACs (``jei_edge.model.costs``; the module itself is not called)."""
        return output.numel() * self.linear.in_features


def exit_levels_torch(g: torch.Tensor, offsets: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Torch twin of ``jei_edge.exit_rule.exit_levels``: ``g [N, G]`` -> levels ``[N]`` in ``0..G``."""
    n, n_gates = g.shape
    levels = torch.full((n,), n_gates, dtype=torch.long, device=g.device)
    live = torch.ones(n, dtype=torch.bool, device=g.device)
    S = torch.zeros(n, dtype=g.dtype, device=g.device)
    for l in range(n_gates):
        delta = 0.0 if offsets is None else float(offsets[l])
        fire = live & (g[:, l] >= (1.0 - S) * 0.5 + delta)
        levels[fire] = l
        live &= ~fire
        S = S + g[:, l]
    return levels
