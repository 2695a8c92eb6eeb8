"""Exits: the gate (four softmax features -> Linear(4, 1) as multiply-add -> sigmoid) and the torch exit rule.

Everything is written with ONNX-exportable ops (log_softmax, exp, topk, clip, reductions) so the
gate is computed inside every stage graph. Features are computed in float32 whatever the input
dtype, and detached: no gradient flows from a gate into its IM.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


# log-probabilities are clamped to the most negative float32 before ``p * log p``: a class whose
# logit is -inf has ``p = 0`` and ``log p = -inf``, and ``0 * -inf`` would be NaN (the numpy
# reference masks them instead; both give 0 for that term and the same value for every other one)
_LOG_FLOOR = float(torch.finfo(torch.float32).min)
# the multipliers of the logits for softmax(z) (probs, p_max, margin, entropy) and softmax(2z)
# (the fourth gate feature)
_TEMPERATURES = torch.tensor([[1.0], [2.0]])


def _softmax_and_features(logits: torch.Tensor):
    """``(p [..., C], u [..., 4])`` in float32, with ``u = (p_top1, p_top2, -entropy, -entropy_sq)``.

    One ``log_softmax`` (of ``z`` and ``2z`` stacked) gives both the exit's probabilities and the
    features, and the four gate features are a fixed linear map of ``u``, so a gate needs no
    per-feature subtraction or negation, and no ``where``, in the stage graph: a stage's exported
    exit head (IM, gate, probs) went from 47 to 28 and then 25 ONNX nodes (ViT) and 46 to 25 and
    then 23 (ResNet); its cost in onnxruntime is measured by ``benchmarks/exit_head_cost.py``
    (docs/runtime.md).
    """
    z = logits.float()
    # z and 2z side by side ([..., 2, C]): one log_softmax, exp, clip, product and sum serve both
    # softmaxes (25 instead of 28 exported exit-head nodes for the ViT, 23 instead of 25 for the
    # ResNet; docs/runtime.md has what that measured)
    zz = z.unsqueeze(-2) * _TEMPERATURES.to(z.device)
    lp = torch.log_softmax(zz, dim=-1)
    pp = torch.exp(lp)
    neg_ents = (pp * lp.clamp(min=_LOG_FLOOR)).sum(-1)
    p = pp[..., 0, :]
    return p, torch.cat([torch.topk(p, 2, dim=-1).values, neg_ents], dim=-1)


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` logits -> ``[..., 4]``: p_max, entropy, margin, entropy of softmax(2z)."""
    u = _softmax_and_features(logits)[1]
    return torch.stack([u[..., 0], -u[..., 2], u[..., 0] - u[..., 1], -u[..., 3]], dim=-1)


class Gate(nn.Module):
    """JEI-DNN gating module: ``Linear(4, 1)`` on the IM's softmax features; returns the gate logit."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, im_logits: torch.Tensor) -> torch.Tensor:
        return self.probs_and_logit(im_logits)[1]

    def probs_and_logit(self, im_logits: torch.Tensor):
        """``(softmax(im_logits) [..., C], gate logit [...])`` from one shared ``log_softmax``.

        ``w . (p_max, entropy, margin, entropy_sq) + b`` is computed as ``w' . u + b`` on
        ``u = (p_top1, p_top2, -entropy, -entropy_sq)`` with ``w' = (w0 + w2, -w2, -w1, -w3)``
        (the same value; ``w'`` folds into constants in the exported graph). Written as
        multiply-add, not a GEMM: TensorRT-RTX refuses any FP32 GEMM for Turing, even this one,
        inside FP16 stages. The features are detached: no gradient flows from a gate into its IM.
        """
        p, u = _softmax_and_features(im_logits.detach())
        w, b = self.linear.weight[0].to(u.dtype), self.linear.bias[0].to(u.dtype)
        w_u = torch.stack([w[0] + w[2], -w[2], -w[1], -w[3]])
        return p, (u * w_u).sum(-1) + b

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
