"""What one Triton model instance does with a list of requests: validate each, run the valid ones
as one batch through ``Runtime.run``, answer each request with its own rows or its own error.

Triton's dynamic batcher hands a model instance several requests at once. Early exit then works
per sample inside that batch (``Runtime.run`` compacts the survivors between stages). A request
that is bad (NaN, empty, both or neither input, raw values outside [0, 1]) must not fail the
requests batched with it, so every request is checked on its own first and answered with its own
error; only the valid ones are concatenated and run. If the batched run still refuses the batch
(a finite row on which stage 0 overflows, found by the in-graph guard), each valid request is run
alone so that only the offending ones get the error.

Triton-free and torch-free: the Python-backend model (``jei_edge.serve.model``) feeds it numpy
arrays, and tests drive it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from jei_edge.errors import InputError, JeiEdgeError

MODES = ("exit", "full", "plain")
INPUT = "x"  # model input, already preprocessed (float32 [C, H, W] per sample)
RAW_INPUT = "x_raw"  # raw values in [0, 1] at the input shape; the bundle's preprocessing is applied


@dataclass(frozen=True)
class ModelSpec:
    """One served Triton model: which execution it runs on the bundle.

    Attributes:
        name: the Triton model name.
        mode: ``exit`` (early exit), ``full`` (every stage, final head) or ``plain`` (the bundle's
            plain backbone graph, no IMs or gates).
        offsets: per-gate threshold offsets (None: the deploy profile's, else 0).
        use_deploy: use the bundle's deploy profile (offsets and conformal table) when it has one.
        alpha: conformal-set alpha (None: no ``conformal_set`` output).
    """

    name: str
    mode: str = "exit"
    offsets: Optional[Tuple[float, ...]] = None
    use_deploy: bool = True
    alpha: Optional[float] = 0.05


@dataclass(frozen=True)
class Output:
    """One output tensor of the model, per sample (Triton adds the batch axis)."""

    name: str
    dtype: str  # numpy dtype name; repository.py maps it to Triton's TYPE_*
    dims: Tuple[int, ...]


@dataclass
class BatchStats:
    """What one execution did, for the early-exit metrics (``jei_edge.serve.model``)."""

    requests: int = 0
    rejected: int = 0
    samples: int = 0
    exit_counts: List[int] = field(default_factory=list)
    cost_sum: float = 0.0


Answer = Union[Dict[str, np.ndarray], InputError]


class Handler:
    """Answers requests for one ``ModelSpec`` with one loaded ``Runtime`` (one per model instance).

    Args:
        rt: the loaded runtime (closed by the caller).
        spec: what to run.
    """

    def __init__(self, rt, spec: ModelSpec):
        if spec.mode not in MODES:
            raise InputError(f"serving mode must be one of {list(MODES)}, got {spec.mode!r}")
        self.rt = rt
        self.spec = spec
        rt.use_deploy(spec.use_deploy)
        self.offsets = None
        if spec.mode == "exit" and spec.offsets is not None:
            from jei_edge.runtime.output import expand_offsets

            self.offsets = expand_offsets(list(spec.offsets), rt.num_gates)
            rt.run(np.zeros([0] + list(rt.input_shape), np.float32), offsets=self.offsets)  # checks them now
        self.alpha = spec.alpha if spec.mode != "plain" and spec.alpha is not None else None
        if self.alpha is not None and rt.qhat(self.alpha) is None:
            self.alpha = None  # not calibrated: no conformal sets
        ex = rt.manifest.exits
        self.exit_cost = np.asarray(ex.cost, dtype=np.float64)
        costs = rt.manifest.costs
        self.plain_cost = float(costs.plain_macs) / float(costs.full_macs) if costs.full_macs else float("nan")
        self._plain = None
        if spec.mode == "plain":
            from jei_edge.profile.measure import Passes

            self._plain = Passes.for_runtime(rt).plain
            if self._plain is None:
                raise InputError(f"bundle {rt.bundle.path} has no plain backbone graph for the {spec.name!r} model",
                                 hint="rebuild it with `jei-edge build` (it stores plain.onnx), or drop mode plain")

    # -- the model's interface ---------------------------------------------------------------
    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.rt.input_shape)

    def outputs(self) -> List[Output]:
        """Per-sample outputs: class, probabilities, exit, confidence, realized cost, conformal set."""
        c = int(self.rt.manifest.num_classes)
        outs = [Output("class", "int64", (1,)), Output("probs", "float32", (c,)), Output("exit", "int64", (1,)),
                Output("confidence", "float32", (1,)), Output("cost", "float32", (1,))]
        if self.alpha is not None:
            outs.append(Output("conformal_set", "bool", (c,)))
        return outs

    # -- requests ----------------------------------------------------------------------------
    def check(self, inputs: Mapping[str, Optional[np.ndarray]]) -> np.ndarray:
        """One request's inputs -> its float32 model input ``[b, C, H, W]`` (b >= 1), or InputError."""
        from jei_edge.runtime.inputs import to_model_input
        from jei_edge.runtime.validate import check_batch

        given = [k for k in (INPUT, RAW_INPUT) if inputs.get(k) is not None]
        if len(given) != 1:
            raise InputError(f"a request gives exactly one of the inputs '{INPUT}' (model input) or '{RAW_INPUT}' "
                             f"(raw values in [0, 1]); this one gives {' and '.join(given) or 'neither'}")
        name = given[0]
        arr = np.asarray(inputs[name])
        what = f"input '{name}'"
        want = "[b, " + ", ".join(str(d) for d in self.sample_shape) + "]"
        if arr.ndim == len(self.sample_shape) + 1 and arr.shape[0] == 0:
            raise InputError(f"{what} is empty (shape {list(arr.shape)}): a request needs at least one sample {want}")
        if name == RAW_INPUT:
            if arr.ndim != len(self.sample_shape) + 1 or tuple(arr.shape[1:]) != self.sample_shape:
                raise InputError(f"{what} has shape {list(arr.shape)}; the model expects {want}")
            return to_model_input(arr, self.rt.preprocessing, what)
        return check_batch(arr, self.sample_shape, what=what)

    def handle(self, requests: Sequence[Mapping[str, Optional[np.ndarray]]]) -> Tuple[List[Answer], BatchStats]:
        """Answer ``requests`` (each a mapping input name -> array or None), in order."""
        answers: List[Optional[Answer]] = [None] * len(requests)
        xs: List[np.ndarray] = []
        valid: List[int] = []
        for i, req in enumerate(requests):
            try:
                xs.append(self.check(req))
                valid.append(i)
            except JeiEdgeError as exc:
                answers[i] = exc if isinstance(exc, InputError) else InputError(str(exc))
        stats = BatchStats(requests=len(requests), rejected=len(requests) - len(valid),
                           exit_counts=[0] * int(self.rt.num_exits))
        if valid:
            try:
                parts = self._run_split(xs)
            except JeiEdgeError:  # name the offending request(s) only: run each alone
                parts = []
                for x in xs:
                    try:
                        parts.append(self._run_split([x])[0])
                    except JeiEdgeError as exc:
                        parts.append(exc if isinstance(exc, InputError) else InputError(str(exc)))
            for i, part in zip(valid, parts):
                answers[i] = part
                if isinstance(part, dict):
                    ex = part["exit"][:, 0]
                    stats.samples += len(ex)
                    stats.cost_sum += float(part["cost"].astype(np.float64).sum())
                    for k, n in enumerate(np.bincount(ex, minlength=len(stats.exit_counts))):
                        stats.exit_counts[k] += int(n)
                else:
                    stats.rejected += 1
        return answers, stats  # type: ignore[return-value]

    def _run_split(self, xs: Sequence[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        """Run the concatenated requests once; each request's rows of every output."""
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        out = self.run(x)
        answers, start = [], 0
        for part in xs:
            stop = start + len(part)
            answers.append({k: v[start:stop] for k, v in out.items()})
            start = stop
        return answers

    def run(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        """Every output for a valid model input ``x`` ``[B, C, H, W]``."""
        if self.spec.mode == "plain":  # the plain backbone's probabilities as Results of the final head
            from jei_edge.runtime.loop import Results

            res = Results(probs=np.asarray(self._plain(x)[0], dtype=np.float32),
                          exit_index=np.full(len(x), self.rt.num_exits - 1, dtype=np.int64))
            cost = np.full(len(x), self.plain_cost)
        else:
            res = self.rt.run(x, mode=self.spec.mode, offsets=self.offsets)
            cost = self.exit_cost[res.exit_index]
        out = {"class": res.pred.astype(np.int64)[:, None], "probs": res.probs,
               "exit": np.asarray(res.exit_index, dtype=np.int64)[:, None],
               "confidence": res.confidence.astype(np.float32)[:, None], "cost": cost.astype(np.float32)[:, None]}
        if self.alpha is not None:
            out["conformal_set"] = self.rt.conformal_sets(res, self.alpha)
        return out
