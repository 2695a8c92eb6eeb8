"""``jei-edge train``: train a JEI-DNN and write a calibrated ``model.pt`` atomically."""

from __future__ import annotations

import json
import sys

import click

from jei_edge.cli.options import emit_json, json_option, seed_option
from jei_edge.errors import JeiEdgeError
from jei_edge.train.config import (MAX_BATCH_SIZE, MAX_EPOCHS, MAX_IMG_SIZE, MAX_MIN_STEPS, MAX_PARAMETERS, MAX_THREADS,
                                   MIN_IMG_SIZE)


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
        f"lambda {tr['lambda']:g}, seed {tr['seed']}, pos-weight {tr['config'].get('pos_weight', 'reference')}, "
        f"{tr['train_seconds']:.0f} s",
        f"  backbone val accuracy {tr['backbone'].get('best_val_accuracy', float('nan')):.4f}",
        f"  JEI on validation: accuracy {val['accuracy']:.4f}, mean cost {val['mean_cost']:.3f}, "
        f"exits {val['exit_histogram']}",
        f"  evaluate: jei-edge eval {path}",
    ]
    return "\n".join(lines)


def _int_option(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise JeiEdgeError(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _out_of_memory() -> JeiEdgeError:
    return JeiEdgeError("training ran out of memory",
                        hint="use a smaller --batch-size, --img-size or backbone (--backbone-opt)")


def _check_model_size(cfg, splits) -> None:
    """Count the model's parameters on the meta device (nothing allocated) and refuse one beyond
    ``MAX_PARAMETERS`` before building it for real (a typo such as embed_dim=100000 would otherwise
    end in a MemoryError or an OOM kill)."""
    from dataclasses import replace

    import torch

    import jei_edge.model.jei  # noqa: F401  (imported outside the meta context: no module-level meta tensors)
    from jei_edge.train.pipeline import build_jei_model

    try:
        with torch.device("meta"):
            model = build_jei_model(replace(cfg, backbone_weights=None), splits)
    except JeiEdgeError:
        raise
    except Exception:  # a plugin that cannot be built on the meta device: the real build checks it
        return
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    if n > MAX_PARAMETERS:
        from jei_edge._io import shorten

        options = shorten(cfg.backbone_kwargs or "its defaults", 120)
        raise JeiEdgeError(f"backbone '{cfg.backbone}' with {options} has {n:,} "
                           f"parameters; jei-edge trains models of at most {MAX_PARAMETERS:,}",
                           hint="use smaller --backbone-opt values (embed_dim, depth, widths) or --img-size")


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
@click.option("--epochs", type=int, default=None,
              help=f"Bi-level GATE/CLASSIFIER epochs (default 15; 0..{MAX_EPOCHS:,}).")
@click.option("--min-steps", type=int, default=None,
              help=f"At least this many bi-level batches (default 6000; small data sets get more epochs; "
                   f"0..{MAX_MIN_STEPS:,}).")
@click.option("--backbone-epochs", type=int, default=None,
              help=f"Backbone epochs (default 40; 0 keeps the weights; 0..{MAX_EPOCHS:,}).")
@click.option("--im-epochs", type=int, default=None, help=f"Max IM warm-up epochs (default 6; 0..{MAX_EPOCHS:,}).")
@click.option("--batch-size", type=int, default=None, help=f"Batch size (default 64; 1..{MAX_BATCH_SIZE:,}).")
@click.option("--classifier-loss", type=click.Choice(["mean", "gate_weighted"]), default=None,
              help="CLASSIFIER-phase loss (default mean, the reference's effective loss).")
@click.option("--pos-weight", "pos_weight", type=click.Choice(["reference", "balanced", "none"]), default=None,
              help="Weight of the gates' positive BCE targets: 'reference' (default; the JEI-DNN reference's "
                   "min((N - n_l)/n_l, 5) with n_l the samples whose oracle exit is l), 'balanced' (each gate's "
                   "true negatives/positives ratio) or 'none' (1). docs/training.md has the measured comparison.")
@click.option("--threads", type=int, default=None,
              help=f"torch CPU threads while training (default: torch's; 1 is best on a busy machine; "
                   f"1..{MAX_THREADS}).")
@click.option("--img-size", type=int, default=None,
              help=f"Resize inputs to this square size, {MIN_IMG_SIZE}..{MAX_IMG_SIZE} (default: the data's own; "
                   f"digits 16). The model may have at most {MAX_PARAMETERS // 1_000_000}M parameters.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="model.pt", show_default=True,
              help="Checkpoint to write (atomically; its folder is checked before training).")
@seed_option
@json_option
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train(data, backbone, backbone_opts, backbone_weights, exits, lam, epochs, min_steps, backbone_epochs, im_epochs,
          batch_size, classifier_loss, pos_weight, threads, img_size, output, seed, as_json, no_progress):
    """Train a JEI-DNN (backbone, IM warm-up, bi-level gates/IMs) and calibrate its conformal sets.

    The checkpoint also keeps the IMs as they were after the warm-up, so `jei-edge eval` can
    compare JEI with thresholding on IMs that never saw the gates (baselines c and d).

    \b
    Example (a minute or two on 2 CPU cores):
      jei-edge train --data digits --lambda 0.1 -o model.pt
      jei-edge train --data synthetic --lambda 0.3 -o synth.pt   (exits spread over depth)
    """
    from jei_edge._io import check_writable_output
    from jei_edge.data import load_data
    from jei_edge.model.backbone import get_backbone
    from jei_edge.train import TrainConfig, train_jei
    from jei_edge.train.config import check_img_size
    from jei_edge.train.pipeline import with_overrides

    check_writable_output(output, "checkpoint")  # before any work: an unwritable -o fails now, not after training
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
                         classifier_loss=classifier_loss, pos_weight=pos_weight, threads=threads).validate()
    shape = None
    if img_size is not None:
        size = check_img_size(img_size)
    elif "img_size" in kwargs:
        size = check_img_size(kwargs["img_size"], "--backbone-opt img_size")
    else:
        size = None
    if size is not None or "in_chans" in kwargs:
        from jei_edge.data.sources import default_input_shape  # fill in what was not given

        native = default_input_shape(data)
        chans = _int_option(kwargs["in_chans"], "--backbone-opt in_chans", 1, 64) if "in_chans" in kwargs else native[0]
        shape = (int(chans), int(size or native[1]), int(size or native[2]))
    progress = not no_progress and not as_json and sys.stderr.isatty()
    try:
        splits = load_data(data, input_shape=shape, seed=seed)
        _check_model_size(cfg, splits)
        ckpt = train_jei(cfg, splits, progress=progress)
    except MemoryError:
        raise _out_of_memory() from None
    except RuntimeError as exc:  # torch's allocator failing ("can't allocate memory", "out of memory")
        if "allocate" not in str(exc) and "out of memory" not in str(exc):
            raise
        raise _out_of_memory() from None
    from jei_edge.model.checkpoint import save_checkpoint

    save_checkpoint(output, checkpoint=ckpt)
    if as_json:
        tr = ckpt["training"]
        emit_json({"output": str(output), "lambda": tr["lambda"], "seed": tr["seed"], "data": tr["data"],
                   "pos_weight": tr["config"]["pos_weight"],
                   "train_seconds": tr["train_seconds"], "validation": tr["bilevel"]["validation"][-1],
                   "costs": ckpt["costs"]["cost"]})
    else:
        click.echo(_summary(ckpt, output))
