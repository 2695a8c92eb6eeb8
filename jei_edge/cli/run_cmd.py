"""``jei-edge run BUNDLE INPUTS...`` (or ``--data SOURCE``): run a compiled bundle with per-sample early exit."""

from __future__ import annotations

import time

import click

from jei_edge.cli.options import device_option, emit_json, json_option, public_key_option


@click.command(name="run")
@click.argument("bundle", type=click.Path())
@click.argument("inputs", nargs=-1)
@click.option("--data", "data", default=None,
              help="Run on this data source's test split instead of INPUTS (labelled: accuracy is reported): "
                   "'digits', 'synthetic[:key=value,...]', a .npz file or an image folder.")
@device_option
@click.option("--mode", type=click.Choice(["exit", "full"]), default="exit", show_default=True,
              help="exit: per-sample early termination; full: every sample runs every stage.")
@click.option("--offsets", default=None,
              help="Per-gate threshold offsets, comma separated (one value applies to every gate); "
                   "negative exits earlier and cheaper.")
@click.option("--alpha", type=float, default=0.05, show_default=True,
              help="Conformal-set alpha (from the bundle's qhat table; ignored if not calibrated).")
@click.option("--batch-size", type=int, default=None, help="Rows per run (default: the bundle's max batch).")
@click.option("--preprocessed", is_flag=True, help="Inputs are model inputs already (skip the bundle's normalisation).")
@click.option("--show", type=int, default=20, show_default=True, help="Table rows to print (-1: all).")
@click.option("--backend-opt", "backend_opts", multiple=True, metavar="KEY=VALUE",
              help="Backend setting, repeatable; on the CPU an onnxruntime setting such as intra_op_threads=1, "
                   "small_batch_rows=1 (1-thread sessions when one row is live), row_workers=2 (a call's rows "
                   "split over 2 one-thread workers; faster at batch >= 8 for small models) or allow_spinning=false "
                   "(defaults: the bundle's target; see docs/runtime.md; compare them with `jei-edge profile`).")
@public_key_option
@json_option
def run(bundle, inputs, data, device, mode, offsets, alpha, batch_size, preprocessed, show, backend_opts, public_key,
        as_json):
    """Run BUNDLE (a NAME.jei directory) on INPUTS: .npy/.npz files (raw values in [0, 1] unless
    --preprocessed; uint8 = pixels), image files, or folders (one sub-folder per class gives labels
    and accuracy). Prints the class, exit, confidence and conformal set of each sample and a summary."""
    from jei_edge.errors import JeiEdgeError
    from jei_edge.runtime.inputs import load_inputs
    from jei_edge.runtime.output import (expand_offsets, format_table, parse_backend_options, parse_offsets, records,
                                         summary)
    from jei_edge.runtime.runtime import Runtime

    if batch_size is not None and batch_size < 1:
        raise JeiEdgeError(f"--batch-size must be >= 1, got {batch_size}")
    rt = Runtime.load(bundle, device=device, max_batch=batch_size, public_key=public_key,
                      **parse_backend_options(backend_opts))
    offs = expand_offsets(parse_offsets(offsets), rt.num_gates)
    if rt.qhat(alpha) is None:
        alpha = None
    if bool(inputs) == bool(data):
        raise JeiEdgeError("give either INPUTS or --data (one of them)",
                           hint="e.g. `jei-edge run model.jei test.npz` or `jei-edge run model.jei --data digits`")
    if data:
        from jei_edge.data import load_data
        from jei_edge.runtime.inputs import InputBatch

        test = load_data(data, input_shape=tuple(rt.input_shape), preprocessing=rt.preprocessing).test
        batch = InputBatch([f"{data}:test[{i}]" for i in range(len(test.y))], test.x, test.y)
    else:
        batch = load_inputs(list(inputs), rt.preprocessing, preprocessed, rt.class_names)
    t = time.perf_counter()
    res = rt.run(batch.x, mode=mode, offsets=offs)
    seconds = time.perf_counter() - t
    recs = records(res, rt, batch.sources, alpha, batch.y)
    summ = summary(res, rt, mode, seconds, batch.y, alpha)
    summ["offsets"] = rt.offsets_label(offs) if mode == "exit" else "full mode (no exits)"
    if as_json:
        emit_json({"bundle": str(bundle), "samples": recs, "summary": summ})
    else:
        click.echo(format_table(recs, summ, show))
        click.echo(f"offsets: {summ['offsets']}")
