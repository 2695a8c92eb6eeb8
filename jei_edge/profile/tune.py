"""``jei-edge tune``: the most accurate exits that fit a budget, without retraining.

The JEI exit rule takes per-gate threshold offsets ``delta_l`` (``g_l >= (1 - S)/2 + delta_l``):
a negative offset lets samples leave earlier (cheaper), a positive one later. The tuner:

1. runs every stage graph on every sample of the data's **validation** split (``chain_stages``),
   so each offset vector is scored without running the model again: exit levels from the numpy
   exit rule, accuracy, mean MAC cost, and for a latency budget the latency predicted from
   stage times measured on this machine at the given batch (``LatencyModel``);
2. searches offset vectors (not one shared offset only): the shared offsets on a grid, then
   coordinate descent gate by gate from the best of them and from seeded random starts, keeping
   the most accurate vector within the budget (ties: the cheaper one). Deterministic for a seed;
3. recomputes the conformal table for the chosen offsets on the **calibration** split (disjoint
   from the validation data that chose them) and reports accuracy, cost and latency on the
   held-out **test** split, beside the max-softmax thresholding baseline on the same exits;
4. writes the offsets and table into the bundle as its deploy profile (atomically, every file
   re-hashed): ``run``, ``jei-edge-run`` and ``profile`` use it unless ``--offsets`` is given.

Torch-free: the bundle's stage graphs (onnxruntime) and numpy; a latency budget also times the
bundle's own backend here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from jei_edge.errors import InputError
from jei_edge.exit_rule import exit_levels

OFFSET_GRID = tuple(float(v) for v in np.round(np.linspace(-0.5, 0.5, 41), 4))  # steps of 0.025
BUDGET_KINDS = ("cost", "latency-ms")


@dataclass(frozen=True)
class Budget:
    """``cost`` (mean MACs as a fraction of the full model's) or ``latency-ms`` (per sample at ``batch``)."""

    kind: str
    value: float
    batch: int = 1

    @property
    def label(self) -> str:
        return f"cost<={self.value:g}" if self.kind == "cost" else f"latency-ms<={self.value:g} at batch {self.batch}"


def parse_budget(text: str, batch: int = 1) -> Budget:
    """``cost=0.5`` or ``latency-ms=2.0`` (InputError otherwise)."""
    kind, _, value = str(text).partition("=")
    kind = kind.strip().lower()
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if kind not in BUDGET_KINDS or not np.isfinite(v) or v <= 0:
        raise InputError(f"--budget must be cost=FRACTION or latency-ms=MS with a positive number, got {text!r}",
                         hint="e.g. --budget cost=0.5 (half the full model's MACs) or --budget latency-ms=2.0")
    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    return Budget(kind, v, int(batch))


@dataclass(frozen=True)
class Score:
    offsets: Tuple[float, ...]
    accuracy: float
    cost: float
    latency_ms: Optional[float] = None

    def metric(self, kind: str) -> float:
        return self.cost if kind == "cost" else float(self.latency_ms)

    def to_dict(self) -> Dict:
        return {"offsets": list(self.offsets), "accuracy": self.accuracy, "cost": self.cost,
                "latency_ms": self.latency_ms}


class LatencyModel:
    """Predicted time per sample of an offset setting on this machine, at one batch size.

    Stage k's standalone time t_k(m) is measured for m = 1, 2, 4, ... up to the batch (the
    runtime's own executor and buffers) and interpolated. What the runtime adds (exit pass -
    ideal pass) is split into a cost per call and a cost per executed stage boundary, from two
    measured settings: offsets 0, and every sample leaving at the first exit (one boundary per
    call). A batch of the data (in order) then costs
    ``call + sum_k [n_k > 0] (t_k(n_k) + boundary)``, n_k = rows reaching stage k.
    """

    def __init__(self, batch: int, rows: np.ndarray, times: np.ndarray, overhead: float, per_call: float = 0.0):
        self.batch, self.rows, self.times = int(batch), rows, times
        self.overhead, self.per_call = float(overhead), float(per_call)

    @classmethod
    def measure(cls, rt, x: np.ndarray, batch: int, repeats: int = 5) -> "LatencyModel":
        from jei_edge.profile.measure import Passes, interleaved, median

        p = Passes.for_runtime(rt, batch)
        xs = p.batches(x, batch)
        if not xs:
            raise InputError(f"{len(x)} validation sample(s) are fewer than one batch of {batch}",
                             hint="use a smaller --batch or more data")
        rows = np.unique(np.minimum(2 ** np.arange(0, int(np.log2(batch)) + 2), batch))
        p.prime(xs[0])
        times = np.array([[median([p.stage_time(k, int(m)) for _ in range(repeats)]) for m in rows]
                          for k in range(p.num_stages)])
        extra = []  # (exit - ideal seconds, boundaries) at offsets 0 and at "everyone leaves at exit 0"
        for offsets in (None, (-1.0,) * rt.num_gates):
            reaches = p.reaches(xs, offsets)
            t = interleaved([p], xs, [reaches], max(1, repeats // 2), offsets, warmup=1)[0]
            extra.append((max(0.0, median(t["exit"]) - median(t["ideal"])), p.boundaries(reaches)))
        (e0, b0), (e1, b1) = extra  # e = calls * per_call + boundaries * per_boundary, calls = len(xs)
        calls = len(xs)
        per_boundary = (e0 - e1) / (b0 - b1) if b0 > b1 else e0 / max(b0, 1)
        per_boundary = max(0.0, per_boundary)
        per_call = max(0.0, (e1 - b1 * per_boundary) / calls) if b0 > b1 else 0.0
        return cls(batch, rows, times, per_boundary, per_call)

    def predict_ms(self, levels: np.ndarray, stage_of_exit: np.ndarray) -> float:
        """Milliseconds per sample for rows leaving at ``levels`` (exit indices)."""
        stage = stage_of_exit[levels]
        total, n = 0.0, len(levels)
        for i in range(0, n - self.batch + 1 if n >= self.batch else 1, self.batch):
            s = stage[i:i + self.batch]
            total += self.per_call
            for k in range(self.times.shape[0]):
                m = int((s >= k).sum())
                if m:
                    total += float(np.interp(m, self.rows, self.times[k])) + self.overhead
        used = (n // self.batch) * self.batch if n >= self.batch else n
        return 1e3 * total / max(used, 1)

    def to_dict(self) -> Dict:
        return {"batch": self.batch, "rows": self.rows.tolist(), "stage_ms": (1e3 * self.times).tolist(),
                "overhead_us_per_boundary": 1e6 * self.overhead, "overhead_us_per_call": 1e6 * self.per_call}


class Scorer:
    """Accuracy, MAC cost (and predicted latency) of offset vectors on one labelled split."""

    def __init__(self, gates: np.ndarray, probs: np.ndarray, y: np.ndarray, cost: Sequence[float],
                 latency: Optional[LatencyModel] = None, stage_of_exit: Optional[np.ndarray] = None):
        self.gates = gates
        self.correct = probs.argmax(-1) == np.asarray(y)[:, None]  # [N, E]
        self.cost = np.asarray(cost, dtype=np.float64)
        self.latency, self.stage_of_exit = latency, stage_of_exit
        self.rows = np.arange(len(y))
        self.calls = 0

    def levels(self, offsets: Sequence[float]) -> np.ndarray:
        return exit_levels(self.gates, list(offsets))

    def __call__(self, offsets: Sequence[float]) -> Score:
        self.calls += 1
        lv = self.levels(offsets)
        lat = self.latency.predict_ms(lv, self.stage_of_exit) if self.latency is not None else None
        return Score(tuple(float(o) for o in offsets), float(self.correct[self.rows, lv].mean()),
                     float(self.cost[lv].mean()), lat)


def _better(a: Score, b: Optional[Score], kind: str) -> bool:
    if b is None:
        return True
    if a.accuracy != b.accuracy:
        return a.accuracy > b.accuracy
    return a.metric(kind) < b.metric(kind)


def search(score: Scorer, budget: Budget, num_gates: int, seed: int = 0, rounds: int = 4,
           restarts: int = 3) -> Tuple[Score, List[Score]]:
    """The most accurate offset vector within ``budget`` on ``score``'s split (module docstring).

    Returns:
        ``(best, every scored vector)``. Raises InputError naming the cheapest achievable
        setting when none fits.
    """
    kind, limit = budget.kind, budget.value
    seen: Dict[Tuple[float, ...], Score] = {}

    def at(offsets) -> Score:
        key = tuple(float(o) for o in offsets)
        if key not in seen:
            seen[key] = score(key)
        return seen[key]

    best = None
    for d in OFFSET_GRID:  # one shared offset
        s = at((d,) * num_gates)
        if s.metric(kind) <= limit and _better(s, best, kind):
            best = s
    if best is None:
        cheapest = min(seen.values(), key=lambda s: s.metric(kind))
        unit = "of the full model's MACs" if kind == "cost" else "ms per sample"
        raise InputError(f"no exit setting meets {budget.label}: the cheapest achievable is "
                         f"{cheapest.metric(kind):.4g} {unit} (offsets {cheapest.offsets[0]:+g} for every gate, "
                         f"accuracy {100 * cheapest.accuracy:.2f}%)", hint="raise the budget")

    def descend(start: Score) -> Score:
        cur = start
        for _ in range(rounds):
            improved = False
            for g in range(num_gates):
                for d in OFFSET_GRID:
                    if d == cur.offsets[g]:
                        continue
                    cand = at(cur.offsets[:g] + (d,) + cur.offsets[g + 1:])
                    if cand.metric(kind) <= limit and _better(cand, cur, kind):
                        cur, improved = cand, True
            if not improved:
                break
        return cur

    best = descend(best)
    rng = np.random.default_rng(seed)
    for _ in range(restarts if num_gates > 1 else 0):
        start = at(tuple(float(v) for v in rng.choice(OFFSET_GRID, num_gates)))
        if start.metric(kind) <= limit:
            cand = descend(start)
            if _better(cand, best, kind):
                best = cand
    return best, list(seen.values())


def pareto(points: Sequence[Score], kind: str = "cost") -> List[Score]:
    """The accuracy/cost (or /latency) frontier: no other point is cheaper and at least as accurate."""
    out, top = [], -1.0
    for s in sorted(points, key=lambda s: (s.metric(kind), -s.accuracy)):
        if s.accuracy > top:
            out.append(s)
            top = s.accuracy
    return out


def tune(bundle_path, data: str, budget: Budget, seed: int = 0, repeats: int = 5, write: bool = True,
         progress=None) -> Dict:
    """Tune ``bundle_path`` on ``data`` for ``budget``; writes the deploy profile unless ``write`` is False.

    Returns:
        The report: budget, chosen offsets, validation / test scores, the thresholding baseline on
        test at the chosen cost, curves, the conformal table, and the latency model when used.
    """
    from jei_edge.backends.onnxruntime.chain import exit_outputs
    from jei_edge.bundle import Bundle, Deploy
    from jei_edge.compile.progress import Progress
    from jei_edge.data import load_data
    from jei_edge.train.baseline import accuracy_at_cost, baseline_curve
    from jei_edge.train.config import ALPHAS
    from jei_edge.train.metrics import qhat_table

    t0 = time.perf_counter()
    progress = Progress.of(progress)
    bundle = Bundle.open(bundle_path)
    m = bundle.manifest
    d = load_data(data, input_shape=m.input.shape, seed=seed, preprocessing=m.preprocessing.to_dict())
    if len(d.val) == 0 or len(d.calib) == 0 or len(d.test) == 0:
        raise InputError(f"data '{data}' has too few labelled samples to tune on (validation {len(d.val)}, "
                         f"calibration {len(d.calib)}, test {len(d.test)})", hint="give more data")
    if len(d.class_names) != m.num_classes:
        raise InputError(f"data '{data}' has {len(d.class_names)} classes, the bundle {m.num_classes}",
                         hint="tune on the data the model was trained for")
    progress(f"every exit on {len(d.val)} validation, {len(d.calib)} calibration and {len(d.test)} test samples")
    with contextlib.ExitStack() as stack:
        splits = ("val", "calib", "test")  # one pass over every split: one set of stage sessions
        gates, probs = exit_outputs(bundle, np.concatenate([getattr(d, k).x for k in splits]))
        cut = np.cumsum([len(getattr(d, k)) for k in splits])[:-1]
        out = dict(zip(splits, zip(np.split(gates, cut), np.split(probs, cut))))
        cost = np.asarray(m.exits.cost, dtype=np.float64)
        stage_of_exit = np.array([s.index for s in m.stages for _ in s.exits])
        latency, rt = None, None
        if budget.kind == "latency-ms":  # one runtime times the stages, then the chosen offsets
            from jei_edge.runtime import Runtime

            progress(f"timing the stages at batch {budget.batch} on this machine ({repeats} repeats)")
            rt = stack.enter_context(Runtime.load(bundle.path, max_batch=budget.batch)).use_deploy(False)
            latency = LatencyModel.measure(rt, d.val.x, budget.batch, repeats)
        val = Scorer(*out["val"], d.val.y, cost, latency, stage_of_exit)
        progress(f"searching offsets for {budget.label}")
        best, explored = search(val, budget, m.num_gates, seed=seed)
        test = Scorer(*out["test"], d.test.y, cost, latency, stage_of_exit)
        chosen_test = test(best.offsets)
        front = pareto(explored, "cost")
        jei_curve = [test(s.offsets) for s in front]
        logp = {k: np.log(np.clip(out[k][1], 1e-30, None)) for k in ("val", "test")}
        base = baseline_curve(logp["val"], logp["test"], d.test.y, {"cost": m.exits.cost,
                                                                     "cost_vs_plain": m.exits.cost_vs_plain})
        alphas = tuple(m.exits.alphas) or tuple(ALPHAS)
        g_c, p_c = out["calib"]
        table = qhat_table(p_c, exit_levels(g_c, list(best.offsets)), d.calib.y, alphas)
        measured = None
        if rt is not None:
            from jei_edge.profile.measure import Passes, median

            p = Passes.for_runtime(rt, budget.batch)
            xs = p.batches(d.test.x, budget.batch) or [d.test.x]
            p.warm_up(xs, best.offsets)
            measured = 1e3 * median([p.exit_pass(xs, best.offsets) for _ in range(repeats)]) / sum(map(len, xs))
        report = {
            "bundle": str(bundle.path), "data": data, "seed": seed, "budget": budget.label,
            "offsets": list(best.offsets), "searched": len(explored),
            "validation": {"samples": len(d.val), **best.to_dict()},
            "test": {"samples": len(d.test), **chosen_test.to_dict(), "measured_latency_ms": measured,
                     "baseline_accuracy_at_cost": accuracy_at_cost(base, chosen_test.cost),
                     "default_offsets": test((0.0,) * m.num_gates).to_dict()},
            "conformal": {"alphas": list(alphas), "qhat": table, "calibration_samples": len(d.calib)},
            "curves": {"jei": [s.to_dict() for s in jei_curve],
                       "baseline": [{"cost": p["mean_cost"], "accuracy": p["accuracy"],
                                     "latency_ms": latency.predict_ms(p["exit_idx"], stage_of_exit) if latency else None}
                                    for p in base]},
            "latency_model": latency.to_dict() if latency is not None else None,
        }
        if write:
            info = {"data": data, "seed": seed, "validation": {"samples": len(d.val), "accuracy": best.accuracy,
                                                               "cost": best.cost, "latency_ms": best.latency_ms},
                    "test": {"samples": len(d.test), "accuracy": chosen_test.accuracy, "cost": chosen_test.cost},
                    "calibration_samples": len(d.calib), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_deploy(bundle, Deploy(offsets=best.offsets, alphas=alphas,
                                        qhat=tuple(tuple(float(v) for v in r) for r in table), budget=budget.label,
                                        info=info))
            progress(f"wrote the deploy profile into {bundle.path}")
    report["written"] = bool(write)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def offset_curve(bundle, x: np.ndarray, y: np.ndarray, offsets=None) -> Dict:
    """Accuracy against MAC cost on labelled ``x`` for shared offsets on ``OFFSET_GRID`` (the JEI
    rule) and for max-softmax thresholding on the same exits (thresholds fitted on ``x`` itself:
    an in-sample curve, for the profile page), plus the point of ``offsets`` (None: 0)."""
    from jei_edge.backends.onnxruntime.chain import exit_outputs
    from jei_edge.train.baseline import baseline_curve

    m = bundle.manifest
    gates, probs = exit_outputs(bundle, x)
    sc = Scorer(gates, probs, y, m.exits.cost)
    jei = pareto([sc((d,) * m.num_gates) for d in OFFSET_GRID])
    logp = np.log(np.clip(probs, 1e-30, None))
    base = baseline_curve(logp, logp, np.asarray(y), {"cost": m.exits.cost, "cost_vs_plain": m.exits.cost_vs_plain})
    here = sc(tuple(offsets) if offsets is not None else (0.0,) * m.num_gates)
    return {"JEI exit rule (shared offset)": {"cost": [s.cost for s in jei], "accuracy": [s.accuracy for s in jei]},
            "max-softmax thresholding (in-sample)": {"cost": [p["mean_cost"] for p in base],
                                                     "accuracy": [p["accuracy"] for p in base]},
            "chosen": {"cost": here.cost, "accuracy": here.accuracy}}


def write_deploy(bundle, deploy) -> None:
    """Replace ``bundle``'s deploy profile (None removes it), atomically and re-hashed."""
    from jei_edge.compile.writer import StagingDir, copy_bundle, write_manifest

    with StagingDir(bundle.path, force=True) as staging:
        copy_bundle(bundle, staging.tmp)
        write_manifest(staging.tmp, bundle.manifest.replace(deploy=deploy))
        staging.commit()


def plot_curves(report: Dict, path) -> str:
    """Accuracy vs cost on the test split: JEI's searched frontier, the thresholding baseline, the
    chosen setting and the budget (PNG; matplotlib, the ``plots`` extra)."""
    import io

    from jei_edge._deps import require
    from jei_edge._io import atomic_write_bytes

    require("matplotlib", purpose="the tuning plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    jei, base = report["curves"]["jei"], report["curves"]["baseline"]
    key = "cost" if report["budget"].startswith("cost<=") else "latency_ms"  # the budget's axis
    pts = sorted(base, key=lambda p: p[key])
    ax.plot([p[key] for p in pts], [100 * p["accuracy"] for p in pts], "o-", ms=3, color="#999999",
            label="max-softmax thresholding (same exits)")
    pts = sorted(jei, key=lambda p: p[key])
    ax.plot([p[key] for p in pts], [100 * p["accuracy"] for p in pts], "o-", ms=3, color="#1f77b4",
            label="JEI exit rule, searched offsets")
    t = report["test"]
    ax.plot([t[key]], [100 * t["accuracy"]], "*", ms=14, color="#d62728", label=f"chosen ({report['budget']})")
    ax.axvline(float(report["budget"].split("<=")[1].split()[0]), ls="--", lw=1, color="#d62728")
    ax.set_xlabel("mean cost (fraction of the full model's MACs)" if key == "cost" else
                  f"predicted ms per sample at batch {report['latency_model']['batch']} (this machine)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"jei-edge tune: {report['data']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
    return str(path)
