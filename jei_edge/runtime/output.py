"""Per-sample records, a batch summary and the text table (``jei-edge run`` / ``jei-edge-run``)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from jei_edge.runtime.loop import Results


def records(res: Results, rt, sources: Sequence[str], alpha: Optional[float] = None,
            labels: Optional[np.ndarray] = None, with_probs: bool = False) -> List[Dict]:
    """One JSON-ready dict per sample: source, class, label, exit, confidence, conformal set."""
    names = rt.class_names
    sets = rt.conformal_sets(res, alpha) if alpha is not None else None
    pred, conf = res.pred, res.confidence
    out = []
    for i in range(len(pred)):
        r = {"source": sources[i], "class": int(pred[i]), "label": names[int(pred[i])],
             "exit": int(res.exit_index[i]), "confidence": round(float(conf[i]), 6)}
        if sets is not None:
            r["set"] = [names[j] for j in np.flatnonzero(sets[i])]
        if labels is not None:
            r["target"] = int(labels[i])
            r["correct"] = bool(pred[i] == labels[i])
        if with_probs:
            r["probs"] = [round(float(p), 6) for p in res.probs[i]]
        out.append(r)
    return out


def summary(res: Results, rt, mode: str, seconds: float, labels: Optional[np.ndarray] = None,
            alpha: Optional[float] = None) -> Dict:
    """Exit histogram, mean cost (vs full model and plain backbone), accuracy if labelled, time."""
    n = len(res.exit_index)
    ex = rt.manifest.exits
    hist = res.exit_histogram(rt.num_exits)
    cost = np.asarray(ex.cost, dtype=np.float64)[res.exit_index] if n else np.zeros(0)
    cost_plain = np.asarray(ex.cost_vs_plain, dtype=np.float64)[res.exit_index] if n else np.zeros(0)
    out = {"samples": n, "mode": mode, "exit_histogram": hist,
           "mean_cost": float(cost.mean()) if n else None,
           "mean_cost_vs_plain": float(cost_plain.mean()) if n else None,
           "reach": list(res.reach), "seconds": round(seconds, 6),
           "ms_per_sample": round(1000 * seconds / n, 4) if n else None}
    if labels is not None and n:
        out["accuracy"] = float(np.mean(res.pred == labels))
    if alpha is not None:
        sets = rt.conformal_sets(res, alpha)
        if sets is not None and n:
            out["alpha"] = alpha
            out["mean_set_size"] = float(sets.sum(axis=1).mean())
            if labels is not None:
                out["coverage"] = float(np.mean(sets[np.arange(n), labels]))
    return out


def format_table(recs: List[Dict], summ: Dict, show: int = 20) -> str:
    lines = []
    shown = recs if show < 0 else recs[:show]
    if shown:
        w = max(6, max(len(r["source"]) for r in shown))
        has_set = "set" in shown[0]
        has_target = "target" in shown[0]
        head = f"{'input':<{w}}  {'class':>5}  {'label':<12} {'exit':>4}  {'conf':>6}"
        head += "  target" if has_target else ""
        head += "  conformal set" if has_set else ""
        lines.append(head)
        for r in shown:
            line = f"{r['source']:<{w}}  {r['class']:>5}  {r['label'][:12]:<12} {r['exit']:>4}  {r['confidence']:>6.3f}"
            if has_target:
                line += f"  {r['target']:>6}" + ("" if r["correct"] else " x")
            if has_set:
                line += "  {" + ", ".join(r["set"]) + "}"
            lines.append(line)
        if len(recs) > len(shown):
            lines.append(f"... {len(recs) - len(shown)} more (--show -1 for all, --json for machine-readable)")
        lines.append("")
    s = summ
    lines.append(f"{s['samples']} samples, mode {s['mode']}: exit histogram {s['exit_histogram']}")
    if s["mean_cost"] is not None:
        lines.append(f"mean cost {s['mean_cost']:.3f} of the full model ({s['mean_cost_vs_plain']:.3f} of the plain "
                     f"backbone); {s['ms_per_sample']:.3f} ms/sample")
    if "accuracy" in s:
        lines.append(f"accuracy {100 * s['accuracy']:.2f}%")
    if "mean_set_size" in s:
        cov = f", coverage {100 * s['coverage']:.1f}%" if "coverage" in s else ""
        lines.append(f"conformal sets (alpha {s['alpha']:g}): mean size {s['mean_set_size']:.2f}{cov}")
    return "\n".join(lines)


def parse_offsets(text: Optional[str]) -> Optional[List[float]]:
    """``"0,-0.1,0"`` -> floats (None for None/empty); a single value applies to every gate later."""
    from jei_edge.errors import InputError

    if text is None or not str(text).strip():
        return None
    try:
        return [float(v) for v in str(text).split(",")]
    except ValueError as exc:
        raise InputError(f"--offsets {text!r} must be comma-separated numbers, one per gated exit") from exc


def expand_offsets(offsets: Optional[List[float]], num_gates: int) -> Optional[tuple]:
    """One value means "the same offset at every gate"; a tuple (``Runtime.run`` checks it once)."""
    if offsets is None:
        return None
    if len(offsets) == 1 and num_gates != 1:
        offsets = offsets * num_gates
    return tuple(offsets)


def split_settings(label: str) -> List[str]:
    """``"row_workers=2, small_batch_rows=1"`` -> ``["row_workers=2", "small_batch_rows=1"]`` (the
    form of ``jei-edge profile --compare-settings``; each item as for ``--backend-opt``)."""
    return [kv.strip() for kv in label.split(",") if kv.strip()]


def parse_backend_options(items: Optional[Sequence[str]]) -> Dict[str, object]:
    """``["small_batch_rows=1", "allow_spinning=false"]`` -> ``{"small_batch_rows": 1, ...}``.

    Values: ``true``/``false`` -> bool, integers -> int, anything else stays a string; the backend
    (``OrtSettings.from_options`` on the CPU) checks names and types and names what is valid.
    """
    from jei_edge.errors import InputError

    out: Dict[str, object] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise InputError(f"backend option {item!r} is not KEY=VALUE", hint="e.g. --backend-opt small_batch_rows=1")
        if key in ("bundle", "device", "max_batch", "verify", "backend"):
            raise InputError(f"backend option {key!r} is not a backend setting",
                             hint="use the command's own flags (--device, --batch-size)")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        else:
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = value
    return out
