"""``jei-edge profile BUNDLE [INPUTS...]``: where the time goes, and how much early exit really saves."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from jei_edge.cli.options import device_option, emit_json, json_option


def _batch_sizes(text: str):
    from jei_edge.errors import InputError

    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise InputError(f"--batch-sizes must be comma-separated integers, got {text!r}") from exc
    if not sizes or any(s < 1 for s in sizes):
        raise InputError(f"--batch-sizes must be integers >= 1, got {text!r}", hint="e.g. --batch-sizes 1,64")
    return sizes


@click.command(name="profile")
@click.argument("bundle", type=click.Path())
@click.argument("inputs", nargs=-1)
@click.option("--data", default=None,
              help="Profile on this data source's test split instead of INPUTS: 'digits', "
                   "'synthetic[:key=value,...]', a .npz file or an image folder (needs the build extra).")
@click.option("--samples", type=int, default=512, show_default=True, help="Samples to use (at most).")
@click.option("--batch-sizes", default="1,64", show_default=True, help="Batch sizes to time, comma separated.")
@click.option("--repeats", type=int, default=7, show_default=True,
              help="Timed repeats per batch size (medians are reported).")
@click.option("--offsets", default=None, help="Per-gate threshold offsets, as for `jei-edge run`.")
@click.option("--preprocessed", is_flag=True, help="INPUTS are model inputs already (skip the bundle's normalisation).")
@click.option("--backend-opt", "backend_opts", multiple=True, metavar="KEY=VALUE",
              help="Backend setting, repeatable (as for `jei-edge run`).")
@click.option("--compare-settings", "compare_settings", multiple=True, metavar="KEY=VALUE[,KEY=VALUE...]",
              help="Also time the early-exit pass with these backend settings (on top of the target's), next "
                   "to the profiled one in every repeat, and say which is fastest per batch size; repeatable, "
                   "e.g. --compare-settings row_workers=4 --compare-settings intra_op_threads=1.")
@device_option
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Folder for profile.json and profile.png (default: NAME.profile beside the bundle).")
@click.option("--no-plot", is_flag=True, help="Skip the PNG and the plots of the HTML page (its tables stay).")
@click.option("--power", is_flag=True,
              help="Jetson boards: also measure energy per inference of the exit, full and plain passes "
                   "(tegrastats, or jtop when jetson-stats is installed; module power, carrier board not "
                   "included). Elsewhere it says it is unavailable and the profile still runs.")
@click.option("--power-seconds", type=float, default=2.0, show_default=True,
              help="With --power: seconds each pass is repeated for (after 1 s of idle power).")
@json_option
def profile(bundle, inputs, data, samples, batch_sizes, repeats, offsets, preprocessed, backend_opts, compare_settings,
            device, output, no_plot, power, power_seconds, as_json):
    """Profile BUNDLE on INPUTS (files or folders, as for `jei-edge run`) or on --data.

    \b
    Measures, per batch size (stages timed with the runtime's own executor and settings):
      - time per sample with early exit, at full depth, and of the plain one-graph backbone;
      - realized speedup (full / exit) and speedup vs the plain backbone;
      - realized/ideal efficiency (the stage runs alone / the early-exit time);
      - throughput, per-call latency percentiles, and each stage's latency on a full batch;
    plus the exit histogram and the theoretical speedup that counted MACs promise.
    With --power on a Jetson: energy per inference (exit, full, plain) and the board's facts.
    Writes profile.json, profile.png (matplotlib, the plots extra) and profile.html (one
    self-contained page: plots embedded, no network needed) into -o.

    \b
    Example:
      jei-edge profile runs/demo/model.jei runs/demo/test.npz
      jei-edge profile model.jei --data digits --batch-sizes 1,16,64 --json
      jei-edge profile model.jei test.npz --compare-settings row_workers=4 \\
          --compare-settings row_workers=4,small_batch_rows=1,small_batch_threads=0
    """
    from jei_edge.errors import DependencyError, InputError, JeiEdgeError
    from jei_edge.profile import format_profile, plot_profile, profile_bundle, write_json
    from jei_edge.runtime.output import expand_offsets, parse_backend_options, parse_offsets, split_settings
    from jei_edge.runtime.runtime import Runtime

    sizes = _batch_sizes(batch_sizes)
    if samples < 1:
        raise InputError(f"--samples must be >= 1, got {samples}")
    if repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}")
    if bool(inputs) == bool(data):
        raise InputError("give either INPUTS or --data (one of them)",
                         hint="e.g. `jei-edge profile model.jei test.npz` or `--data digits`")
    rt = Runtime.load(bundle, device=device, max_batch=max(sizes), **parse_backend_options(backend_opts))
    compare = {}
    for item in compare_settings:
        label = item.strip()
        if label in compare:
            raise InputError(f"--compare-settings {label!r} is given twice")
        opts = parse_backend_options(split_settings(label))
        if not opts:
            raise InputError("--compare-settings needs KEY=VALUE settings, got an empty value",
                             hint="e.g. --compare-settings row_workers=2")
        compare[label] = Runtime.load(bundle, device=device, max_batch=max(sizes), **opts)
    offs = expand_offsets(parse_offsets(offsets), rt.num_gates)
    if data:
        from jei_edge.data import load_data

        d = load_data(data, preprocessing=rt.preprocessing)
        x, y = d.test.x, d.test.y
    else:
        from jei_edge.runtime.inputs import load_inputs

        batch = load_inputs(list(inputs), rt.preprocessing, preprocessed, rt.class_names)
        x, y = batch.x, batch.y
    n = min(samples, len(x))
    if n < max(sizes):
        raise InputError(f"{n} sample(s) are fewer than the largest batch size {max(sizes)}",
                         hint="give more samples (--samples) or smaller --batch-sizes")
    log = (lambda msg: None) if as_json else (lambda msg: click.echo(msg, err=True))
    out_dir = Path(output) if output else Path(bundle).with_suffix(".profile")
    if out_dir.exists() and not out_dir.is_dir():
        raise JeiEdgeError(f"output '{out_dir}' exists and is not a folder", hint="pass -o FOLDER")
    if power_seconds <= 0:
        raise InputError(f"--power-seconds must be > 0, got {power_seconds}")
    info = profile_bundle(rt, x, y, batch_sizes=sizes, repeats=repeats, samples=n, offsets=offs, progress=log,
                          compare=compare or None)
    if power:
        info["energy"] = _energy(rt, x, sizes, n, offs, power_seconds, log)
    info["files"] = {"json": str(out_dir / "profile.json")}
    if not no_plot:
        try:
            info["files"]["png"] = str(plot_profile(info, out_dir / "profile.png"))
        except DependencyError as exc:
            info["files"]["png"] = None
            log(f"no plot: {exc.message} ({exc.hint})")
    from jei_edge.profile import write_html

    info["files"]["html"] = str(out_dir / "profile.html")
    curve = None
    if y is not None and importlib.util.find_spec("onnxruntime") is not None:
        from jei_edge.profile.tune import offset_curve

        curve = offset_curve(rt.bundle, x[:n], y[:n], offs if offs is not None else rt.default_offsets)
    write_html(info, out_dir / "profile.html", energy=_energy_table(info.get("energy")), curve=curve)
    write_json(info, out_dir / "profile.json")
    if as_json:
        emit_json(info)
    else:
        click.echo(format_profile(info))
        click.echo("  wrote " + ", ".join(v for v in info["files"].values() if v))


def _energy(rt, x, sizes, n, offsets, seconds, log):
    """``measure_energy`` under a running power sampler, or why there is none here."""
    from jei_edge.profile import measure_energy
    from jei_edge.profile.power import CARRIER_NOTE, PowerSampler, available, board_facts

    reason = available()
    if reason is not None:
        log(f"power: unavailable here: {reason}")
        return {"available": False, "reason": reason}
    with PowerSampler(interval_ms=50) as sampler:
        sampler.wait_for(2, timeout=3.0)
        out = measure_energy(rt, x, sizes, sampler, seconds=seconds, offsets=offsets, samples=n, progress=log)
        out.update({"available": True, "source": sampler.source, "board": board_facts(), "note": CARRIER_NOTE,
                    "sampler_note": sampler.note, "skipped_lines": sampler.skipped})
    return out


def _energy_table(energy):
    """The HTML page's energy section: per batch size and pass, mJ per inference and power."""
    if not energy or not energy.get("available"):
        return None
    table = {}
    for bsz, entry in energy["batches"].items():
        for mode in ("exit", "full", "plain"):
            if mode in entry:
                e = entry[mode]
                table[f"batch {bsz} {mode}"] = {"mj_per_inference": e["mj_per_inference"], "mean_mw": e["mean_mw"],
                                                "idle_mw": e["idle_mw"]}
    return {**table, "board": energy.get("board", {}), "note": energy.get("note", "")}
