"""``jei-edge eval``: accuracy, cost, exits, ECE and conformal sets of a model.pt, next to the
thresholding baselines at matched mean cost: (a) p_max and (b) max-logit on the model's own IMs,
(c) p_max and (d) max-logit on its warm-up-only IMs (when the checkpoint carries them)."""

from __future__ import annotations

import click

from jei_edge.cli.options import emit_json, json_option
from jei_edge.errors import JeiEdgeError


def format_report(info: dict) -> str:
    jei, base = info["jei"], info["baseline"]["at_jei_cost"]
    lines = [
        f"{info['model']}: {info['backbone']} on '{info['data']}' ({info['split']} split, {info['n_test']} samples, "
        f"split seed {info['split_seed']})",
        "",
        f"  {'':<28}{'JEI-DNN':>10}{'threshold':>12}",
        f"  {'accuracy (at JEI cost)':<28}{100 * jei['accuracy']:>9.2f}%{100 * base['interpolated_accuracy']:>11.2f}%",
        f"  {'nearest baseline point':<28}{'':>10}{100 * base['accuracy']:>11.2f}%",
        f"  {'mean cost (vs full model)':<28}{jei['mean_cost']:>10.3f}{base['mean_cost']:>12.3f}",
        f"  {'mean cost (vs plain)':<28}{jei['mean_cost_vs_plain']:>10.3f}{base['mean_cost_vs_plain']:>12.3f}",
        f"  {'ECE (x100, 15 bins)':<28}{jei['ece']:>10.2f}{base['ece']:>12.2f}",
    ]
    jc, bc = jei.get("conformal"), base.get("conformal")
    if jc and bc:
        lines.append("")
        lines.append(f"  {'alpha':<8}{'JEI set size':>14}{'coverage':>10}{'thr set size':>14}{'coverage':>10}")
        for a, b in zip(jc, bc):
            lines.append(f"  {a['alpha']:<8.3f}{a['mean_set_size']:>14.2f}{a['coverage']:>10.3f}"
                         f"{b['mean_set_size']:>14.2f}{b['coverage']:>10.3f}")
    n = max(info["n_test"], 1)
    lines += ["", f"  {'exit':>4}  {'cost':>6}  {'IM acc':>7}  {'JEI exits':>10}  {'thr exits':>10}"]
    for k, (c, acc, hj, hb) in enumerate(zip(info["costs"]["cost"], info["per_exit_accuracy"],
                                             jei["exit_histogram"], base["exit_histogram"])):
        lines.append(f"  {k:>4}  {c:>6.3f}  {100 * acc:>6.1f}%  {hj:>5} {100 * hj / n:>3.0f}%  {hb:>5} {100 * hb / n:>3.0f}%")
    lines.append("")
    lines.append(f"  baselines at JEI's mean cost {jei['mean_cost']:.3f} (thresholds fitted on validation, "
                 f"{len(info['baseline']['curve'])} budgets each; --json for the curves):")
    for name, b in info["baselines"].items():
        at = b["at_jei_cost"]
        delta = 100 * (jei["accuracy"] - at["interpolated_accuracy"])
        lines.append(f"    ({name}) {b['label']:<32}{100 * at['interpolated_accuracy']:>7.2f}%   JEI {delta:+.2f} pts")
    if not info.get("warmup_ims"):
        lines.append("    (c), (d): this checkpoint has no warm-up IM weights (re-train it to get them)")
    lines.append(f"  threshold column = baseline (a) at the nearest budget q={base['q']:g}")
    return "\n".join(lines)


@click.command(name="eval")
@click.argument("model", type=click.Path())
@click.option("--data", "data", default=None,
              help="Data source ('digits', 'synthetic[:...]', .npz, image folder); default: the one it was trained on.")
@click.option("--seed", type=int, default=None,
              help="Split seed (default: the training split seed, so the test split is held out).")
@click.option("--split", type=click.Choice(["test", "val", "calib", "train"]), default="test", show_default=True,
              help="Which split to report on.")
@click.option("--offsets", default=None, help="Per-gate threshold offsets, comma separated (default all 0).")
@click.option("--batch-size", type=int, default=512, show_default=True)
@json_option
def eval_command(model, data, seed, split, offsets, batch_size, as_json):
    """Evaluate MODEL (a model.pt): JEI accuracy, mean cost, exit histogram, ECE and conformal sets,
    next to thresholding baselines at matched mean cost.

    \b
    Baselines (thresholds fitted on the validation split, geometric budgets):
      (a) p_max on the model's own IMs (the strongest: it isolates the gates)
      (b) max-logit on the model's own IMs
      (c) p_max on the IMs as they were after the warm-up phase
      (d) max-logit on the warm-up IMs (the JEI-DNN reference's thresholding helper)
    (c) and (d) need a checkpoint that carries warm-up IMs (written by this version of train).
    """
    from dataclasses import replace

    from jei_edge.data import load_data
    from jei_edge.model.checkpoint import model_from_checkpoint, read_checkpoint
    from jei_edge.train.evaluate import evaluate_checkpoint

    if batch_size < 1:
        raise JeiEdgeError(f"--batch-size must be >= 1, got {batch_size}")
    if seed is not None and seed < 0:
        raise JeiEdgeError(f"--seed must be >= 0, got {seed}")
    ckpt = read_checkpoint(model)
    model_from_checkpoint(ckpt, source=f"checkpoint '{model}'")  # every field and tensor checked before the data loads
    record = ckpt.get("training", {}).get("data", {})
    source = data or record.get("source")
    if not source:
        raise JeiEdgeError(f"'{model}' does not record its training data", hint="pass --data SOURCE")
    split_seed = seed if seed is not None else int(record.get("split_seed", 0))
    splits = load_data(source, seed=split_seed, preprocessing=ckpt["preprocessing"])
    if splits.class_names != [str(c) for c in ckpt["class_names"]]:
        from jei_edge._io import shorten

        raise JeiEdgeError(f"data '{source}' has classes {shorten(splits.class_names, 120)}, the model was trained "
                           f"on {shorten(ckpt['class_names'], 120)}", hint="evaluate on data with the same classes")
    if split != "test":
        splits = replace(splits, test=splits.split(split))
    n_gates = len(ckpt["exits"]["positions"])
    deltas = None
    if offsets:
        try:
            deltas = [float(v) for v in offsets.split(",")]
        except ValueError as exc:
            raise JeiEdgeError(f"--offsets '{offsets}' is not a comma-separated list of numbers") from exc
        if len(deltas) == 1:
            deltas = deltas * n_gates
        if len(deltas) != n_gates:
            raise JeiEdgeError(f"--offsets has {len(deltas)} values, the model has {n_gates} gates",
                               hint="give one value for all gates or one per gate")
    info = evaluate_checkpoint(ckpt, splits, offsets=deltas, batch_size=batch_size)
    info.update({"model": str(model), "backbone": ckpt["config"]["backbone"], "data": source, "split": split,
                 "split_seed": split_seed, "lambda": ckpt.get("training", {}).get("lambda"), "offsets": deltas})
    if as_json:
        emit_json(info)
    else:
        click.echo(format_report(info))
