"""Verify a bundle against the PyTorch model's stored references (torch-free, onnx-free).

``verify_bundle`` loads the bundle with the real runtime (integrity check and the stage-0
input-guard probe happen in ``Runtime.load``), runs it in ``exit`` and ``full`` mode on the stored
reference inputs and compares with what PyTorch computed at build time (``references.py``):

- **fp32** (and fp16, with a wider band, ``RULES``): an exit decision may differ only where
  ``|g - threshold| < tolerance`` at the first gate where the two part (a tie: float rounding
  differs between PyTorch and the backend); where decisions agree, the probabilities at the exit
  and the final head's probabilities in ``full`` mode must match within ``E2E_FACTOR x tolerance``
  (fp16: its own bound; rounding accumulates over stages).
- **int8** (against the FP32 model): at least ``min_agreement`` of the exit decisions must agree
  (the floor recorded in the manifest's quantization record) on the real held-out inputs (the test
  split, never a calibration sample) when there are at least ``MIN_HELD_OUT`` of them, else on all
  inputs; agreement on synthetic inputs is reported apart; probabilities are reported only.

The report states how many inputs were checked and the highest disagreement rate that is still
consistent with what was seen (one-sided 95% Clopper-Pearson bound; ``3/n`` when none differed).
The build runs the same check on every input it generated (``references=``); ``jei-edge verify``
re-runs it on the stored subset on another machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from jei_edge.compile.progress import Progress
from jei_edge.compile.references import ReferenceSet
from jei_edge.errors import BuildError, BundleError

E2E_FACTOR = 10.0  # whole-network probs (end to end, full mode): <= E2E_FACTOR * tolerance
CHUNK = 256  # rows per runtime call (progress granularity)
CONFIDENCE = 0.95


class ParityError(BuildError):
    """The bundle does not compute what the PyTorch model computed (exit decisions or probabilities)."""

    exit_code = 1


@dataclass(frozen=True)
class Rule:
    """How closely a bundle of one precision must follow the PyTorch model.

    Attributes:
        tolerance: the tie band on ``|g - threshold|``; probabilities within ``E2E_FACTOR`` times it.
        min_agreement: None = the strict tie-band rule; else only this fraction of decisions must agree.
        probs_tolerance: probabilities' max abs error (None: ``E2E_FACTOR`` x tolerance).
    """

    tolerance: float
    min_agreement: Optional[float] = None
    probs_tolerance: Optional[float] = None

    @property
    def probs_bound(self) -> float:
        return E2E_FACTOR * self.tolerance if self.probs_tolerance is None else self.probs_tolerance


# fp16: half precision keeps ~3 significant digits. Measured on the FP16 stage graphs through
# onnxruntime (CPU) against the FP32 PyTorch model, 10,000 inputs each, on the test models whose
# gates crowd the thresholds: disagreements at gate margins up to 5e-3 (ViT, 4 exits) and 1.6e-2
# (ResNet, 3 exits), probabilities within 1.3e-3. The band is 2e-2, probabilities within 1e-2;
# TensorRT's FP16 kernels accumulate in FP32 and are expected closer (to be measured on a board).
HELD_OUT = "real_held_out"  # the reference kind of real inputs never used for INT8 calibration
MIN_HELD_OUT = 200  # held-out rows needed to hold the INT8 floor on them alone
RULES = {"fp32": Rule(1e-5), "fp16": Rule(2e-2, probs_tolerance=1e-2), "int8": Rule(1e-5, min_agreement=0.95)}


def rule_for(manifest, tolerance: Optional[float] = None) -> Rule:
    """The rule of the bundle's precision; int8 takes its floor from the manifest's quantization record.

    Args:
        manifest: the bundle's typed Manifest.
        tolerance: overrides the precision's tie band (the build's ``--tolerance``).
    """
    rule = RULES[manifest.precision]
    if manifest.precision == "int8":
        rule = Rule(rule.tolerance, float((manifest.quantization or {}).get("min_agreement", rule.min_agreement)))
    return rule if tolerance is None else Rule(float(tolerance), rule.min_agreement, rule.probs_tolerance)


def rate_upper_bound(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided upper confidence bound on a rate after ``k`` events in ``n`` trials (Clopper-Pearson).

    The largest p with ``P(X <= k | n, p) >= 1 - confidence``; for ``k = 0`` that is
    ``1 - (1 - confidence)^(1/n)``, about ``3/n`` at 95% (the rule of three).
    """
    if n <= 0 or k >= n:
        return 1.0
    alpha = 1.0 - confidence
    if k <= 0:
        return 1.0 - alpha ** (1.0 / n)
    i = np.arange(k + 1)
    log_choose = math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])

    def cdf(p: float) -> float:
        terms = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)
        top = float(terms.max())
        return math.exp(top) * float(np.exp(terms - top).sum())

    lo, hi = k / n, 1.0
    for _ in range(60):  # bisection: cdf falls as p grows
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) > alpha else (lo, mid)
    return hi


