"""Options shared by every command, so a flag means the same thing everywhere."""

from __future__ import annotations

import json
import sys

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
output_option = click.option("-o", "--output", type=click.Path(dir_okay=True), help="Output path.")
data_option = click.option(
    "--data", "data", default="digits", show_default=True,
    help="Data source: 'digits', 'synthetic[:key=value,...]', a .npz file (x, y) or an image folder.",
)
target_option = click.option("--target", default="cpu", show_default=True,
                             help="Hardware target: a name from targets/ or a TOML file.")
device_option = click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                             help="Where to execute (default: the device of the bundle's target; cpu runs any "
                                  "bundle's stage graphs with onnxruntime, cuda needs cuda-python and a GPU).")
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")


def emit_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=_default)
    sys.stdout.write("\n")


def _default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)
public_key_option = click.option(
    "--public-key", "public_key", type=click.Path(), default=None, envvar="JEI_EDGE_PUBLIC_KEY",
    help="Refuse the bundle unless it is signed by this key (NAME.pub from `jei-edge keygen`) and every "
         "file matches; default: $JEI_EDGE_PUBLIC_KEY when set.")
