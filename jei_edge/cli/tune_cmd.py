"""``jei-edge tune BUNDLE --data SOURCE --budget cost=0.5``: the most accurate exits within a budget."""

from __future__ import annotations

from pathlib import Path

import click

from jei_edge.cli.options import emit_json, json_option


@click.command(name="tune")
@click.argument("bundle", type=click.Path())
@click.option("--data", "data", default=None,
              help="Labelled data: 'digits', 'synthetic[:key=value,...]', a .npz file (x, y) or an image folder. "
                   "Its validation split chooses the offsets, its calibration split recomputes the conformal "
                   "table, its test split reports the result.")
@click.option("--budget", default=None, metavar="cost=F | latency-ms=MS",
              help="cost=0.5: mean MACs at most half the full model's; latency-ms=2.0: at most 2 ms per sample "
                   "at --batch, measured on this machine with the bundle's backend.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size a latency budget is for.")
@click.option("--seed", type=int, default=0, show_default=True, help="Data split and search seed.")
@click.option("--repeats", type=int, default=5, show_default=True, help="Timing repeats (latency budgets).")
@click.option("--dry-run", is_flag=True, help="Report the choice without writing it into the bundle.")
@click.option("--clear", is_flag=True, help="Remove the bundle's deploy profile instead (back to offsets 0).")
@click.option("--plot", type=click.Path(), default=None,
              help="Write the accuracy/cost curve (JEI vs thresholding, chosen point) to this PNG.")
@json_option
def tune(bundle, data, budget, batch, seed, repeats, dry_run, clear, plot, as_json):
    """Choose per-gate threshold offsets for BUNDLE: the most accurate setting on --data's
    validation split whose cost (or measured latency) fits --budget, searched over offset vectors
    (not one shared offset). Recomputes the conformal table for it on the calibration split,
    reports test accuracy and cost beside the max-softmax thresholding baseline on the same exits,
    and writes both into the bundle as its deploy profile (atomically): `jei-edge run`,
    `jei-edge-run` and `jei-edge profile` then use it by default (`--offsets` overrides).

    \b
    Examples:
      jei-edge tune model.jei --data digits --budget cost=0.3
      jei-edge tune model.jei --data digits --budget latency-ms=0.5 --batch 8 --plot tune.png
    """
    from jei_edge.profile.tune import parse_budget, plot_curves, write_deploy
    from jei_edge.profile.tune import tune as run_tune

    if clear:
        from jei_edge.bundle import Bundle

        write_deploy(Bundle.open(bundle), None)
        click.echo(f"removed the deploy profile of {bundle}: runs use offsets 0")
        return
    if not data or not budget:
        raise click.UsageError("--data and --budget are required (or --clear)")
    b = parse_budget(budget, batch)
    if repeats < 1:
        raise click.BadParameter("--repeats must be >= 1")
    say = None if as_json else (lambda msg: click.echo(msg, err=True))
    report = run_tune(bundle, data, b, seed=seed, repeats=repeats, write=not dry_run, progress=say)
    if plot:
        from jei_edge.errors import DependencyError

        try:
            report["plot"] = plot_curves(report, Path(plot))
        except DependencyError as exc:
            report["plot"] = None
            if say:
                say(f"no plot: {exc.message} ({exc.hint})")
    if as_json:
        emit_json(report)
        return
    v, t = report["validation"], report["test"]
    d = t["default_offsets"]
    lat = (f", predicted {v['latency_ms']:.3f} ms/sample (measured on test: {t['measured_latency_ms']:.3f})"
           if v.get("latency_ms") is not None else "")
    click.echo(f"tuned {bundle} for {report['budget']} on {data} ({report['searched']} offset vectors searched)")
    click.echo("  offsets     " + ", ".join(f"{o:+.3f}" for o in report["offsets"]))
    click.echo(f"  validation  accuracy {100 * v['accuracy']:.2f}%, cost {v['cost']:.3f}{lat}")
    click.echo(f"  test        accuracy {100 * t['accuracy']:.2f}%, cost {t['cost']:.3f} "
               f"(offsets 0: {100 * d['accuracy']:.2f}% at {d['cost']:.3f}; thresholding baseline at this cost: "
               f"{100 * t['baseline_accuracy_at_cost']:.2f}%)")
    click.echo(f"  conformal   table recomputed on {report['conformal']['calibration_samples']} calibration samples")
    click.echo("  " + ("wrote the deploy profile into the bundle" if report["written"] else "dry run: bundle unchanged")
               + (f"; plot {report['plot']}" if report.get("plot") else ""))
