"""Stage planning: where the model is cut into separately compiled stages.

By default every exit is a boundary: stage k holds the blocks between exit k-1 and exit k, ends
with exit k's IM and gate (in-graph), and the last stage ends with the backbone's head. A plan
can also **merge** consecutive exits into one stage (docs/runtime.md, "Stage planning"): the stage then
evaluates every IM and gate of its exits in-graph (``probs [B, E, C]``, ``gate [B, E]``) and the
runtime applies the exit rule to them in order after the stage, so the earliest exit that fires
wins and predictions equal the unmerged model's; only the compute spent on rows that leave
inside the stage differs. ``jei_edge.compile.planning`` chooses groups from measured stage times
and exit statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class StagePlan:
    index: int
    blocks: Tuple[int, int]  # half-open block range [start, end)
    exits: Tuple[int, ...]  # the exits inside this stage, in order (one in the default plan)
    last: bool  # ends with the backbone's final head (no hidden_out)
    macs: int  # per-sample MACs of this stage (stem for stage 0, blocks, IMs + gates or head)

    @property
    def exit(self) -> int:
        """The exit at the stage's end (the final head for the last stage)."""
        return self.exits[-1]

    @property
    def gated(self) -> bool:
        """Whether rows leave through a boundary after this stage (it has ``hidden_out``)."""
        return not self.last

    @property
    def gates(self) -> Tuple[int, ...]:
        """Gate indices evaluated in this stage (every exit but the final head)."""
        return self.exits[:-1] if self.last else self.exits

    @property
    def input_name(self) -> str:
        return "x" if self.index == 0 else "hidden_in"

    @property
    def output_names(self) -> Tuple[str, ...]:
        if not self.last:
            return ("hidden_out", "probs", "gate")
        return ("probs", "gate") if len(self.exits) > 1 else ("probs",)

    @property
    def file(self) -> str:
        return f"stages/stage{self.index}.onnx"


def parse_groups(text: str, num_exits: int) -> List[Tuple[int, ...]]:
    """``"0-3,4,5"`` -> ``[(0, 1, 2, 3), (4,), (5,)]``: consecutive exit ranges covering ``0..num_exits-1``."""
    from jei_edge.errors import InputError

    groups = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            a, _, b = part.partition("-")
            lo, hi = int(a), int(b) if b else int(a)
        except ValueError as exc:
            raise InputError(f"stage plan '{text}': '{part}' is not an exit index or range") from exc
        groups.append(tuple(range(lo, hi + 1)))
    flat = [e for g in groups for e in g]
    if flat != list(range(num_exits)) or any(not g for g in groups):
        raise InputError(f"stage plan '{text}' must split exits 0..{num_exits - 1} into consecutive ranges, in order",
                         hint=f"e.g. '0-{max(num_exits - 3, 0)},{max(num_exits - 2, 0)},{num_exits - 1}' or 'every'")
    return groups


def plan_stages(model, costs: Dict, groups: Optional[Sequence[Sequence[int]]] = None) -> List[StagePlan]:
    """Stages of ``model`` (a JEIModel; ``costs`` its CostTable dict): one per exit, or one per
    group of consecutive exits (``groups``, e.g. from ``parse_groups`` or ``planning.auto_groups``)."""
    ranges = model.stage_ranges()
    exit_macs = [int(m) for m in costs["exit_macs"]]
    if groups is None:
        groups = [(k,) for k in range(len(ranges))]
    plans = []
    for k, group in enumerate(groups):
        a, b = int(group[0]), int(group[-1])
        macs = exit_macs[b] - (exit_macs[a - 1] if a else 0)
        plans.append(StagePlan(index=k, blocks=(int(ranges[a][0]), int(ranges[b][1])),
                               exits=tuple(range(a, b + 1)), last=b == len(ranges) - 1, macs=int(macs)))
    return plans
