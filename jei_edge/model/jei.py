"""The JEI-DNN model: a backbone with IMs and gates after chosen blocks.

Exit ``l`` (``0 <= l < G``) sits after block ``exits[l]`` and has an IM and a gate; exit ``G`` is
the backbone's own head after the last block and has no gate. ``forward`` computes every exit (for
training and evaluation); ``stage(k)`` gives the graph the compiler exports for stage ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from jei_edge.model.backbone import BackboneSpec, build_backbone, normalize_exits
from jei_edge.model.exits import Gate, gate_features


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

    def stage(self, k: int, input_guard: bool = True, last_exit: Optional[int] = None) -> nn.Module:
        """The exportable stage of exit ``k`` (or of exits ``k..last_exit``, merged; see ``StageModule``)."""
        return StageModule(self, k, input_guard=input_guard, last_exit=last_exit)

    def plain_backbone(self) -> nn.Module:
        """The backbone alone (no IMs, no gates) as one module: image -> probs."""
        return PlainBackbone(self)


def half_precision(model: JEIModel) -> JEIModel:
    """A copy of ``model`` that computes in FP16, for FP16 stage graphs.

    The stem, blocks, IMs and head run in FP16; what decides exits stays FP32: the gates (their
    softmax features are computed from ``logits.float()``, their weights are FP32), every
    ``probs`` softmax (``StageModule`` casts logits to float32 first) and the input guard, which
    reads the float32 input before the stage casts it to FP16. Hidden states between stages are FP16.
    """
    import copy

    half = copy.deepcopy(model).half().requires_grad_(False).eval()
    for gate in half.gates:
        gate.float()
    return half


class StageModule(nn.Module):
    """The stage holding exits ``first..last`` (one exit: ``first == last``, the default plan).

    Input ``x`` (when it starts at exit 0) or ``hidden_in``. Outputs:

    - one exit, not the final head: ``(hidden_out, probs [B, C], gate [B])``;
    - the final head alone: ``probs [B, C]``;
    - several exits (a merged stage, see ``jei_edge.compile.plan``): ``(hidden_out, probs [B, E, C],
      gate [B, E])``, or without ``hidden_out`` and with ``E - 1`` gates when it ends with the
      final head. Every IM and gate of the span is still evaluated in-graph, so the earliest exit
      that fires decides exactly as in the unmerged model.

    ``gate`` is ``sigmoid(gate logit)``, computed in-graph in float32.

    **Input guard** (the stage starting at exit 0, when it has a gate): ``gate + 0 * sum(x_row)``
    on its first gate. It leaves every gate value exactly as it was for a finite row (adding a
    signed zero) and makes the gate NaN for any row holding a NaN or an infinity (IEEE: ``0 * inf``
    and anything with NaN is NaN), whatever the network itself does with such values (a ReLU maps
    -inf to 0). The runtime then checks the B gate values stage 0 produces instead of the
    B x C x H x W input values before the run.
    """

    def __init__(self, model: JEIModel, k: int, input_guard: bool = True, last_exit: Optional[int] = None):
        super().__init__()
        ranges = model.stage_ranges()
        last_exit = k if last_exit is None else int(last_exit)
        if not 0 <= k <= last_exit < len(ranges):
            raise IndexError(f"exits {k}..{last_exit} out of range (model has {len(ranges)} exits)")
        self.k, self.last = k, last_exit == len(ranges) - 1
        self.exits = tuple(range(k, last_exit + 1))
        self.merged = len(self.exits) > 1
        self.stem = model.stem if k == 0 else None
        self.parts = nn.ModuleList(nn.ModuleList(model.blocks[ranges[j][0]:ranges[j][1]]) for j in self.exits)
        self.outs = nn.ModuleList(model.head if j == len(ranges) - 1 else model.ims[j] for j in self.exits)
        self.gates = nn.ModuleList(model.gates[j] for j in self.exits if j < len(ranges) - 1)
        self.input_guard = bool(input_guard) and k == 0 and len(self.gates) > 0

    def forward(self, x):
        # an FP16 stage (``half_model``) takes the float32 model input and casts it after the input
        # guard has read it in float32; hidden states arrive in the stage's own dtype
        h = self.stem(x.to(next(self.stem.parameters()).dtype)) if self.stem is not None else x
        probs, gates = [], []
        for j, (blocks, out) in enumerate(zip(self.parts, self.outs)):
            for block in blocks:
                h = block(h)
            z = out(h)
            if j < len(self.gates):  # the exit's probs and its gate share one log_softmax
                p, gate_logit = self.gates[j].probs_and_logit(z)
                probs.append(p)
                gate = torch.sigmoid(gate_logit)
                if j == 0 and self.input_guard:
                    gate = gate + x.flatten(1).sum(1).float() * 0.0
                gates.append(gate)
            else:
                probs.append(torch.softmax(z.float(), dim=-1))
        if not self.merged:
            return probs[0] if self.last else (h, probs[0], gates[0])
        p, g = torch.stack(probs, dim=1), torch.stack(gates, dim=1)
        return (p, g) if self.last else (h, p, g)


class PlainBackbone(nn.Module):
    def __init__(self, model: JEIModel):
        super().__init__()
        self.stem, self.blocks, self.head = model.stem, model.blocks, model.head

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return torch.softmax(self.head(h).float(), dim=-1)


@dataclass(frozen=True)
class ExitDecisions:
    """The PyTorch model's exit decisions on some inputs (the numpy exit rule on its gates).

    Attributes:
        levels: ``[N]`` int64 exit index of every row (``G`` = the final head).
        gates: ``[N, G]`` float64 gate values (sigmoid of the gate logits in float32, as in the
            exported stage graphs, then widened).
        margin: ``[N, G]`` float64 ``g - threshold`` at every gate a row reached (NaN after it left).
        probs: ``[N, C]`` float32 probabilities at each row's exit (None unless asked for).
        full_probs: ``[N, C]`` float32 probabilities of the final head (None unless asked for).
    """

    levels: np.ndarray
    gates: np.ndarray
    margin: np.ndarray
    probs: Optional[np.ndarray] = None
    full_probs: Optional[np.ndarray] = None

    def reach(self, num_exits: int) -> np.ndarray:
        """``reach[i]``: the fraction of rows whose exit level is >= i, for exits ``0..num_exits-1``."""
        return np.array([float(np.mean(self.levels >= i)) for i in range(num_exits)])


def exit_decisions(model: JEIModel, x: np.ndarray, batch: int = 256, offsets: Optional[Sequence[float]] = None,
                   probs: bool = False, progress: Optional[Callable[[int], None]] = None) -> ExitDecisions:
    """Run ``model`` on ``x`` in batches and apply ``jei_edge.exit_rule.exit_levels`` to its gates.

    Args:
        model: a JEIModel (put in eval mode; no gradients are kept).
        x: ``[N, C, H, W]`` float32 model inputs.
        batch: rows per forward pass.
        offsets: per-gate threshold offsets (default 0 = the trained model).
        probs: also return the probabilities at each row's exit and of the final head.
        progress: called with the number of rows done after every batch (progress bars).

    Returns:
        ``ExitDecisions``.
    """
    from jei_edge.exit_rule import exit_levels

    model.eval().requires_grad_(False)
    x = np.ascontiguousarray(x, dtype=np.float32)
    gates, at_exit, final = [], [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits, gate_logits = model(torch.from_numpy(x[i:i + batch]))
            g = torch.sigmoid(gate_logits).numpy().astype(np.float64)
            gates.append(g)
            if probs:
                p = torch.softmax(logits.float(), dim=-1).numpy()
                rows = np.arange(len(p))
                at_exit.append(p[rows, exit_levels(g, offsets)])
                final.append(p[:, -1])
            if progress is not None:
                progress(len(g))
    g = np.concatenate(gates) if gates else np.zeros((0, model.num_gates))
    levels, margin = exit_levels(g, offsets, return_margin=True)
    if not probs:
        return ExitDecisions(levels, g, margin)
    none = np.zeros((0, model.num_classes), np.float32)
    return ExitDecisions(levels, g, margin, np.concatenate(at_exit or [none]), np.concatenate(final or [none]))


def build_model(config: Dict) -> JEIModel:
    """Rebuild a JEIModel from a checkpoint ``config`` (``backbone``, ``backbone_kwargs``, ``exits``)."""
    spec = build_backbone(config["backbone"], config.get("backbone_kwargs", {}))
    return JEIModel(spec, config.get("exits"), config=config)


def confidence_gates(model: JEIModel, x: torch.Tensor, quantiles: Sequence[float], sharpen: float = 8.0) -> JEIModel:
    """Give an **untrained** model gates that fire on a spread of inputs (tests, speed benchmarks).

    Timing a model does not need trained weights, but it needs exits that differ from input to
    input. The weights of each IM's last Linear are scaled by ``sharpen`` (so p_max varies between inputs), and gate l
    becomes ``sigmoid(w (p_max - q_l))`` with ``q_l`` the ``quantiles[l]`` quantile (the last
    value repeats) of p_max at exit l on ``x``. Returns ``model`` (changed in place, eval mode).
    """
    model.eval()
    with torch.no_grad():
        for im in model.ims:
            linears = [m for m in im.modules() if isinstance(m, nn.Linear)]
            linears[-1].weight.mul_(sharpen)
        logits, _ = model(x)
        for j, gate in enumerate(model.gates):
            pm = gate_features(logits[:, j])[:, 0]
            w = 6.0 / float(pm.std().clamp_min(1e-3))
            q = float(torch.quantile(pm, float(quantiles[min(j, len(quantiles) - 1)])))
            gate.linear.weight.copy_(torch.tensor([[w, 0.0, 0.0, 0.0]]))
            gate.linear.bias.fill_(-w * q)
    return model