def max_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs difference in float64 (0 for empty arrays)."""
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _run(rt, x: np.ndarray, mode: str, update, offsets) -> tuple:
    probs, exits = [], []
    for i in range(0, len(x), CHUNK):
        res = rt.run(x[i:i + CHUNK], mode=mode, offsets=offsets)
        probs.append(np.asarray(res.probs))
        exits.append(np.asarray(res.exit_index))
        update(len(probs[-1]))
    return np.concatenate(probs), np.concatenate(exits)


def _quantized_edges(rt) -> bool:
    """The bundle's stage edges carry quantized hidden states (INT8 onnxruntime bundles)."""
    stages = getattr(getattr(rt, "manifest", None), "stages", ())
    return any(s.input.quantized for s in stages[1:])


def _fallback_off(rt) -> bool:
    """The INT8 build quantized every stage by request (``--int8-fallback off``)."""
    fallback = getattr(getattr(rt, "manifest", None), "int8_fallback", None)
    return fallback is not None and fallback.get("mode") == "off"


def check_decisions(rt, refs: ReferenceSet, rule: Rule, progress: Progress) -> Dict:
    """Run ``rt`` on the references in ``exit`` and ``full`` mode and compare (see the module docstring).

    Returns:
        The ``decisions`` report. Raises ``ParityError`` when the rule is broken.
    """
    n, tol = len(refs), rule.tolerance
    n_exits = refs.margin.shape[1] + 1
    zeros = (0.0,) * (n_exits - 1)  # the references are the trained model's decisions (not a deploy profile's)
    with progress.bar(2 * n, "verify") as update:
        probs, exits = _run(rt, refs.x, "exit", update, zeros)
        full_probs, _ = _run(rt, refs.x, "full", update, zeros)
    levels = refs.exit_index
    diff = exits != levels
    first = np.minimum(levels, exits)[diff]
    m = refs.margin[np.flatnonzero(diff), first]
    ties = np.abs(m) < tol
    same = ~diff
    probs_err = max_abs_error(probs[same], refs.probs[same])
    full_err = max_abs_error(full_probs, refs.full_probs)
    beyond = int((~ties).sum())
    k = int(diff.sum()) if rule.min_agreement is not None else beyond
    report = {
        "samples": n, "kinds": refs.kinds, "tolerance": tol, "probs_bound": rule.probs_bound,
        "agreement": float(np.mean(same)), "disagreements": int(diff.sum()),
        "disagreements_within_tie_band": int(ties.sum()),
        "max_abs_margin_of_disagreement": float(np.max(np.abs(m))) if m.size else 0.0,
        "prediction_agreement": float(np.mean(np.argmax(probs, 1) == np.argmax(refs.probs, 1))),
        "exit_probs_max_abs_error": probs_err, "full_mode_probs_max_abs_error": full_err,
        "exit_histogram_pytorch": np.bincount(levels, minlength=n_exits).tolist(),
        "exit_histogram_bundle": np.bincount(exits, minlength=n_exits).tolist(),
        # the highest rate of (int8: any / fp32: beyond-the-tie-band) disagreements these n inputs cannot exclude
        "rate_bound": {"counted": "disagreements" if rule.min_agreement is not None else "disagreements beyond the tie band",
                       "k": k, "n": n, "confidence": CONFIDENCE, "upper": rate_upper_bound(k, n)},
    }
    report["agreement_by_kind"] = {name: float(np.mean(same[refs.kind == i]))
                                   for i, name in enumerate(refs.kind_names) if (refs.kind == i).any()}
    if rule.min_agreement is not None:
        report["min_agreement"] = rule.min_agreement
        # the floor is held on real inputs the calibration never saw when there are enough of them;
        # agreement on synthetic inputs (noise, blends) is reported apart, not mixed in
        held = refs.kind_names.index(HELD_OUT) if HELD_OUT in refs.kind_names else -1
        n_held = int((refs.kind == held).sum())
        on_held = n_held >= MIN_HELD_OUT
        synthetic = ~np.isin(refs.kind, [i for i, k in enumerate(refs.kind_names) if k in ("real", HELD_OUT)])
        report["synthetic_agreement"] = float(np.mean(same[synthetic])) if synthetic.any() else None
        report["floor_on"] = (f"{n_held} real held-out inputs (test split, disjoint from the calibration samples)"
                              if on_held else f"all {n} inputs (fewer than {MIN_HELD_OUT} real held-out ones)")
        floor_value = report["agreement_by_kind"][HELD_OUT] if on_held else report["agreement"]
        report["floor_agreement"] = floor_value
        if floor_value < rule.min_agreement:
            raise ParityError(f"INT8 parity failed: exit decisions agree with the FP32 model on "
                              f"{100 * floor_value:.2f}% of {report['floor_on']}, below the required "
                              f"{100 * rule.min_agreement:.1f}%; tensor 'gate'",
                              hint="calibrate on more or more representative data, try --calibration percentile"
                                   + (", build with --fp32-edges" if _quantized_edges(rt) else "")
                                   + (", build with --int8-fallback auto (keeps the stages that matter in FP32)"
                                      if _fallback_off(rt) else "")
                                   + ", or lower --min-agreement")
        return report
    if beyond:
        i = int(np.flatnonzero(diff)[~ties][0])
        raise ParityError(
            f"parity failed: end-to-end exit decisions differ on {beyond} of {n} inputs beyond the tie band "
            f"|g - threshold| < {tol:g} (input {i}: PyTorch exit {int(levels[i])}, bundle exit {int(exits[i])}, "
            f"margin {float(m[~ties][0]):.3g}); tensor 'gate'",
            hint="the bundle's graphs do not compute the model's gates; rebuild it from the model")
    bound = rule.probs_bound
    if not probs_err <= bound:
        raise ParityError(f"parity failed: end-to-end tensor 'probs' at the exit max abs error {probs_err:.3g} > {bound:g}",
                          hint="the bundle's graphs do not compute the model's exits; rebuild it from the model")
    if not full_err <= bound:
        raise ParityError(f"parity failed: full-mode tensor 'probs' (final head) max abs error {full_err:.3g} > {bound:g}",
                          hint="the bundle's final stage does not compute the model's head; rebuild it from the model")
    return report


