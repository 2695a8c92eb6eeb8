"""``jei-edge selftest BUNDLE``: check a bundle on this board (torch-free)."""

from __future__ import annotations

import sys

import click

from jei_edge.cli.options import emit_json, json_option


@click.command(name="selftest")
@click.argument("bundle", type=click.Path())
@click.option("--repeats", type=int, default=5, show_default=True, help="Timed repeats of each speed measurement.")
@click.option("--samples", type=int, default=1024, show_default=True,
              help="Stored reference inputs the speed measurement uses (the decision check uses all of them).")
@click.option("-o", "--output", type=click.Path(), default=None, help="Also write the JSON report to this file.")
@json_option
def selftest(bundle, repeats, samples, output, as_json):
    """Check BUNDLE on this machine with every backend that can run it here (its target's, e.g.
    TensorRT engines on a Jetson board, and onnxruntime as the reference): each stage against
    onnxruntime (Polygraphy's comparator), exit decisions on the bundle's stored reference inputs
    (the build's rules), exit vs full vs plain speed at batch 1 and the target's opt batch, and the
    GPU and toolchain facts. Says what could not run and why. Exit code 1 on a parity failure,
    2 when nothing could run.

    \b
    On the board, after `jei-edge lower model.jei`:
      jei-edge selftest model.jei -o selftest.json
    """
    from jei_edge._io import atomic_write_bytes
    from jei_edge.profile.selftest import selftest as run_selftest
    from jei_edge.profile.selftest import summary

    if repeats < 1 or samples < 1:
        raise click.BadParameter("--repeats and --samples must be >= 1")
    import json
    import os

    from jei_edge.errors import InputError

    if output:  # before the (long) run: an unwritable path fails now, in one line
        folder = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise InputError(f"cannot write the report to '{output}': folder '{folder}' is missing or not writable",
                             hint="choose a writable path for -o")
    say = None if as_json else (lambda msg: click.echo(msg, err=True))
    report = run_selftest(bundle, repeats=repeats, samples=samples, progress=say)
    if output:
        data = (json.dumps(report, indent=2, default=str) + "\n").encode()
        try:
            atomic_write_bytes(output, lambda f: f.write(data))
        except OSError as exc:
            raise InputError(f"cannot write the report to '{output}': {exc.strerror}",
                             hint="choose a writable path for -o") from None
    if as_json:
        emit_json(report)
    else:
        click.echo(summary(report))
    if not report["passed"]:
        sys.exit(1 if report["failed"] else 2)
