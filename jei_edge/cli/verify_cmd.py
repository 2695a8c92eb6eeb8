"""``jei-edge verify BUNDLE``: re-check a bundle against its stored PyTorch references (torch-free)."""

from __future__ import annotations

import click

from jei_edge.cli.options import emit_json, json_option, public_key_option


@click.command(name="verify")
@click.argument("bundle", type=click.Path())
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where to run it (default: the device of the bundle's target).")
@public_key_option
@json_option
def verify(bundle, device, public_key, as_json):
    """Run BUNDLE (a NAME.jei directory, e.g. built on another machine) with the runtime on the
    reference inputs stored at build time and compare its exit decisions and probabilities with
    what the PyTorch model computed (same rules as the build). Needs neither torch nor onnx.
    Exits non-zero when the bundle does not match."""
    from jei_edge.compile.verify import summary_line, verify_bundle

    say = None if as_json else (lambda msg: click.echo(msg, err=True))
    report = verify_bundle(bundle, device=device, progress=say, public_key=public_key)
    if as_json:
        emit_json(report)
    else:
        click.echo(summary_line(report))
