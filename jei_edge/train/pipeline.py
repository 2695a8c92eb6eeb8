"""``train_jei``: backbone -> IM warm-up -> bi-level GATE/CLASSIFIER -> conformal calibration.

The checkpoint also keeps the IM weights as they were after the warm-up (``warmup_ims``), so
``jei-edge eval`` can compare JEI with thresholding on IMs that never saw the bi-level phase.

Which settings give spread-out exits (measured, docs/training.md): on ``synthetic`` (default
options) the ViT defaults with lambda 0.3 or 1.0 put >= 5% of test samples on at least three exits
(seeds 0 and 1); on ``digits`` lambda 0.1 does for seed 0. The ResNet family puts almost every
sample on one late exit at lambda <= 1; on ``synthetic:size=32,hard=0.45,noise=0.6`` the
32-64-128 ResNet spreads over its last three exits at lambda 1.5 (the CPU benchmark's model).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Dict

from jei_edge.data import DataSplits
from jei_edge.errors import JeiEdgeError
from jei_edge.train.config import ALPHAS, TrainConfig


def _backbone_kwargs(cfg: TrainConfig, data: DataSplits) -> Dict:
    c, h, w = data.input_shape
    kw = dict(cfg.backbone_kwargs)
    kw.setdefault("num_classes", data.num_classes)
    kw.setdefault("in_chans", c)
    kw.setdefault("img_size", h)
    if h != w:
        raise JeiEdgeError(f"data input shape {data.input_shape} is not square; the built-in backbones need H == W",
                           hint="load the data with a square input_shape")
    if kw["num_classes"] != data.num_classes:
        raise JeiEdgeError(f"backbone num_classes={kw['num_classes']} but the data has {data.num_classes} classes")
    return kw


def build_jei_model(cfg: TrainConfig, data: DataSplits):
    """The untrained JEIModel for ``cfg`` sized to ``data`` (backbone weights loaded if given)."""
    import torch

    from jei_edge.model.jei import build_model

    config = {"backbone": cfg.backbone, "backbone_kwargs": _backbone_kwargs(cfg, data),
              "exits": list(cfg.exits) if cfg.exits is not None else None}
    try:
        model = build_model(config)
    except ValueError as exc:  # a factory rejecting its options (e.g. img_size not a multiple of patch)
        raise JeiEdgeError(f"backbone '{cfg.backbone}' with {config['backbone_kwargs']}: {exc}",
                           hint="adjust --backbone-opt / --img-size") from exc
    if tuple(model.input_shape) != tuple(data.input_shape):
        raise JeiEdgeError(f"backbone '{cfg.backbone}' expects inputs {model.input_shape}, the data gives "
                           f"{data.input_shape}", hint="load the data at the backbone's input shape")
    from jei_edge.model.backbone import check_contract

    check_contract(model.spec, cfg.backbone)  # on a dummy input, before any training
    model.config["exits"] = list(model.exits)
    if cfg.backbone_weights:
        _load_backbone_weights(model, Path(cfg.backbone_weights), torch)
    return model


def _load_backbone_weights(model, path: Path, torch) -> None:
    from jei_edge.errors import CheckpointError
    from jei_edge.model.checkpoint import _load_reason

    if not path.is_file():
        raise CheckpointError(f"backbone weights '{path}' do not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure means "not a loadable state_dict"
        raise CheckpointError(f"backbone weights '{path}' cannot be loaded safely ({_load_reason(exc)})",
                              hint="save them with torch.save(module.state_dict(), path)") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # a jei-edge model.pt works too
    if not isinstance(sd, dict):
        raise CheckpointError(f"backbone weights '{path}' are not a state_dict")
    own = model.state_dict()
    backbone_keys = {k for k in own if k.split(".")[0] in ("stem", "blocks", "head")}
    sd = {k: v for k, v in sd.items() if k in backbone_keys}
    missing = sorted(backbone_keys - set(sd))
    bad = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if missing or bad:
        raise CheckpointError(f"backbone weights '{path}' do not fit backbone '{model.config['backbone']}': "
                              f"missing {missing[:5]}, wrong shape {bad[:5]}",
                              hint="keys must match the stem./blocks./head. parameters of that backbone")
    model.load_state_dict(sd, strict=False)


def calibrate(model, data: DataSplits, batch_size: int = 512, alphas=ALPHAS) -> Dict:
    """The per-exit conformal qhat table on the calibration split (JEI exit rule, offsets 0)."""
    from jei_edge.train.features import FrozenFeatures, exit_outputs
    from jei_edge.train.metrics import exit_predictions, qhat_table

    feats = FrozenFeatures(model, data.calib.x, batch_size)
    logits, gates = exit_outputs(model, feats, batch_size)
    idx, _, probs_all = exit_predictions(logits, gates)
    return {"alphas": list(alphas), "qhat": qhat_table(probs_all, idx, data.calib.y, alphas),
            "split_size": int(len(data.calib))}


@contextmanager
def torch_threads(n):
    """Temporarily run torch with ``n`` intra-op threads (no-op for None)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_jei(cfg: TrainConfig, data: DataSplits, progress: bool = True) -> Dict:
    """Train a JEI-DNN on ``data`` and return its calibrated checkpoint dict.

    Args:
        cfg: the settings (``TrainConfig``); ``backbone_kwargs`` get num_classes / in_chans /
            img_size from the data when absent.
        data: train / val / calib / test splits (``jei_edge.data.load_data``).
        progress: tqdm bars with losses on stderr.

    Returns:
        ``make_checkpoint(...)`` dict, ready for ``save_checkpoint(path, checkpoint=ckpt)``.
    """
    cfg = cfg.validate()
    with torch_threads(cfg.threads):
        return _train(cfg, data, progress)


