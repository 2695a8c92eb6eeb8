"""``jei-edge serve BUNDLE``: serve a bundle on Triton Inference Server (HTTP, gRPC, metrics)."""

from __future__ import annotations

import click

from jei_edge.cli.export_cmd import make_options, repository_options
from jei_edge.cli.options import emit_json, json_option


@click.command(name="serve")
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the endpoints bind (0.0.0.0 serves other machines).")
@click.option("--http-port", type=int, default=8000, show_default=True, help="Triton's HTTP/REST port.")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="Triton's gRPC port.")
@click.option("--metrics-port", type=int, default=8002, show_default=True,
              help="Prometheus metrics port (/metrics: Triton's and jei-edge's early-exit counters).")
@click.option("--exit-timeout", type=int, default=30, show_default=True,
              help="Seconds a graceful stop (SIGINT/SIGTERM) waits for requests in flight.")
@click.option("--startup-timeout", type=float, default=120, show_default=True,
              help="Seconds to wait for every model to load.")
@click.option("--log", "log", type=click.Path(), default=None, help="Write Triton's log to this file.")
@repository_options
@json_option
def serve(bundle, host, http_port, grpc_port, metrics_port, exit_timeout, startup_timeout, log, as_json, **kw):
    """Serve BUNDLE on NVIDIA Triton Inference Server until SIGINT/SIGTERM.

    Runs the tritonserver binary of the nvidia-pytriton wheel (the serving environment:
    `make setup-serve`) on a model repository like `jei-edge export triton` writes. Triton's
    dynamic batcher groups the requests of many clients; the runtime then early-exits each
    sample. A request gives `x` (model input, float32 [b, C, H, W]) or `x_raw` (raw values in
    [0, 1]; the bundle's preprocessing is applied) and gets back per sample: class, probs, exit,
    confidence, cost (fraction of the full model) and conformal_set. A bad request gets its own
    error; the others are answered.

    \b
      jei-edge serve model.jei --instances 2 --backend-opt intra_op_threads=1
      curl localhost:8000/v2/health/ready; curl localhost:8002/metrics | grep jei_edge
    """
    import shutil
    import signal
    import tempfile
    from pathlib import Path

    from jei_edge.errors import InputError
    from jei_edge.serve.repository import write_repository
    from jei_edge.serve.server import Ports, ServerError, TritonDist, TritonServer

    ports = Ports(http_port, grpc_port, metrics_port)
    if len({http_port, grpc_port, metrics_port}) != 3 or not all(0 < p < 65536 for p in (http_port, grpc_port,
                                                                                          metrics_port)):
        raise InputError(f"ports {http_port}, {grpc_port}, {metrics_port} must be three different ports in 1-65535")
    TritonDist.find()  # the serving environment, before any work
    opts = make_options(**kw)
    work = Path(tempfile.mkdtemp(prefix="jei-edge-serve-"))
    server = None
    try:
        repo = write_repository(bundle, work / "models", opts, copy_bundle=False)
        server = TritonServer(repo, ports, host=host, log=Path(log) if log else None, exit_timeout_s=exit_timeout)
        stop = {"sig": None}

        def on_signal(sig, _frame):  # forwarded: Triton drains in-flight requests, then exits
            stop["sig"] = sig
            server.signal(signal.SIGTERM)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if not as_json:
                click.echo(f"starting Triton ({len(opts.modes)} model(s) x {opts.instances} instance(s))...", err=True)
            server.start(startup_timeout)  # returns early, without error, when a signal stopped it while starting
            if stop["sig"] is None:
                info = {"models": [s.name for s in opts.specs()], "http": server.http_url, "grpc": server.grpc_url,
                        "metrics": server.metrics_url, "log": str(server.log_path), "instances": opts.instances}
                if as_json:
                    emit_json(info)
                else:
                    click.echo(f"serving {bundle} as {', '.join(info['models'])}: HTTP {info['http']}, "
                               f"gRPC {info['grpc']}, metrics {info['metrics']} (Ctrl-C stops; log {info['log']})")
            code = server.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if stop["sig"] is None:
            raise ServerError(f"tritonserver exited with code {code}: {server.log_tail()}",
                              hint=f"full log: {server.log_path}")
        click.echo(f"stopped (signal {signal.Signals(stop['sig']).name}), in-flight requests answered", err=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
