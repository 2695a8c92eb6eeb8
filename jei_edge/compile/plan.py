"""Stage planning: where the model is cut into separately compiled stages.

For now every exit is a boundary: stage k holds the blocks between exit k-1 and exit k, ends
with exit k's IM and gate (in-graph), and the last stage ends with the backbone's head. A later
work item merges exits into one stage when a boundary costs more than it saves (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class StagePlan:
    index: int
    blocks: Tuple[int, int]  # half-open block range [start, end)
    exit: int  # exit taken by rows leaving at this stage (the final head for the last stage)
    gated: bool  # False for the last stage (no gate, outputs probs only)
    macs: int  # per-sample MACs of this stage (stem for stage 0, blocks, IM + gate or head)

    @property
    def input_name(self) -> str:
        return "x" if self.index == 0 else "hidden_in"

    @property
    def output_names(self) -> Tuple[str, ...]:
        return ("hidden_out", "probs", "gate") if self.gated else ("probs",)

    @property
    def file(self) -> str:
        return f"stages/stage{self.index}.onnx"


def plan_stages(model, costs: Dict) -> List[StagePlan]:
    """One stage per exit of ``model`` (a JEIModel); ``costs`` is its CostTable dict."""
    ranges = model.stage_ranges()
    exit_macs = [int(m) for m in costs["exit_macs"]]
    plans = []
    for k, (start, end) in enumerate(ranges):
        macs = exit_macs[k] - (exit_macs[k - 1] if k else 0)
        plans.append(StagePlan(index=k, blocks=(int(start), int(end)), exit=k, gated=k < len(ranges) - 1,
                               macs=int(macs)))
    return plans
