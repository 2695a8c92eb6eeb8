"""``jei-edge inspect``: what is inside a model.pt or a compiled bundle."""

from __future__ import annotations

from pathlib import Path

import click

from jei_edge.cli.options import emit_json, json_option


def describe_checkpoint(path) -> dict:
    """Architecture, exits and costs of a ``model.pt`` as plain data."""
    from jei_edge.model.checkpoint import model_from_checkpoint, read_checkpoint

    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, source=f"checkpoint '{path}'")
    costs = ckpt["costs"]
    n_params = sum(p.numel() for p in model.parameters())
    exits = []
    for l in range(model.num_exits):
        gated = l < model.num_gates
        exits.append({
            "exit": l,
            "after_block": model.exits[l] if gated else len(model.blocks) - 1,
            "kind": "im+gate" if gated else "final head",
            "macs": costs["exit_macs"][l],
            "cost": costs["cost"][l],
            "cost_vs_plain": costs["cost_vs_plain"][l],
            "pos_weight": ckpt["exits"]["pos_weights"][l] if gated else None,
        })
    calib = ckpt["calibration"]
    return {
        "kind": "checkpoint",
        "path": str(path),
        "format_version": ckpt["format_version"],
        "backbone": ckpt["config"]["backbone"],
        "backbone_kwargs": ckpt["config"].get("backbone_kwargs", {}),
        "family": model.spec.family,
        "blocks": len(model.blocks),
        "parameters": int(n_params),
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "class_names": ckpt["class_names"],
        "preprocessing": ckpt["preprocessing"],
        "exits": exits,
        "full_macs": costs["full_macs"],
        "plain_macs": costs["plain_macs"],
        "conformal_alphas": calib.get("alphas", []),
        "training": ckpt.get("training", {}),
    }


def format_checkpoint(info: dict) -> str:
    lines = [
        f"{info['path']}: JEI-DNN checkpoint (format v{info['format_version']})",
        f"  backbone   {info['backbone']} ({info['family']}), {info['blocks']} blocks, "
        f"{info['parameters']:,} parameters",
        f"  input      {tuple(info['input_shape'])}, {info['num_classes']} classes",
        f"  MACs       plain backbone {info['plain_macs']:,}; with all exits {info['full_macs']:,} "
        f"(+{100 * (info['full_macs'] / info['plain_macs'] - 1):.2f}%)",
        "",
        f"  {'exit':>4}  {'block':>5}  {'kind':<10}  {'MACs':>12}  {'cost':>6}  {'vs plain':>8}  {'pos_w':>6}",
    ]
    for e in info["exits"]:
        pw = "" if e["pos_weight"] is None else f"{e['pos_weight']:.2f}"
        lines.append(f"  {e['exit']:>4}  {e['after_block']:>5}  {e['kind']:<10}  {e['macs']:>12,}  "
                     f"{e['cost']:>6.3f}  {e['cost_vs_plain']:>8.3f}  {pw:>6}")
    if info["conformal_alphas"]:
        a = info["conformal_alphas"]
        lines.append(f"\n  conformal qhat table: {len(a)} alphas ({min(a):g}..{max(a):g})")
    else:
        lines.append("\n  conformal qhat table: none (not calibrated)")
    return "\n".join(lines)


def _kind(p: Path) -> str:
    from jei_edge.runtime.inputs import path_kind

    return path_kind(p, "path", hint="pass a model.pt checkpoint or a compiled bundle directory NAME.jei")


@click.command()
@click.argument("path", type=click.Path())
@json_option
def inspect(path, as_json):
    """Show what is inside PATH: a model.pt checkpoint (architecture, exits, costs) or a compiled
    bundle directory NAME.jei/ (stages, I/O, costs, precision, target, integrity status).
    Exits non-zero when a bundle fails its integrity check (after showing what it holds)."""
    from jei_edge._io import shorten
    from jei_edge.errors import BundleError

    p = Path(path)
    if _kind(p) == "dir":
        from jei_edge.runtime.inspect import describe_bundle, format_bundle

        info = describe_bundle(p)
        text = format_bundle
    else:
        info = describe_checkpoint(p)
        text = format_checkpoint
    if as_json:
        emit_json(info)
    else:
        click.echo(text(info))
    problems = info.get("integrity", {}).get("problems") if info.get("kind") == "bundle" else None
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise BundleError(f"bundle '{p}' failed its integrity check: {shorten(problems[0])}{more}",
                          hint="rebuild it with `jei-edge build`, or copy it again")
