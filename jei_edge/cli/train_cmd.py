"""``jei-edge train``: train a JEI-DNN and write a calibrated ``model.pt`` atomically."""

from __future__ import annotations

import json
import sys

import click

from jei_edge.cli.options import emit_json, json_option, seed_option
from jei_edge.errors import JeiEdgeError


def parse_backbone_options(items) -> dict:
    """``("embed_dim=96", "widths=16,32,64")`` -> kwargs (JSON values, comma lists -> int/float lists)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise JeiEdgeError(f"bad --backbone-opt '{item}'", hint="use KEY=VALUE, e.g. --backbone-opt embed_dim=96")
        raw = raw.strip()
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            try:
                value = [json.loads(v) for v in raw.split(",")] if "," in raw else raw
            except json.JSONDecodeError:
                value = raw
        out[key.strip()] = value
    return out


def _summary(ckpt: dict, path) -> str:
    tr = ckpt["training"]
    val = tr["bilevel"]["validation"][-1]
    lines = [
        f"wrote {path}",
        f"  backbone {ckpt['config']['backbone']} on '{tr['data']['source']}' (split seed {tr['data']['split_seed']}), "
        f"lambda {tr['lambda']:g}, seed {tr['seed']}, {tr['train_seconds']:.0f} s",
        f"  backbone val accuracy {tr['backbone'].get('best_val_accuracy', float('nan')):.4f}",
        f"  JEI on validation: accuracy {val['accuracy']:.4f}, mean cost {val['mean_cost']:.3f}, "
        f"exits {val['exit_histogram']}",
        f"  evaluate: jei-edge eval {path}",
    ]
    return "\n".join(lines)


@click.command(name="train")
@click.option("--data", "data", default="digits", show_default=True,
              help="Data source: 'digits', 'synthetic[:key=value,...]', a .npz file (x, y) or an image folder.")
@click.option("--backbone", default="vit", show_default=True, help="Backbone name (vit, resnet, or a plugin).")
@click.option("--backbone-opt", "backbone_opts", multiple=True, metavar="KEY=VALUE",
              help="Backbone option, repeatable (e.g. embed_dim=96, depth=9, widths=16,32,64).")
@click.option("--backbone-weights", type=click.Path(), default=None,
              help="Start the backbone from this state_dict (.pt) instead of random weights.")
@click.option("--exits", default=None, help="Exit positions as block indices, e.g. 1,3,5 (default: every block).")
@click.option("--lambda", "lam", type=float, default=0.7, show_default=True,
              help="Accuracy/cost trade-off of the gate targets (larger: cheaper, earlier exits).")
@click.option("--epochs", type=int, default=None, help="Bi-level GATE/CLASSIFIER epochs (default 15).")
@click.option("--min-steps", type=int, default=None,
              help="At least this many bi-level batches (default 6000; small data sets get more epochs).")
@click.option("--backbone-epochs", type=int, default=None, help="Backbone epochs (default 40; 0 keeps the weights).")
@click.option("--im-epochs", type=int, default=None, help="Max IM warm-up epochs (default 6).")
@click.option("--batch-size", type=int, default=None, help="Batch size (default 64).")
@click.option("--classifier-loss", type=click.Choice(["mean", "gate_weighted"]), default=None,
              help="CLASSIFIER-phase loss (default mean, the reference's effective loss).")
@click.option("--threads", type=int, default=None,
              help="torch CPU threads while training (default: torch's; 1 is best on a busy machine).")
@click.option("--img-size", type=int, default=None,
              help="Resize inputs to this square size (default: the data's own; digits 16).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="model.pt", show_default=True,
              help="Checkpoint to write (atomically).")
@seed_option
@json_option
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(data, backbone, backbone_opts, backbone_weights, exits, lam, epochs, min_steps, backbone_epochs, im_epochs,
          batch_size, classifier_loss, threads, img_size, output, seed, as_json, no_progress):
    """Train a JEI-DNN (backbone, IM warm-up, bi-level gates/IMs) and calibrate its conformal sets.

    \b
    Example (a minute or two on 2 CPU cores):
      jei-edge train --data digits --lambda 0.1 -o model.pt
      jei-edge train --data synthetic --lambda 0.3 -o synth.pt   (exits spread over depth)
    """
    from jei_edge.data import load_data
    from jei_edge.model.backbone import get_backbone
    from jei_edge.train import TrainConfig, train_jei
    from jei_edge.train.pipeline import with_overrides

    get_backbone(backbone)  # unknown backbone -> clear error before loading any data
    kwargs = parse_backbone_options(backbone_opts)
    exit_list = None
    if exits:
        try:
            exit_list = tuple(int(v) for v in exits.split(","))
        except ValueError as exc:
            raise JeiEdgeError(f"--exits '{exits}' is not a comma-separated list of block indices") from exc
    cfg = with_overrides(TrainConfig(backbone=backbone, backbone_kwargs=kwargs, exits=exit_list, lam=lam, seed=seed,
                                     backbone_weights=backbone_weights),
                         epochs=epochs, min_steps=min_steps, backbone_epochs=backbone_epochs, im_epochs=im_epochs, batch_size=batch_size,
                         classifier_loss=classifier_loss, threads=threads).validate()
    shape = None
    size = img_size or kwargs.get("img_size")
    if size is not None or "in_chans" in kwargs:
        from jei_edge.data.sources import default_input_shape  # fill in what was not given

        native = default_input_shape(data)
        shape = (int(kwargs.get("in_chans", native[0])), int(size or native[1]), int(size or native[2]))
    splits = load_data(data, input_shape=shape, seed=seed)
    progress = not no_progress and not as_json and sys.stderr.isatty()
    ckpt = train_jei(cfg, splits, progress=progress)
    from jei_edge.model.checkpoint import save_checkpoint

    save_checkpoint(output, checkpoint=ckpt)
    if as_json:
        tr = ckpt["training"]
        emit_json({"output": str(output), "lambda": tr["lambda"], "seed": tr["seed"], "data": tr["data"],
                   "train_seconds": tr["train_seconds"], "validation": tr["bilevel"]["validation"][-1],
                   "costs": ckpt["costs"]["cost"]})
    else:
        click.echo(_summary(ckpt, output))