def verify_device(bundle_path, shown=None):
    """``(device, note)`` a build or ``jei-edge lower`` verifies on: None (the target's backend:
    the engines themselves where they can run here), else the stage graphs the engines are built
    from, through onnxruntime on cpu, with a note saying why the engines could not run. ``shown``:
    the path the note names instead of ``bundle_path`` (a staging directory about to be renamed)."""
    from jei_edge.bundle import Bundle

    bundle = Bundle.open(bundle_path, verify=False)
    m = bundle.manifest
    if m.lowering is None:
        return None, ""
    from jei_edge.backends.tensorrt.validity import engine_check_error

    exc = engine_check_error(bundle)
    if exc is None:
        return None, ""
    built = "engines built from these graphs, not run here" if all(s.engines for s in m.stages) \
        else "engines to be built on the board"
    why = str(getattr(exc, "message", exc))
    if shown is not None:
        why = why.replace(str(bundle_path), str(shown))
    return "cpu", f"verified the {m.precision} stage graphs through onnxruntime on cpu ({built}: {why})"


def verify_bundle(bundle_path, device: Optional[str] = None, progress=None, references: Optional[ReferenceSet] = None,
                  tolerance: Optional[float] = None, public_key=None) -> Dict:
    """Check a bundle against the PyTorch model's references with the real runtime.

    Args:
        bundle_path: a ``NAME.jei`` directory.
        device: ``"cpu"``, ``"cuda"`` or None (the bundle's target decides).
        progress: a message callback (bars on a terminal) or a ``Progress``.
        references: check these rows instead of the stored ones (the build passes every input it
            generated; the bundle stores a subset).
        tolerance: override the precision's tie band (``Rule``).
        public_key: require a signature by this key (``Runtime.load``).

    Returns:
        The report: bundle, device, precision, rule, input_guard, decisions, seconds.

    Raises:
        BundleError: the bundle is damaged, has no references, or they do not fit it.
        ParityError: the bundle does not follow the references.
    """
    from jei_edge.runtime import Runtime

    t0 = time.perf_counter()
    progress = Progress.of(progress)
    path = Path(bundle_path)
    with Runtime.load(path, device=device, public_key=public_key) as rt:  # integrity + the input-guard probe
        m = rt.manifest
        if references is None:
            if m.references is None:
                raise BundleError(f"bundle '{path}' stores no reference outputs to verify against",
                                  hint="it was built by an older jei-edge; rebuild it with `jei-edge build`")
            references = ReferenceSet.load(rt.bundle.file(m.references.file), m.num_gates, m.num_classes,
                                           m.input.shape)  # listed, hashed, inside the bundle
        rule = rule_for(m, tolerance)
        progress(f"verifying {m.name} on {len(references)} reference inputs ({m.precision}, device {rt.device})")
        decisions = check_decisions(rt, references, rule, progress)
    return {"bundle": str(path), "device": rt.device, "backend": rt.backend, "precision": m.precision, "rule": asdict(rule),
            "input_guard": "probed at load" if m.stages[0].input_guard else "none (stage 0 has no gate)",
            "decisions": decisions, "seconds": round(time.perf_counter() - t0, 3)}


def summary_line(report: Dict) -> str:
    """One line: inputs checked, agreement, errors and the rate bound."""
    d = report["decisions"]
    b = d["rate_bound"]
    return (f"verified {report['bundle']} on {report['device']} ({report['precision']}): {d['samples']} inputs, "
            f"exit decisions agree on {100 * d['agreement']:.3f}% ({d['disagreements_within_tie_band']} ties"
            + (f"; {100 * d['floor_agreement']:.2f}% on {d['floor_on']}" if "floor_on" in d else "") + "), "
            f"max probs error {d['exit_probs_max_abs_error']:.1e}; rate of {b['counted']} < "
            f"{100 * b['upper']:.2g}% ({100 * b['confidence']:.0f}% confidence)")
