"""``jei-edge export triton BUNDLE -o MODEL_REPOSITORY``: a Triton model repository serving the bundle."""

from __future__ import annotations

import click

from jei_edge.cli.options import emit_json, json_option


@click.group(name="export")
def export():
    """Export a bundle for another serving system (for now: NVIDIA Triton Inference Server)."""


def repository_options(f):
    """Options shared by `export triton` and `serve` (jei_edge.serve.repository.RepositoryOptions)."""
    opts = [
        click.option("--name", default="jei", show_default=True,
                     help="Triton model name of the early-exit model (others get _full / _plain appended)."),
        click.option("--models", default="exit", show_default=True,
                     help="Models to serve, comma separated: exit (early exit), full (every stage), "
                          "plain (the plain backbone graph), e.g. exit,full,plain for comparisons."),
        click.option("--max-batch-size", type=int, default=64, show_default=True,
                     help="Largest batch Triton's dynamic batcher forms (and a request may carry)."),
        click.option("--max-queue-delay-us", type=int, default=100, show_default=True,
                     help="How long the dynamic batcher waits for more requests to join a batch."),
        click.option("--instances", type=int, default=1, show_default=True,
                     help="Model instances per model (each a process with its own runtime)."),
        click.option("--offsets", default=None,
                     help="Per-gate threshold offsets, comma separated (one value for every gate); default: "
                          "the bundle's deploy profile, else 0."),
        click.option("--no-deploy", is_flag=True, help="Ignore the bundle's deploy profile (offsets 0)."),
        click.option("--alpha", type=float, default=0.05, show_default=True,
                     help="Conformal-set alpha of the conformal_set output (bundles with a conformal table)."),
        click.option("--backend-opt", "backend_opts", multiple=True, metavar="KEY=VALUE",
                     help="Runtime backend setting for every instance, repeatable, e.g. intra_op_threads=1."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def make_options(name, models, max_batch_size, max_queue_delay_us, instances, offsets, no_deploy, alpha,
                 backend_opts):
    from jei_edge.runtime.output import parse_backend_options, parse_offsets
    from jei_edge.serve.repository import RepositoryOptions

    parse_backend_options(backend_opts)  # checks KEY=VALUE now, with the runtime's message
    offs = parse_offsets(offsets)
    return RepositoryOptions(name=name, modes=tuple(m.strip() for m in models.split(",") if m.strip()),
                             max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                             instances=instances, offsets=tuple(offs) if offs is not None else None,
                             use_deploy=not no_deploy, alpha=alpha, backend_options=tuple(backend_opts)).check()


@export.command(name="triton")
@click.argument("bundle", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), metavar="MODEL_REPOSITORY",
              help="The model repository folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing MODEL_REPOSITORY.")
@repository_options
@json_option
def triton(bundle, output, force, as_json, **kw):
    """Write a Triton model repository that serves BUNDLE with per-sample early exit: for each
    model a config.pbtxt (Python backend, dynamic batching, CPU instances), a model.py that runs
    the jei-edge runtime, and the bundle itself. The Triton server's Python needs jei-edge's
    runtime installed (numpy, onnxruntime, click; see docs/serving.md). Serve it with:

    \b
      jei-edge export triton model.jei -o models
      tritonserver --model-repository=$PWD/models
    """
    from jei_edge._io import check_writable_output
    from jei_edge.serve.repository import write_repository

    opts = make_options(**kw)
    check_writable_output(output, "model repository", directory=True)
    out = write_repository(bundle, output, opts, copy_bundle=True, force=force)
    models = [s.name for s in opts.specs()]
    info = {"repository": str(out), "models": models,
            "command": f"tritonserver --model-repository={out.resolve()}"}
    if as_json:
        emit_json(info)
    else:
        click.echo(f"wrote Triton model repository {out} (models: {', '.join(models)})")
        click.echo(f"serve it with: {info['command']}")
