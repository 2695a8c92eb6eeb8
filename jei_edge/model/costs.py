"""Per-exit cost in MACs, counted from the real modules with forward hooks.

Counted: ``nn.Linear`` (out elements x in_features), ``nn.Conv2d`` (out elements x in/groups x
kernel area) and any module with an ``extra_macs(inputs, output)`` method (e.g. attention
matmuls). Norms, activations and softmax count 0 (the usual MAC convention). Per sample (batch 1).

Definitions (docs/architecture.md): cost of exit l = MACs to reach and take exit l (blocks up to l, plus
every IM and gate evaluated on the way) / MACs of the full model with all IMs and gates; also
reported relative to the plain backbone (stem + blocks + head).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List

import torch
from torch import nn


@dataclass
class CostTable:
    stem_macs: int
    block_macs: List[int]
    im_macs: List[int]
    gate_macs: List[int]
    head_macs: int
    exit_macs: List[int]  # MACs to reach and take each exit (G gated + final)
    full_macs: int  # backbone + all IMs + all gates
    plain_macs: int  # backbone only
    cost: List[float]  # exit_macs / full_macs
    cost_vs_plain: List[float]  # exit_macs / plain_macs

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "CostTable":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _module_macs(module: nn.Module, run) -> int:
    total = [0]

    def hook(m, inputs, output):
        if isinstance(m, nn.Linear):
            total[0] += output.numel() * m.in_features
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            total[0] += output.numel() * (m.in_channels // m.groups) * k
        extra = getattr(m, "extra_macs", None)
        if callable(extra):
            total[0] += int(extra(inputs, output))

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return total[0], out


@torch.no_grad()
def count_costs(model) -> CostTable:
    """Count MACs per part of ``model`` (a JEIModel) for one sample of its input shape."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros((1,) + tuple(model.input_shape))
        stem, h = _module_macs(model.stem, lambda: model.stem(x))
        blocks, hiddens = [], []
        for b in model.blocks:
            m, h = _module_macs(b, lambda b=b, h=h: b(h))
            blocks.append(m)
            hiddens.append(h)
        ims, gates = [], []
        for j, i in enumerate(model.exits):
            m, z = _module_macs(model.ims[j], lambda j=j, i=i: model.ims[j](hiddens[i]))
            ims.append(m)
            g, _ = _module_macs(model.gates[j], lambda j=j, z=z: model.gates[j](z))
            gates.append(g)
        head, _ = _module_macs(model.head, lambda: model.head(hiddens[-1]))
    finally:
        model.train(was_training)
    plain = stem + sum(blocks) + head
    full = plain + sum(ims) + sum(gates)
    exit_macs = []
    for j, i in enumerate(model.exits):
        exit_macs.append(stem + sum(blocks[: i + 1]) + sum(ims[: j + 1]) + sum(gates[: j + 1]))
    exit_macs.append(full)
    return CostTable(
        stem_macs=stem, block_macs=blocks, im_macs=ims, gate_macs=gates, head_macs=head,
        exit_macs=exit_macs, full_macs=full, plain_macs=plain,
        cost=[m / full for m in exit_macs], cost_vs_plain=[m / plain for m in exit_macs],
    )
