"""The build report's text form (``report.txt`` in the bundle)."""

from __future__ import annotations

from typing import Dict


def _decision_lines(d: Dict) -> list:
    b = d["rate_bound"]
    rule = (f"(all within the tie band |g - thr| < {d['tolerance']:g})" if "min_agreement" not in d else
            f"(INT8 vs the FP32 model; required >= {100 * d['min_agreement']:.1f}%; "
            f"{d['disagreements_within_tie_band']} within the FP32 tie band)")
    lines = []
    if "floor_on" in d:
        syn = d.get("synthetic_agreement")
        lines.append(f"             INT8 floor held on {d['floor_on']}: {100 * d['floor_agreement']:.2f}%"
                     + ("" if syn is None else f"; synthetic inputs apart: {100 * syn:.2f}%"))
    return lines + [f"             agreement {100 * d['agreement']:.3f}%, {d['disagreements']} differ {rule}",
            f"             rate of {b['counted']} < {100 * b['upper']:.3g}% ({100 * b['confidence']:.0f}% "
            f"confidence, {b['k']} of {b['n']})",
            f"             exit histogram PyTorch {d['exit_histogram_pytorch']}, bundle {d['exit_histogram_bundle']}",
            f"             probs at exit max abs error {d['exit_probs_max_abs_error']:.2e}, "
            f"full mode {d['full_mode_probs_max_abs_error']:.2e}"]


def _lowering_lines(low: Dict) -> list:
    if not low.get("stages"):
        return [f"  lowering   {low['note']}"]
    cache = low.get("cache") or {}
    lines = [f"  engines    {low['engines']} x {low['backend']} {low['toolchain']}, compute capability "
             f"{low['compute_capability']}, {low['precision']}" + (f" ({low['int8']})" if low.get("int8") else "")
             + f", batch profile {low['profile']}; cache {cache.get('hits', 0)} hit(s), {cache.get('misses', 0)} built"]
    for row in low["stages"]:
        layers = ", ".join(f"{k} {v}" for k, v in sorted(row["layers"].items())) or "from the cache"
        prec = f"{row['precision']}, " if row.get("precision", low["precision"]) != low["precision"] else ""
        lines.append(f"             stage {row['stage']}: {prec}{row['bytes'] / 2**20:.2f} MiB in {row['seconds']:.2f} s "
                     f"(network layers by output type: {layers})")
    if low.get("note"):
        lines.append(f"             {low['note']}")
    return lines


def summary_text(report: Dict) -> str:
    """Human-readable summary of a build report (``build_bundle``'s return value)."""
    d, s, c = report["decisions"], report["stage_parity"], report["check"]
    lines = [f"jei-edge build report: {report['bundle']}",
             f"  model      {report['model']}",
             f"  target     {report['target']} ({report['precision']}), {report['num_stages']} stages, "
             f"opset {report['opset']}"]
    fold, att = report.get("shape_folding"), report.get("attention_fusion")
    if fold and fold["graphs"]:
        kept = f"; exported graphs kept: {'; '.join(fold['kept_exported'])}" if fold["kept_exported"] else ""
        lines.append(f"  graphs     batch-only shape arithmetic folded: {fold['nodes_before']} -> {fold['nodes_after']} "
                     f"ONNX nodes over {fold['graphs']} graphs{kept}")
    if att and att["asked"]:
        kept = f"; kept unfused: {'; '.join(att['kept_exported'])}" if att["kept_exported"] else ""
        lines.append(f"             {att['blocks']} attention blocks in {att['graphs']} graphs fused into onnxruntime's "
                     f"Attention kernel{kept}")
    q = report.get("quantization")
    if q:
        lines.append(f"  int8       recipe '{q['recipe']}' ({q['method']}, activations {q['activations']}, weights "
                     f"{q['weights']}; FP32: {', '.join(q['fp32'])}); calibration {q['calibration_samples']} samples, "
                     "rows per stage " + str([st['calibration_rows'] for st in q['stages']]))
        f = q.get("fallback") or {}
        if f.get("mode") == "auto":
            kept = (f"stage(s) {', '.join(map(str, f['fp32_stages']))} kept in FP32"
                    if f["fp32_stages"] else "every stage INT8")
            lines.append(f"             fallback: {kept}; exit decisions of {f.get('chosen_on', f['inputs'])} agree "
                         f"with FP32 on {100 * f['agreement']:.2f}% (all INT8: {100 * f['agreement_all_int8']:.2f}%, "
                         f"target {100 * f['target']:.2f}%)")
    lines.append(f"  parity     per stage on {s['samples']} inputs (tolerance {s['tolerance']:g}):")
    for row in s["stages"]:
        errs = ", ".join(f"{k} {v:.2e}" for k, v in row["max_abs_error"].items())
        lines.append(f"             stage {row['stage']}: {errs}")
    lines.append(f"             plain backbone: probs {s['plain']['max_abs_error']['probs']:.2e}")
    sized = (f"auto: ~{c['budget_seconds']:g} s budget = 3 x export, {c['probe_ms_per_input']:g} ms/input measured"
             if c["mode"] == "auto" else "explicit")
    lines.append(f"  decisions  {d['samples']} inputs ({sized}; "
                 f"{', '.join(f'{k} {v}' for k, v in report['parity_inputs'].items())})")
    lines += _decision_lines(d)
    r = report["references"]
    lines += [f"  stored     {r['samples']} reference inputs in {r['file']} (`jei-edge verify` re-checks them)",
              *_lowering_lines(report["lowering"]),
              f"  time       {report['seconds']}"]
    lines += [f"  note       {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
