"""Training settings: one frozen dataclass, defaults in one place.

JEI-DNN reference defaults (the paper's; docs/training.md lists them and where we depart) are used where it names one: IM warm-up with
patience 2 and at most 6 epochs; bi-level phase with SGD lr 0.01, momentum 0.9, weight decay 5e-4,
cosine to 2e-4, batch 64, lambda 0.7, pos_weight cap 5 (``pos_weight="reference"``), plain mean-CE classifier loss. The
reference fine-tunes an ImageNet-pretrained backbone; here the backbone trains from scratch
(AdamW + cosine and random-translation augmentation, the usual recipe for a small ViT/CNN; on
small data sets a backbone trained without augmentation memorises the training split, and its IMs
then look far more confident on training data than anywhere else) unless ``backbone_weights``
is given.
The reference switches GATE/CLASSIFIER every 200 batches; a small data set has far fewer batches
an epoch, so the default switches every half epoch (capped at 200 batches). The reference's 10-20
CIFAR epochs are 7,000-14,000 batches; 15 epochs of a small data set are a few hundred, too few
for the gates to converge (measured: they stay near their initialisation and send almost every
sample to one exit), so the bi-level phase runs at least ``min_steps`` batches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

from jei_edge.errors import JeiEdgeError

# conformal alpha grid 0.01 .. 0.05 in steps of 0.005
ALPHAS: Tuple[float, ...] = tuple(round(0.01 + 0.005 * i, 3) for i in range(9))
CLASSIFIER_LOSSES = ("mean", "gate_weighted")
POS_WEIGHT_RULES = ("reference", "balanced", "none")  # jei_edge.train.metrics.pos_weights

# Sanity bounds of the integer settings, inclusive: far beyond any useful value, they turn typos
# (an extra zero or three) into a clear error instead of a MemoryError, an OOM kill or a run that
# never ends. ``jei-edge train --help`` states them.
MAX_BATCH_SIZE = 4096
MAX_EPOCHS = 10_000
MAX_MIN_STEPS = 10_000_000
MAX_THREADS = 1024
MIN_IMG_SIZE, MAX_IMG_SIZE = 4, 512  # square input side (--img-size, --backbone-opt img_size)
MAX_PARAMETERS = 100_000_000  # a model beyond this does not train on the CPUs jei-edge targets
LIMITS = {
    "batch_size": (1, MAX_BATCH_SIZE),
    "seed": (0, 2**32 - 1),
    "backbone_epochs": (0, MAX_EPOCHS),
    "augment_shift": (0, 64),
    "im_epochs": (0, MAX_EPOCHS),
    "im_patience": (1, MAX_EPOCHS),
    "epochs": (0, MAX_EPOCHS),
    "min_steps": (0, MAX_MIN_STEPS),
    "switch_every": (1, MAX_MIN_STEPS),
    "threads": (1, MAX_THREADS),
    "cache_limit_mb": (0, 1 << 20),
}
OPTIONAL = ("switch_every", "threads")  # None means "the default"
OPTIONS = {"lam": "--lambda", "batch_size": "--batch-size", "seed": "--seed", "backbone_epochs": "--backbone-epochs",
           "im_epochs": "--im-epochs", "epochs": "--epochs", "min_steps": "--min-steps", "threads": "--threads",
           "classifier_loss": "--classifier-loss", "backbone": "--backbone", "pos_weight": "--pos-weight"}


def check_img_size(value, what: str = "--img-size") -> int:
    """A square input side within ``MIN_IMG_SIZE..MAX_IMG_SIZE`` (``JeiEdgeError`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            value = int(value)
        except (TypeError, ValueError):
            raise JeiEdgeError(f"{what} must be an integer, got {value!r}",
                               hint=f"give a square input side in {MIN_IMG_SIZE}..{MAX_IMG_SIZE}") from None
    if not MIN_IMG_SIZE <= value <= MAX_IMG_SIZE:
        raise JeiEdgeError(f"{what} must be in {MIN_IMG_SIZE}..{MAX_IMG_SIZE}, got {value}",
                           hint="jei-edge trains small early-exit models and larger inputs do not fit in memory; "
                                "omit it to keep the data's own size")
    return value


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "vit"
    backbone_kwargs: Dict = field(default_factory=dict)
    exits: Optional[Tuple[int, ...]] = None
    lam: float = 0.7
    seed: int = 0
    batch_size: int = 64
    # phase 1: backbone (from scratch, or fine-tuned from backbone_weights)
    backbone_weights: Optional[str] = None
    backbone_epochs: int = 40
    backbone_lr: float = 2e-3
    backbone_weight_decay: float = 0.05
    augment_shift: int = 1  # random translation (pixels) of backbone training images; 0 = none
    # phase 2: IM warm-up (weighted CE, per-IM early stopping on validation accuracy)
    im_epochs: int = 6
    im_patience: int = 2
    im_lr: float = 0.01
    # phase 3: bi-level GATE / CLASSIFIER alternation
    epochs: int = 15
    min_steps: int = 6000  # at least this many bi-level batches (more epochs on small data sets)
    lr: float = 0.01
    lr_min: float = 2e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    switch_every: Optional[int] = None  # batches per phase; None = half an epoch (<= 200)
    classifier_loss: str = "mean"
    pos_weight: str = "reference"  # gate BCE positive weights: reference | balanced | none (metrics.pos_weights)
    pos_weight_cap: float = 5.0  # cap of the "reference" rule
    # torch intra-op threads while training (None: torch's default). Small models gain little from
    # several threads, and on a busy machine spinning threads make training many times slower.
    threads: Optional[int] = None
    # frozen-backbone feature cache for phases 2-3 (recomputed per batch above this size)
    cache_limit_mb: int = 1024

    def validate(self) -> "TrainConfig":
        """Check every setting's type and range (``LIMITS``); one ``JeiEdgeError`` lists the problems,
        each naming the setting and its ``jei-edge train`` option."""
        import math

        problems = []

        def name(field_name: str) -> str:
            flag = OPTIONS.get(field_name)
            return f"{flag} ({field_name})" if flag else field_name

        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            problems.append(f"{name('lam')} must be a finite number >= 0, got {lam!r}")
        for field_name, (lo, hi) in LIMITS.items():
            value = getattr(self, field_name)
            if value is None and field_name in OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name(field_name)} must be an integer, got {value!r}")
            elif not lo <= value <= hi:
                problems.append(f"{name(field_name)} must be in {lo}..{hi:,}, got {value:,}")
        for field_name in ("backbone_lr", "im_lr", "lr", "lr_min", "backbone_weight_decay", "weight_decay",
                           "momentum", "pos_weight_cap"):
            value = getattr(self, field_name)
            positive = field_name in ("backbone_lr", "im_lr", "lr", "pos_weight_cap")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    (value <= 0 if positive else value < 0):
                problems.append(f"{field_name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        if self.classifier_loss not in CLASSIFIER_LOSSES:
            problems.append(f"{name('classifier_loss')} must be one of {CLASSIFIER_LOSSES}, "
                            f"got {self.classifier_loss!r}")
        if self.pos_weight not in POS_WEIGHT_RULES:
            problems.append(f"{name('pos_weight')} must be one of {POS_WEIGHT_RULES}, got {self.pos_weight!r}")
        if not isinstance(self.backbone, str) or not self.backbone:
            problems.append(f"{name('backbone')} must be a backbone name, got {self.backbone!r}")
        if not isinstance(self.backbone_kwargs, dict):
            problems.append("backbone_kwargs must be a dict of backbone options, "
                            f"got {type(self.backbone_kwargs).__name__}")
        if problems:
            raise JeiEdgeError("bad training settings: " + "; ".join(problems),
                               hint="the limits are listed in `jei-edge train --help`")
        return self

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["exits"] = list(self.exits) if self.exits is not None else None
        return d
