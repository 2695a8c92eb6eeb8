"""``jei-edge inspect BUNDLE``: stages, I/O, costs, precision, target and integrity status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from jei_edge.errors import JeiEdgeError
from jei_edge.bundle import Bundle


def _layout(e) -> str:  # a channels-last quantized edge ([H, W, C] per row)
    return " channels-last" if e.get("channels_last") else ""


def _io(entries) -> str:
    return ", ".join(f"{e['name']} {e.get('dtype', 'float32')}[{', '.join(str(d) for d in e['shape'])}]{_layout(e)}"
                     for e in entries)


def _io_short(entries) -> str:  # element type shown when not float32 (FP16 hidden states)
    return ", ".join(f"{e['name']}{'' if e.get('dtype', 'float32') == 'float32' else ' ' + e['dtype']}"
                     f"[{','.join(str(d) for d in e['shape'][1:])}]{_layout(e)}" for e in entries)


def describe_bundle(path) -> Dict[str, Any]:
    """What a bundle holds, as plain data; ``integrity`` lists problems instead of raising (the
    ``jei-edge inspect`` command then exits non-zero).

    Raises:
        BundleError: when the manifest is missing or malformed (the error names the field).
    """
    bundle = Bundle(Path(path), Bundle.read_manifest(path))
    m = bundle.manifest
    try:
        problems = bundle.verify()
    except (OSError, RuntimeError) as exc:  # a listed file that cannot be read, a symlink loop
        from jei_edge._io import shorten

        problems = [f"its files cannot be checked ({shorten(exc)})"]
    ex = m.exits
    stages = []
    for st in m.stages:
        d = st.to_dict()
        d.update({"exit_cost": ex.cost[st.exit], "exit_cost_vs_plain": ex.cost_vs_plain[st.exit]})
        stages.append(d)
    report = {}
    try:
        report = json.loads(bundle.file(m.report).read_text()) if m.report else {}
    except (OSError, ValueError, RuntimeError, JeiEdgeError):  # informative only; integrity problems are listed above
        report = {}
    md = m.to_dict()
    return {
        "kind": "bundle", "path": str(path), "name": m.name, "schema_version": m.schema_version,
        "created": m.created, "target": md["target"], "precision": m.precision,
        "backbone": m.backbone, "input": md["input"], "num_classes": m.num_classes,
        "class_names": list(m.class_names), "preprocessing": md["preprocessing"],
        "stages": stages, "plain": md["plain"], "costs": md["costs"],
        "exits": {"positions": list(ex.positions), "cost": list(ex.cost), "cost_vs_plain": list(ex.cost_vs_plain),
                  "alphas": list(ex.alphas)},
        "model_file": m.model_file, "toolchain": m.toolchain, "references": md["references"],
        "files": {k: v.get("size") for k, v in m.files.items()},
        "integrity": {"ok": not problems, "problems": problems},
        "parity": (report.get("decisions") or {}).get("agreement") if isinstance(report, dict) else None,
        "input_guard": bool(stages and stages[0]["input_guard"]),
        "plan": m.plan or {"mode": "every", "groups": [s["exits"] for s in stages]},
        "lowering": md["lowering"],
        "int8_fallback": m.int8_fallback,
    }


def format_bundle(info: Dict[str, Any]) -> str:
    bb = info.get("backbone") or {}
    tc = info["toolchain"]
    integ = info["integrity"]
    lines = [
        f"{info['path']}: jei-edge bundle (schema v{info['schema_version']}, built {info.get('created')})",
        f"  target     {info['target']['name']} ({info['target'].get('backend')}), precision {info['precision']}",
        f"  backbone   {bb.get('name')} ({bb.get('family')}), {bb.get('blocks')} blocks, "
        f"{info['num_classes']} classes; input {_io([info['input']])}",
        f"  toolchain  opset {tc.get('opset')}, onnxruntime {tc.get('onnxruntime')}, torch {tc.get('torch')}, "
        f"onnx {tc.get('onnx')}",
        "",
        f"  {'stage':>5}  {'blocks':>6}  {'exits':>5}  {'MACs':>12}  {'cost':>6}  {'vs plain':>8}  I/O (per row; dim 0 = batch)",
    ]
    for s in info["stages"]:
        blocks = f"{s['blocks'][0]}-{s['blocks'][1] - 1}"
        macs = f"{s['macs']:,}" if isinstance(s.get("macs"), int) else "?"
        ex = s["exits"]
        exits = f"{ex[0]}-{ex[-1]}" if len(ex) > 1 else str(ex[0])
        lines.append(f"  {s['index']:>5}  {blocks:>6}  {exits:>5}  {macs:>12}  {s['exit_cost']:>6.3f}  "
                     f"{s['exit_cost_vs_plain']:>8.3f}  {_io_short(s['inputs'])} -> {_io_short(s['outputs'])}")
    if info.get("plain"):
        lines.append(f"  plain backbone: {info['plain']['file']} ({_io(info['plain']['inputs'])} -> "
                     f"{_io(info['plain']['outputs'])})")
    plan = info.get("plan") or {}
    if plan.get("mode") == "auto":
        from jei_edge.profile.measure import format_interval

        ci = plan.get("expected_speedup_ci")
        gain = (f" ({plan['expected_speedup_over_every_exit']:.3f}x, 95% CI {format_interval(ci)})"
                if ci and "expected_speedup_over_every_exit" in plan else "")
        timed = f", candidates timed as {plan['timed_as']}" if plan.get("timed_as") else ""
        lines.append(f"  plan:      auto at batch {plan.get('batch')}: expected {plan.get('expected_ms_per_sample')} "
                     f"ms/sample vs {plan.get('expected_ms_per_sample_every_exit')} with a stage per exit{gain}{timed}")
    elif plan.get("mode") == "manual":
        lines.append(f"  plan:      manual, exits grouped {plan.get('groups')}")
    low = info.get("lowering")
    if low:
        engines = [e for st in info["stages"] for e in st.get("engines", [])]
        what = (f"{len(engines)} x {engines[0]['backend']} {engines[0]['toolchain']} for compute capability "
                f"{engines[0]['compute_capability']}, " + f"{sum(info['files'].get(e['file']) or 0 for e in engines):,} bytes"
                if engines else f"not built yet: run `jei-edge lower` on the board ({low['backend']} "
                f"{' or '.join(low['toolchain'])})")
        fp32 = [str(st["index"]) for st in info["stages"] for e in st.get("engines", [])
                if e.get("precision") != low["precision"]]
        lines.append(f"  engines:   {what}; {low['precision']}" + (f" ({low['int8']})" if low.get("int8") else "")
                     + (f" (stage(s) {', '.join(fp32)}: fp32)" if fp32 else "") + f", batch profile {low['profile']}")
    fb = info.get("int8_fallback") or {}
    if fb.get("mode") == "auto" and isinstance(fb.get("fp32_stages"), list):
        kept = ", ".join(str(k) for k in fb["fp32_stages"])
        lines.append(f"  int8:      {'stage(s) ' + kept + ' kept in FP32' if kept else 'every stage INT8'} "
                     f"(--int8-fallback auto)")
    if info.get("parity") is not None:
        lines.append(f"  build parity: exit-decision agreement {100 * info['parity']:.3f}% (see report.txt)")
    lines.append("  inputs:    NaN/inf rows caught by stage 0's in-graph guard" if info.get("input_guard")
                 else "  inputs:    NaN/inf rows caught by a numpy check before the run (no in-graph guard)")
    lines.append(f"  model.pt:  {'carried' if info.get('model_file') else 'not carried'}")
    refs = info.get("references")
    lines.append(f"  verify:    {refs['samples']} stored reference inputs (`jei-edge verify` re-checks them)" if refs
                 else "  verify:    no stored references (built before jei-edge verify existed)")
    a = info["exits"]["alphas"]
    lines.append(f"  conformal: {len(a)} alphas ({min(a):g}..{max(a):g})" if a else "  conformal: not calibrated")
    total = sum(v or 0 for v in info["files"].values())
    status = "ok (sha256 of every file matches the manifest)" if integ["ok"] else "FAILED"
    lines.append(f"  integrity: {status}; {len(info['files'])} files, {total:,} bytes")
    for p in integ["problems"]:
        lines.append(f"    - {p}")
    return "\n".join(lines)
