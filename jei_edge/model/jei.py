"""The JEI-DNN model: a backbone with IMs and gates after chosen blocks.

Exit ``l`` (``0 <= l < G``) sits after block ``exits[l]`` and has an IM and a gate; exit ``G`` is
the backbone's own head after the last block and has no gate. ``forward`` computes every exit (for
training and evaluation); ``stage(k)`` gives the graph the compiler exports for stage ``k``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from jei_edge.model.backbone import BackboneSpec, build_backbone, normalize_exits
from jei_edge.model.exits import Gate


class JEIModel(nn.Module):
    def __init__(self, spec: BackboneSpec, exits: Optional[Sequence[int]] = None, config: Optional[Dict] = None):
        super().__init__()
        self.spec = spec
        self.config = dict(config or {})
        self.stem = spec.stem
        self.blocks = nn.ModuleList(spec.blocks)
        self.head = spec.head
        self.exits: List[int] = normalize_exits(exits, len(spec.blocks))
        self.ims = nn.ModuleList([spec.make_im(i) for i in self.exits])
        self.gates = nn.ModuleList([Gate() for _ in self.exits])
        self.input_shape: Tuple[int, int, int] = tuple(spec.input_shape)
        self.num_classes = spec.num_classes

    # -- structure -------------------------------------------------------------------------
    @property
    def num_gates(self) -> int:
        return len(self.exits)

    @property
    def num_exits(self) -> int:
        """Gated exits plus the final head."""
        return len(self.exits) + 1

    def stage_ranges(self) -> List[Tuple[int, int]]:
        """Half-open block ranges ``[start, end)`` of each stage (one stage per exit)."""
        bounds = [e + 1 for e in self.exits] + [len(self.blocks)]
        starts = [0] + bounds[:-1]
        return list(zip(starts, bounds))

    def backbone_parameters(self):
        for m in (self.stem, self.blocks, self.head):
            yield from m.parameters()

    def im_parameters(self):
        return self.ims.parameters()

    def gate_parameters(self):
        return self.gates.parameters()

    # -- compute ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits [B, G+1, C], gate_logits [B, G])`` for every exit."""
        h = self.stem(x)
        logits, gate_logits, j = [], [], 0
        for i, block in enumerate(self.blocks):
            h = block(h)
            if j < len(self.exits) and self.exits[j] == i:
                z = self.ims[j](h)
                logits.append(z)
                gate_logits.append(self.gates[j](z))
                j += 1
        logits.append(self.head(h))
        b = x.shape[0]
        gl = torch.stack(gate_logits, dim=1) if gate_logits else x.new_zeros((b, 0))
        return torch.stack(logits, dim=1), gl

    def stage(self, k: int, input_guard: bool = True) -> nn.Module:
        """Stage ``k`` as an exportable module (see ``StageModule``, also for ``input_guard``)."""
        return StageModule(self, k, input_guard=input_guard)

    def plain_backbone(self) -> nn.Module:
        """The backbone alone (no IMs, no gates) as one module: image -> probs."""
        return PlainBackbone(self)


class StageModule(nn.Module):
    """Stage k: ``x`` (k = 0) or ``hidden_in`` -> ``(hidden_out, probs, gate)``; the last stage -> ``probs``.

    ``gate`` is ``sigmoid(gate logit)`` of this stage's exit, computed in-graph in float32.

    **Input guard** (stage 0 with a gate): ``gate + 0 * sum(x_row)``. It leaves every gate value
    exactly as it was for a finite row (adding a signed zero) and makes the gate NaN for any row
    holding a NaN or an infinity (IEEE: ``0 * inf`` and anything with NaN is NaN), whatever the
    network itself does with such values (a ReLU maps -inf to 0). The runtime then checks the B
    gate values stage 0 produces instead of the B x C x H x W input values before the run.
    """

    def __init__(self, model: JEIModel, k: int, input_guard: bool = True):
        super().__init__()
        ranges = model.stage_ranges()
        if not 0 <= k < len(ranges):
            raise IndexError(f"stage {k} out of range (model has {len(ranges)} stages)")
        self.k, self.last = k, k == len(ranges) - 1
        start, end = ranges[k]
        self.stem = model.stem if k == 0 else None
        self.blocks = nn.ModuleList(model.blocks[start:end])
        self.out = model.head if self.last else model.ims[k]
        self.gate = None if self.last else model.gates[k]
        self.input_guard = bool(input_guard) and k == 0 and not self.last

    def forward(self, x):
        h = self.stem(x) if self.stem is not None else x
        for block in self.blocks:
            h = block(h)
        z = self.out(h)
        probs = torch.softmax(z.float(), dim=-1)
        if self.last:
            return probs
        gate = torch.sigmoid(self.gate(z))
        if self.input_guard:
            gate = gate + x.flatten(1).sum(1).float() * 0.0
        return h, probs, gate


class PlainBackbone(nn.Module):
    def __init__(self, model: JEIModel):
        super().__init__()
        self.stem, self.blocks, self.head = model.stem, model.blocks, model.head

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return torch.softmax(self.head(h).float(), dim=-1)


def build_model(config: Dict) -> JEIModel:
    """Rebuild a JEIModel from a checkpoint ``config`` (``backbone``, ``backbone_kwargs``, ``exits``)."""
    spec = build_backbone(config["backbone"], config.get("backbone_kwargs", {}))
    return JEIModel(spec, config.get("exits"), config=config)
