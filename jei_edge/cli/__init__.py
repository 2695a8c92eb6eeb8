"""The ``jei-edge`` command line: a click group whose subcommands load lazily.

Each subcommand lives in its own module here and imports heavy packages (torch, onnx) only inside
its function, so ``jei-edge --help`` and ``jei-edge --version`` stay fast. User errors
(``JeiEdgeError``) print one line and exit non-zero without a traceback; bugs keep theirs.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from jei_edge import __version__
from jei_edge.errors import JeiEdgeError

PLUGIN_ENV = "JEI_EDGE_PLUGINS"  # same name as jei_edge.model.backbone.PLUGIN_ENV (kept torch-free here)

# name -> "module:attribute"; order is the order shown in --help
COMMANDS = {
    "train": "jei_edge.cli.train_cmd:train",
    "eval": "jei_edge.cli.eval_cmd:eval_command",
    "build": "jei_edge.cli.build_cmd:build",
    "lower": "jei_edge.cli.lower_cmd:lower",
    "verify": "jei_edge.cli.verify_cmd:verify",
    "run": "jei_edge.cli.run_cmd:run",
    "inspect": "jei_edge.cli.inspect_cmd:inspect",
    "profile": "jei_edge.cli.profile_cmd:profile",
    "selftest": "jei_edge.cli.selftest_cmd:selftest",
    "tune": "jei_edge.cli.tune_cmd:tune",
    "keygen": "jei_edge.cli.sign_cmd:keygen",
    "sign": "jei_edge.cli.sign_cmd:sign",
    "targets": "jei_edge.cli.targets_cmd:targets",
    "serve": "jei_edge.cli.serve_cmd:serve",
    "export": "jei_edge.cli.export_cmd:export",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        mod, _, attr = target.partition(":")
        return getattr(importlib.import_module(mod), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="jei-edge")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE:FUNCTION",
              help="Trust this backbone plugin (a checkpoint naming it may import it). Repeatable; "
                   "same as listing it in $JEI_EDGE_PLUGINS.")
def cli(verbose: int, plugins):
    """jei-edge: train JEI-DNN early-exit models, compile them into staged engines and run them
    so that easy samples really stop early.

    \b
    Pipeline:
      jei-edge train --data digits -o model.pt       train a JEI-DNN (backbone, IMs, gates)
      jei-edge eval model.pt --data digits           accuracy / cost / calibration vs baseline
      jei-edge build model.pt -o model.jei           staged bundle for a target (CPU default; --target
                                                     rtx-ada etc. adds TensorRT-RTX engines built here)
      jei-edge lower model.jei                       on a Jetson board: build its TensorRT engines
      jei-edge verify model.jei                      re-check a bundle against its stored references
      jei-edge run model.jei inputs.npy              conditional execution with early exit
      jei-edge inspect model.pt|model.jei            architecture, exits, costs, integrity
      jei-edge profile model.jei inputs.npy          stage latency, exits, realized vs theoretical speedup
      jei-edge selftest model.jei                    on your board: every backend vs onnxruntime, decisions, speed
      jei-edge tune model.jei --data digits --budget cost=0.3   most accurate exits within a budget
      jei-edge keygen -o K; jei-edge sign model.jei --key K.pem   sign; run/verify --public-key K.pub
      jei-edge targets [NAME]                        the hardware targets a bundle can be built for
      jei-edge serve model.jei                       serve on Triton Inference Server (serving environment)
      jei-edge export triton model.jei -o models     a Triton model repository for a stand-alone tritonserver
    """
    if plugins:  # read by jei_edge.model.backbone (PLUGIN_ENV) when a checkpoint names a plugin
        listed = [p for p in os.environ.get(PLUGIN_ENV, "").split(",") if p]
        os.environ[PLUGIN_ENV] = ",".join(listed + list(plugins))
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _plugins_first(argv):
    """``--plugin X`` is a group option; accept it after the subcommand too by moving it first."""
    args = list(sys.argv[1:] if argv is None else argv)
    front, rest, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a == "--plugin" and i + 1 < len(args):
            front += [a, args[i + 1]]
            i += 2
            continue
        if a.startswith("--plugin="):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def main(argv=None) -> int:
    try:
        cli.main(args=_plugins_first(argv), prog_name="jei-edge", standalone_mode=False)
    except JeiEdgeError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"  hint: {exc.hint}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as exc:  # one line, like every other user error (not click's usage block)
        where = exc.ctx.command_path if exc.ctx is not None else "jei-edge"
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        click.echo(f"  hint: see `{where} --help`", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
