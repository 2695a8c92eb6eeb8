"""Build-time parity: the bundle must compute what the PyTorch model computes.

Two checks, both recorded in the build report; beyond tolerance the build fails naming the stage
and tensor:

1. **Per stage**: every stage graph in onnxruntime against the PyTorch stage on the same input
   (the PyTorch hidden state, so errors do not accumulate): max abs error of ``probs`` and ``gate``
   <= tolerance (FP32: 1e-5), ``hidden_out`` within a relative bound.
2. **End to end**: the runtime's exit decisions (``exit`` mode, the real conditional loop) against
   the PyTorch model + the numpy exit rule on >= 10,000 inputs, real and synthetic. A decision may
   differ only where ``|g - threshold| < tolerance`` at the first gate where they part; where they
   agree, the returned probabilities must match; ``full`` mode is checked against the final head.

Float rounding differs between PyTorch and onnxruntime kernels (and thread counts) and accumulates
over stages, so whole-network tensors (end-to-end probs, the plain backbone, which only serves as
the speed baseline) are bounded by ``E2E_FACTOR`` x tolerance; per-stage tensors by the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from jei_edge.errors import BuildError
from jei_edge.exit_rule import exit_levels

HIDDEN_RTOL = 1e-4  # hidden_out: max abs error <= HIDDEN_RTOL * max(1, max |hidden|)
E2E_FACTOR = 10.0  # whole-network probs (end to end, plain backbone): <= E2E_FACTOR * tolerance


@dataclass(frozen=True)
class ParitySettings:
    samples: int = 10_000  # end-to-end decision inputs (real + synthetic)
    stage_samples: int = 512  # per-stage tensor comparison inputs
    tolerance: float = 1e-5  # FP32: probs / gate max abs error and the decision tie band
    batch: int = 256  # PyTorch evaluation batch
    seed: int = 0


def parity_inputs(preprocessing: Dict, real: Optional[np.ndarray], n: int, seed: int = 0) -> Tuple[np.ndarray, Dict[str, int]]:
    """``n`` model inputs: up to half real, the rest synthetic of several kinds.

    Synthetic kinds: uniform raw noise, smooth random images (upsampled coarse noise), and when
    real inputs exist, blends of two real inputs and real inputs plus Gaussian noise: together they
    spread gate values over the whole range, ties included.
    """
    from jei_edge.data.transforms import raw_to_model

    rng = np.random.default_rng(seed)
    c, h, w = (int(v) for v in preprocessing["input_shape"])
    parts: List[np.ndarray] = []
    counts: Dict[str, int] = {}
    if real is not None and len(real):
        k = min(len(real), n // 2)
        parts.append(np.asarray(real[:k], dtype=np.float32))
        counts["real"] = k
    rest = n - sum(counts.values())
    kinds = ["uniform_noise", "smooth_noise"] + (["real_blend", "real_plus_noise"] if counts.get("real") else [])
    sizes = [rest // len(kinds) + (1 if i < rest % len(kinds) else 0) for i in range(len(kinds))]
    for kind, m in zip(kinds, sizes):
        if m == 0:
            continue
        if kind == "uniform_noise":
            x = raw_to_model(rng.random((m, c, h, w), dtype=np.float32), preprocessing)
        elif kind == "smooth_noise":
            fh, fw = max(1, h // 4), max(1, w // 4)
            coarse = rng.random((m, c, fh, fw), dtype=np.float32)
            up = np.repeat(np.repeat(coarse, -(-h // fh), axis=2), -(-w // fw), axis=3)[:, :, :h, :w]
            x = raw_to_model(np.ascontiguousarray(up), preprocessing)
        elif kind == "real_blend":
            r = parts[0]
            a, b = rng.integers(0, len(r), m), rng.integers(0, len(r), m)
            t = rng.random(m, dtype=np.float32)[:, None, None, None]
            x = t * r[a] + (1 - t) * r[b] + 0.1 * rng.standard_normal((m, c, h, w), dtype=np.float32)
        else:
            r = parts[0]
            s = rng.random(m, dtype=np.float32)[:, None, None, None]
            x = r[rng.integers(0, len(r), m)] + s * rng.standard_normal((m, c, h, w), dtype=np.float32)
        parts.append(np.asarray(x, dtype=np.float32))
        counts[kind] = m
    return np.ascontiguousarray(np.concatenate(parts)), counts


def _torch_batches(fn, x: np.ndarray, batch: int):
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            o = fn(torch.from_numpy(x[i:i + batch]))
            outs.append(tuple(t.numpy() for t in (o if isinstance(o, tuple) else (o,))))
    return [np.concatenate([o[j] for o in outs]) for j in range(len(outs[0]))]


def _err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def check_stages(model, stage_entries: List[Dict], sessions: List, plain_session, x: np.ndarray,
                 settings: ParitySettings, strict: bool = True) -> Dict:
    """Per-stage (and plain backbone) max abs errors; raises BuildError beyond tolerance.

    ``strict=False`` (INT8 graphs against the FP32 PyTorch model) records the errors without
    failing; shapes must still match."""
    tol = settings.tolerance
    report = {"samples": int(len(x)), "tolerance": tol, "hidden_rtol": HIDDEN_RTOL, "strict": strict, "stages": []}
    h = x
    for entry, sess in zip(stage_entries, sessions):
        k = entry["index"]
        names = [o["name"] for o in entry["outputs"]]
        exits = entry.get("exits") or [entry.get("exit", k)]
        ref = _torch_batches(model.stage(exits[0], last_exit=exits[-1]).eval(), h, settings.batch)
        got = sess.run(names, {entry["inputs"][0]["name"]: h})
        row = {"stage": k, "max_abs_error": {}}
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise BuildError(f"parity: stage {k} tensor '{name}' has shape {list(g.shape)} in onnxruntime, "
                                 f"{list(r.shape)} in PyTorch")
            row["max_abs_error"][name] = e = _err(r, g)
            bound = HIDDEN_RTOL * max(1.0, float(np.max(np.abs(r)))) if name == "hidden_out" else tol
            if strict and not e <= bound:
                raise BuildError(f"parity failed: stage {k} tensor '{name}' max abs error {e:.3g} > {bound:.3g} "
                                 "(onnxruntime vs PyTorch)",
                                 hint="an op exports or runs differently in onnxruntime; see the stage's ONNX graph")
        report["stages"].append(row)
        if entry.get("gated", True) and "hidden_out" in names:
            h = ref[names.index("hidden_out")]
    if plain_session is not None:
        ref = _torch_batches(model.plain_backbone().eval(), x, settings.batch)[0]
        e = _err(ref, plain_session.run(["probs"], {"x": x})[0])
        report["plain"] = {"max_abs_error": {"probs": e}, "bound": E2E_FACTOR * tol}
        if strict and not e <= E2E_FACTOR * tol:
            raise BuildError(f"parity failed: plain backbone tensor 'probs' max abs error {e:.3g} > {E2E_FACTOR * tol:g}")
    return report


def check_decisions(model, runtime, x: np.ndarray, settings: ParitySettings, min_agreement: Optional[float] = None) -> Dict:
    """End-to-end exit decisions and probabilities of ``runtime`` vs PyTorch + numpy exit rule.

    ``min_agreement`` (INT8 bundles against the FP32 model): instead of the tie-band rule, the
    build fails only when fewer than this fraction of exit decisions agree; probabilities are
    reported, not bounded."""
    import torch

    tol = settings.tolerance
    logits, gate_logits = _torch_batches(model, x, settings.batch)
    g = torch.sigmoid(torch.from_numpy(gate_logits)).numpy()
    probs_all = torch.softmax(torch.from_numpy(logits).float(), dim=-1).numpy()
    levels, margin = exit_levels(g, return_margin=True)
    res = runtime.run(x, mode="exit")
    n_exits = probs_all.shape[1]
    diff = res.exit_index != levels
    first = np.minimum(levels, res.exit_index)[diff]
    m = margin[np.flatnonzero(diff), first]
    ties = np.abs(m) < tol
    same = ~diff
    probs_ref = probs_all[np.arange(len(x)), np.minimum(levels, n_exits - 1)]
    probs_err = _err(res.probs[same], probs_ref[same])
    full = runtime.run(x, mode="full")
    full_err = _err(full.probs, probs_all[:, -1])
    report = {
        "samples": int(len(x)), "tolerance": tol, "probs_bound": E2E_FACTOR * tol,
        "agreement": float(np.mean(same)), "disagreements": int(diff.sum()),
        "disagreements_within_tie_band": int(ties.sum()),
        "max_abs_margin_of_disagreement": float(np.max(np.abs(m))) if m.size else 0.0,
        "prediction_agreement": float(np.mean(res.pred == np.argmax(probs_ref, axis=1))),
        "exit_probs_max_abs_error": probs_err, "full_mode_probs_max_abs_error": full_err,
        "exit_histogram_pytorch": np.bincount(levels, minlength=n_exits).tolist(),
        "exit_histogram_bundle": res.exit_histogram(n_exits),
    }
    if min_agreement is not None:
        report["min_agreement"] = float(min_agreement)
        if report["agreement"] < min_agreement:
            raise BuildError(f"INT8 parity failed: exit decisions agree with the FP32 model on {100 * report['agreement']:.2f}% "
                             f"of {len(x)} inputs, below the required {100 * min_agreement:.1f}%; tensor 'gate'",
                             hint="calibrate on more or more representative data, try --calibration percentile, "
                                  "or lower --min-agreement")
        return report
    bad = np.flatnonzero(diff)[~ties]
    if bad.size:
        i = int(bad[0])
        raise BuildError(
            f"parity failed: end-to-end exit decisions differ on {bad.size} of {len(x)} inputs beyond the tie band "
            f"|g - threshold| < {tol:g} (input {i}: PyTorch exit {int(levels[i])}, bundle exit {int(res.exit_index[i])}, "
            f"margin {float(m[~ties][0]):.3g}); tensor 'gate'")
    bound = E2E_FACTOR * tol
    if not probs_err <= bound:
        raise BuildError(f"parity failed: end-to-end tensor 'probs' at the exit max abs error {probs_err:.3g} > {bound:g}")
    if not full_err <= bound:
        raise BuildError(f"parity failed: full-mode tensor 'probs' (final head) max abs error {full_err:.3g} > {bound:g}")
    return report
