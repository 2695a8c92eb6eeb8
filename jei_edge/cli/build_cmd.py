"""``jei-edge build model.pt``: compile a checkpoint into a staged bundle NAME.jei/."""

from __future__ import annotations

import click

from jei_edge.cli.options import emit_json, json_option, output_option, seed_option, target_option


@click.command(name="build")
@click.argument("model", type=click.Path())
@output_option
@target_option
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Engine precision (default: the target's; the cpu target builds fp32).")
@click.option("--data", "data", default=None,
              help="Real inputs for the parity check, --plan auto and INT8 calibration (default: the data source "
                   "recorded in the checkpoint).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at the output path.")
@click.option("--no-model", "no_model", is_flag=True,
              help="Do not carry model.pt in the bundle (the torch-cuda executor needs it).")
@click.option("--parity-samples", default="auto", show_default=True,
              help="Inputs for the end-to-end exit-decision check (real + synthetic): 'auto' sizes it from a "
                   "timed probe: the full 10,000 when that takes under ~15 s, else about 3x the export time "
                   "(at least 1,000 inputs when they take under 2 minutes); 10000 asks for the full check. The report states the disagreement rate it bounds.")
@click.option("--plan", default="every", show_default=True,
              help="Stage plan: 'every' (a stage per exit), 'auto' (merge consecutive exits where the measured "
                   "stage times and the exit statistics of the real data say a boundary costs more than it "
                   "saves), or explicit groups such as '0-3,4,5'. Merging never changes predictions.")
@click.option("--plan-batch", type=int, default=1, show_default=True,
              help="Batch size --plan auto times the stages at (1 = streaming).")
@click.option("--calibration", default="default", show_default=True,
              help="INT8 calibration recipe: a name from calibration/ (default, percentile, stem) or a .toml file. "
                   "Stage k is calibrated on the samples that reach it under the FP32 model.")
@click.option("--min-agreement", type=float, default=0.95, show_default=True,
              help="INT8: fail the build when fewer exit decisions than this agree with the FP32 model.")
@click.option("--int8-edges/--fp32-edges", "quantized_edges", default=None,
              help="INT8: hidden states cross every stage edge as the quantized integers (uint8: no Q/DQ pair "
                   "per edge, 4x fewer bytes moved) or every edge as FP32. Default on onnxruntime targets: the "
                   "edges whose next stage quantizes its input anyway (a CNN block's convolutions).")
@click.option("--int8-fallback", "int8_fallback", type=click.Choice(["auto", "off"]), default="auto",
              show_default=True,
              help="INT8: when the fully quantized stages keep fewer exit decisions of the calibration inputs "
                   "than --min-agreement (plus two standard errors), put the stages that matter most back in FP32, the fewest that "
                   "hold it (the report lists them and every agreement measured; on TensorRT targets those stages "
                   "get FP32 engines); 'off' quantizes every stage.")
@click.option("--tolerance", type=click.FloatRange(min=0.0, min_open=True), default=1e-5, show_default=True,
              help="FP32 parity: max abs error of a stage's probs and gate (onnxruntime vs PyTorch) and the "
                   "tie band of exit decisions. Large models with steep gates round further: a ResNet-18-size "
                   "model measured 1.1e-5 on one gate; raise it (e.g. 1e-4) when the build says so.")
@seed_option
@json_option
def build(model, output, target, precision, data, force, no_model, parity_samples, plan, plan_batch, calibration,
          min_agreement, quantized_edges, int8_fallback, tolerance, seed, as_json):
    """Compile MODEL (a model.pt from `jei-edge train`) into a bundle: one ONNX graph per stage
    (split at the exits, gate in-graph, dynamic batch), the plain backbone, reference inputs with
    the PyTorch model's outputs and exit decisions (`jei-edge verify` re-checks them), a manifest
    with sha256 of every file, and a build report with parity vs PyTorch. Steps: export, lower,
    verify; a verification failure fails the build. Written atomically: a failed or killed build
    leaves nothing at the output path."""
    from pathlib import Path

    from jei_edge.compile import BuildOptions, build_bundle
    from jei_edge.compile.parity import parse_samples
    from jei_edge.compile.writer import check_output

    # the output is checked before any work (loading, export): an existing one without --force, a
    # parent that is a file, a folder that is not writable all fail here, in one line
    if output is not None:
        check_output(Path(output), force)
    elif Path(model).is_file():  # the default, beside the checkpoint (a missing model fails below)
        check_output(Path(model).with_suffix(".jei"), force)
    opts = BuildOptions(target=target, precision=precision, data=data, include_model=not no_model, force=force,
                        parity_samples=parse_samples(parity_samples), seed=seed, plan=plan, plan_batch=plan_batch,
                        calibration=calibration, min_agreement=min_agreement, tolerance=tolerance,
                        quantized_edges=quantized_edges, int8_fallback=int8_fallback)
    say = (lambda msg: click.echo(msg, err=True)) if not as_json else None
    report = build_bundle(model, output, opts, progress=say)
    if as_json:
        emit_json(report)
    else:
        d = report["decisions"]
        groups = report["plan"]["groups"]
        merged = "" if all(len(g) == 1 for g in groups) else \
            " (exits " + ", ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups) + ")"
        click.echo(f"built {report['bundle']}: {report['num_stages']} stages{merged}, target {report['target']} "
                   f"({report['precision']}); parity ok on {d['samples']} inputs "
                   f"(decision agreement {100 * d['agreement']:.3f}%, rate of {d['rate_bound']['counted']} "
                   f"< {100 * d['rate_bound']['upper']:.2g}% at 95%, max probs error "
                   f"{d['exit_probs_max_abs_error']:.1e}) in {report['seconds']['total']:.1f} s")