def _train(cfg: TrainConfig, data: DataSplits, progress: bool) -> Dict:
    import torch

    from jei_edge.model.checkpoint import make_checkpoint
    from jei_edge.model.costs import count_costs
    from jei_edge.train import phases
    from jei_edge.train.features import FrozenFeatures, freeze_backbone

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_jei_model(cfg, data)
    costs = count_costs(model).to_dict()
    record: Dict = {"lambda": cfg.lam, "seed": cfg.seed, "config": cfg.to_dict(),
                    "data": {"source": data.source, "split_seed": data.seed,
                             "sizes": {k: len(data.split(k)) for k in ("train", "val", "calib", "test")}}}
    record["backbone"] = phases.train_backbone(model, cfg, data.train.x, data.train.y, data.val.x, data.val.y,
                                               gen, progress)
    freeze_backbone(model)
    ftr = FrozenFeatures(model, data.train.x, limit_mb=cfg.cache_limit_mb)
    fval = FrozenFeatures(model, data.val.x, limit_mb=cfg.cache_limit_mb)
    record["im_warmup"] = phases.warmup_ims(model, cfg, ftr, data.train.y, fval, data.val.y, gen, progress)
    # the IMs as the warm-up left them: the thresholding baselines (c) and (d) run on these
    warmup = {f"ims.{k}": v.detach().clone() for k, v in model.ims.state_dict().items()}
    record["bilevel"] = phases.bilevel(model, cfg, ftr, data.train.y, fval, data.val.y, costs, gen, progress)
    pw = record["bilevel"]["validation"][-1]["pos_weights"]
    calibration = calibrate(model, data)
    record["train_seconds"] = round(time.perf_counter() - t0, 2)
    model.eval()
    return make_checkpoint(model, pos_weights=pw, calibration=calibration, class_names=data.class_names,
                           preprocessing=data.preprocessing, training=record, warmup_ims=warmup)


def with_overrides(cfg: TrainConfig, **kwargs) -> TrainConfig:
    """``cfg`` with the non-None keyword values replaced (CLI overrides)."""
    return replace(cfg, **{k: v for k, v in kwargs.items() if v is not None})


__all__ = ["build_jei_model", "calibrate", "train_jei", "with_overrides"]
