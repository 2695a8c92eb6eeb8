"""``jei-edge targets [NAME|FILE.toml]``: the hardware targets a bundle can be built for."""

from __future__ import annotations

import json
import textwrap
from typing import List, Optional

import click

from jei_edge.cli.options import emit_json, json_option

_BACKEND_ORDER = {"onnxruntime": 0, "tensorrt_rtx": 1, "tensorrt": 2}
# component -> (label in full, label in the table or None to leave it out of the table)
_TOOL_LABELS = {"jetpack": ("JetPack", "JP"), "tensorrt": ("TensorRT", "TRT"),
                "tensorrt_rtx": ("TensorRT-RTX", "TRT-RTX"), "onnxruntime": ("onnxruntime", "ort"),
                "cuda": ("CUDA", None), "python": ("Python", None)}


def _sort_key(t):
    cc = tuple(int(p) for p in t.compute_capability.split(".")) if t.compute_capability else (0, 0)
    return (_BACKEND_ORDER.get(t.backend, 9), cc, t.memory_mib or 0, t.name)


def _gib(mib: Optional[int], unit: str = " GiB") -> str:
    if mib is None:
        return "-"
    return f"{mib / 1024:g}{unit}"


def _memory(t) -> str:
    if t.memory_mib is None and t.workspace_mib is None:
        return "-"
    text = _gib(t.memory_mib, "G") + (" shared" if t.shared_memory else "")
    return text + (f", ws {_gib(t.workspace_mib, 'G')}" if t.workspace_mib is not None else "")


def _toolchain(t, short: bool = True) -> str:
    """``JetPack 6.1/6.2, TensorRT 10.3, ...`` (``short``: the table's abbreviated subset)."""
    parts = []
    for key in [*_TOOL_LABELS, *(k for k in t.toolchain if k not in _TOOL_LABELS)]:
        if key not in t.toolchain:
            continue
        full, abbrev = _TOOL_LABELS.get(key, (key, key))
        label = abbrev if short else full
        if label is None:
            continue
        versions = "/".join(t.toolchain[key])
        parts.append(f"{label}{'' if versions.startswith('>=') else ' '}{versions}")
    return ", ".join(parts) or "-"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v, default=str)


def _precisions(t) -> str:
    return " ".join(p + ("*" if p == t.default_precision else "") for p in t.precisions)


def _device(t) -> str:
    return t.device + (f" {t.compute_capability}" if t.compute_capability else "")


def format_table(targets: List) -> str:
    """One line per target (``jei-edge targets``)."""
    head = ("name", "backend", "device", "precisions", "batch", "memory", "toolchain", "DLA", "built")
    rows = [(t.name, t.backend, _device(t), _precisions(t), "/".join(map(str, t.batch_profile)), _memory(t),
             _toolchain(t), str(t.dla) if t.dla else "-", "here" if t.builds_here else "on the board")
            for t in targets]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.append("* default precision; batch: min/opt/max rows; memory: shared = the CPU's DRAM, ws = builder workspace")
    lines.append("on the board: Jetson engines are built there (`jei-edge lower`); `jei-edge targets NAME`: details")
    return "\n".join(lines)


def format_target(t) -> str:
    """One target in full (``jei-edge targets NAME``)."""
    lines = [f"{t.name}: {t.description}" if t.description else t.name,
             f"  backend       {t.backend} on {_device(t)}",
             f"  precisions    {', '.join(t.precisions)} (default {t.default_precision})",
             f"  batch         min {t.min_batch}, opt {t.opt_batch}, max {t.max_batch}",
             f"  memory        {_gib(t.memory_mib)}{' (shared with the CPU)' if t.shared_memory else ''}; "
             f"builder workspace {_gib(t.workspace_mib) if t.workspace_mib is not None else 'backend default'}",
             f"  toolchain     {_toolchain(t, short=False)}",
             f"  DLA           {t.dla or 'none'}",
             f"  ONNX opset    {t.opset}",
             f"  built         {t.build_location}"]
    if t.backend_options:
        opts = ", ".join(f"{k} = {_toml_value(v)}" for k, v in t.backend_options.items())
        lines.append(f"  [{t.backend}]".ljust(15) + " " + opts)
    if t.notes:
        lines.append(textwrap.fill(t.notes, width=100, initial_indent="  notes         ",
                                   subsequent_indent=" " * 16))
    lines.append(f"  file          {t.source}")
    return "\n".join(lines)


@click.command(name="targets")
@click.argument("name", required=False)
@json_option
def targets(name, as_json):
    """List the hardware targets bundles can be built for (`--target NAME` of `jei-edge build`):
    backend, compute capability, precisions (default marked *), batch profile (min/opt/max),
    memory, expected toolchain, DLA cores and where engines are built ("here" for cpu and
    TensorRT-RTX, on the Jetson itself for TensorRT). NAME (a target name or a FILE.toml, which is
    validated) shows one target in full."""
    from jei_edge.runtime.targets import load_target, load_targets

    if name is not None:
        t = load_target(name)
        if as_json:
            emit_json(t.to_dict())
        else:
            click.echo(format_target(t))
        return
    catalog = sorted(load_targets(), key=_sort_key)
    if as_json:
        emit_json([t.to_dict() for t in catalog])
    elif not catalog:
        click.echo("no targets installed (the package's targets/ folder is missing)")
    else:
        click.echo(format_table(catalog))
