"""INT8 per-stage FP32 fallback: keep the fewest stages in FP32 that hold the exit-decision floor.

An INT8 build must keep ``min_agreement`` of its exit decisions equal to the FP32 model's (checked
by ``verify`` on the real held-out inputs, the test split). When quantizing every stage breaks
that floor, it is usually one or two stages whose rounding moves the gates of every later exit
(measured: the ViT-S/16-size benchmark model agreed on 92.67% of its held-out inputs fully
quantized, on 98.33% with its first stage in FP32). ``choose_fp32_stages`` finds them before
the bundle is written, in the manner of accuracy-aware quantization tools:

1. the exit decisions of the fully quantized stages on the **calibration inputs** (the
   calibration and validation splits, never the test split the floor is checked on; when that
   split is too small for the floor to be held on it alone, verify holds it on every parity input,
   synthetic kinds included, and the search adds as many synthetic inputs of those kinds) against
   the FP32 PyTorch model's; at or above ``target`` (``search_target``: the floor plus two
   standard errors of the agreement measured on those inputs, at least ``MIN_MARGIN``, since the
   floor is then checked on other inputs) nothing changes;
2. else each stage alone back in FP32 (the others INT8), and the stages ranked by the agreement
   that gives (ties: the cheaper stage first);
3. stages go back to FP32 in that order until the agreement reaches ``target``.

Mixed configurations run the stage graphs in onnxruntime exactly as exported (both precisions
read and write FP32 hidden states at this point: the edges are quantized afterwards), in chunks
of rows, the shared INT8 prefix of each single-stage candidate run once. The plain backbone stays
fully INT8 (it is the baseline a user would quantize themselves). The choice, every agreement
measured and the time it took are in the quantization record (manifest, build report). On
TensorRT targets the graphs searched are their symmetric Q/DQ graphs, and a stage kept FP32 gets
an FP32 engine (``jei_edge.compile.lower.stage_precision``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from jei_edge.errors import BuildError
from jei_edge.exit_rule import exit_levels

MODES = ("auto", "off")
MIN_MARGIN = 0.01  # the search aims at least this far above the floor (search_target)
CHUNK = 64  # rows per run of a stage during the search (bounds the hidden states held)


def search_target(floor: float, n: int) -> float:
    """The agreement the search must reach on ``n`` inputs for a floor of ``floor`` to hold on
    others: ``floor + max(MIN_MARGIN, 2 * sqrt(floor * (1 - floor) / n))``, at most 1 (two standard
    errors of a measured agreement near the floor: 1.9 points for 0.95 on 512 inputs)."""
    import math

    return min(1.0, floor + max(MIN_MARGIN, 2.0 * math.sqrt(floor * (1.0 - floor) / max(1, n))))


class MixedStages:
    """The stage graphs of one build in both precisions, run with a per-stage choice.

    Args:
        fp32: the FP32 stage graph of every stage; ``int8``: its quantized graph.
        input_names: each stage graph's input name.
        settings: ``OrtSettings`` for the sessions.
    """

    def __init__(self, fp32: Sequence[Path], int8: Sequence[Path], input_names: Sequence[str], settings):
        from jei_edge.backends.onnxruntime.executor import create_session

        self.names = list(input_names)
        self.sessions = [[create_session(p, settings, f"stage {k} (FP32)") for k, p in enumerate(fp32)],
                         [create_session(p, settings, f"stage {k} (INT8)") for k, p in enumerate(int8)]]
        self.outputs = [[o.name for o in s.get_outputs()] for s in self.sessions[0]]

    def __len__(self) -> int:
        return len(self.names)

    def stage(self, k: int, fp32: bool, h: np.ndarray) -> Tuple[Optional[np.ndarray], np.ndarray]:
        """``(hidden_out or None, gates [rows, G_k])`` of stage ``k`` on ``h``."""
        sess = self.sessions[0 if fp32 else 1][k]
        out = dict(zip(self.outputs[k], sess.run(None, {self.names[k]: h})))
        g = out.get("gate")
        return out.get("hidden_out"), (np.zeros((len(h), 0)) if g is None else g.reshape(len(h), -1))

    def levels(self, config: Sequence[bool], x: np.ndarray, start: int = 0,
               prefix: Optional[Tuple[np.ndarray, List[np.ndarray]]] = None) -> np.ndarray:
        """Exit levels (offsets 0) of rows ``x`` with stage ``k`` in FP32 where ``config[k]``;
        ``prefix`` = (input of stage ``start``, gates of stages before it) skips what is shared."""
        h, gates = (x, []) if prefix is None else (prefix[0], list(prefix[1]))
        for k in range(start, len(self)):
            h, g = self.stage(k, config[k], h)
            gates.append(g)
        return exit_levels(np.concatenate(gates, axis=1))

    def agreements(self, configs: Sequence[Sequence[bool]], base: Sequence[bool], x: np.ndarray, ref: np.ndarray,
                   update: Callable[[int], None] = lambda n: None) -> Tuple[float, List[float]]:
        """Agreement with ``ref`` of ``base`` and of each of ``configs`` (each differing from
        ``base`` from its first differing stage on: the shared prefix runs once per chunk)."""
        hits, agree = 0, np.zeros(len(configs))
        firsts = [next((k for k in range(len(self)) if c[k] != base[k]), len(self)) for c in configs]
        for s in range(0, len(x), CHUNK):
            xc, rc = x[s:s + CHUNK], ref[s:s + CHUNK]
            inputs, gates, h = [], [], xc
            for k in range(len(self)):  # the base configuration, keeping each stage's input
                inputs.append(h)
                h, g = self.stage(k, base[k], h)
                gates.append(g)
            base_levels = exit_levels(np.concatenate(gates, axis=1))
            hits += int((base_levels == rc).sum())
            for i, (c, j) in enumerate(zip(configs, firsts)):
                lv = base_levels if j == len(self) else self.levels(c, xc, j, (inputs[j], gates[:j]))
                agree[i] += int((lv == rc).sum())
            update(len(xc))
        return hits / len(x), (agree / len(x)).tolist()


def choose_fp32_stages(stages: MixedStages, macs: Sequence[int], x: np.ndarray, ref: np.ndarray, target: float,
                       progress=None, what: str = "") -> Dict:
    """The stages to keep in FP32 (module docstring); returns the fallback record.

    Args:
        stages: the stage graphs in both precisions.
        macs: each stage's MACs (ties in the ranking go to the cheaper stage).
        x: the inputs the choice is made on; ``ref``: the FP32 model's exit level of each.
        target: the agreement to reach on ``x``.
        progress: a ``Progress`` (bars) or message callback.
        what: what ``x`` is, for messages and the record (default: "N calibration inputs").

    Raises:
        BuildError: only every stage in FP32 reaches ``target`` (INT8 would gain nothing).
    """
    from jei_edge.compile.progress import Progress

    say = Progress.of(progress)
    what = what or f"{len(x)} calibration inputs"
    t0 = time.perf_counter()
    n = len(stages)
    int8 = [False] * n
    with say.bar(len(x), "int8 fallback: fully quantized") as update:
        full, _ = stages.agreements([], int8, x, ref, update)
    record = {"mode": "auto", "target": round(float(target), 6), "inputs": int(len(x)), "chosen_on": what,
              "agreement_all_int8": full, "fp32_stages": [], "agreement": full}
    if full >= target:
        record["seconds"] = round(time.perf_counter() - t0, 3)
        return record
    say(f"int8: {100 * full:.2f}% of the exit decisions of {what} agree with FP32, below "
        f"{100 * target:.2f}%: trying each stage in FP32")
    singles = [[k == j for k in range(n)] for j in range(n)]
    with say.bar(len(x), f"int8 fallback: {n} single-stage candidates") as update:
        _, alone = stages.agreements(singles, int8, x, ref, update)
    record["agreement_one_stage_fp32"] = [round(a, 6) for a in alone]
    order = sorted(range(n), key=lambda k: (-alone[k], macs[k], k))
    config, agreement = list(int8), full
    for k in order:
        config[k] = True
        if sum(config) == 1:
            agreement = alone[k]
        else:
            with say.bar(len(x), f"int8 fallback: stages {[i for i in range(n) if config[i]]} in FP32") as update:
                agreement, _ = stages.agreements([], config, x, ref, update)
        if agreement >= target:
            break
    fp32 = [k for k in range(n) if config[k]]
    if len(fp32) == n or agreement < target:
        raise BuildError(f"INT8: keeping {100 * target:.2f}% of the exit decisions of {what} "
                         f"equal to FP32 takes every stage in FP32 (fully quantized: {100 * full:.2f}%; best single "
                         f"stage in FP32: {100 * max(alone):.2f}%; every stage: {100 * agreement:.2f}%): INT8 would gain "
                         "nothing here",
                         hint="build --precision fp32, try --calibration percentile, or lower --min-agreement")
    record.update(fp32_stages=fp32, agreement=agreement, seconds=round(time.perf_counter() - t0, 3))
    say(f"int8: stage{'s' if len(fp32) > 1 else ''} {', '.join(map(str, fp32))} kept in FP32: "
        f"{100 * agreement:.2f}% of the exit decisions agree with FP32")
    return record
