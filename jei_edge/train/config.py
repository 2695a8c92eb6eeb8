"""Training settings: one frozen dataclass, defaults in one place.

JEI-DNN reference defaults (the paper's; docs/training.md lists them and where we depart) are used where it names one: IM warm-up with
patience 2 and at most 6 epochs; bi-level phase with SGD lr 0.01, momentum 0.9, weight decay 5e-4,
cosine to 2e-4, batch 64, lambda 0.7, pos_weight cap 5, plain mean-CE classifier loss. The
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
    pos_weight_cap: float = 5.0
    # torch intra-op threads while training (None: torch's default). Small models gain little from
    # several threads, and on a busy machine spinning threads make training many times slower.
    threads: Optional[int] = None
    # frozen-backbone feature cache for phases 2-3 (recomputed per batch above this size)
    cache_limit_mb: int = 1024

    def validate(self) -> "TrainConfig":
        import math

        problems = []
        if not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam) or self.lam < 0:
            problems.append(f"lambda must be a finite number >= 0, got {self.lam!r}")
        for name in ("batch_size", "im_patience"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("backbone_epochs", "im_epochs", "epochs", "min_steps", "augment_shift"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        for name in ("backbone_lr", "im_lr", "lr"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0")
        if self.classifier_loss not in CLASSIFIER_LOSSES:
            problems.append(f"classifier_loss must be one of {CLASSIFIER_LOSSES}")
        if self.threads is not None and self.threads < 1:
            problems.append("threads must be >= 1")
        if self.switch_every is not None and self.switch_every < 1:
            problems.append("switch_every must be >= 1")
        if problems:
            raise JeiEdgeError("bad training settings: " + "; ".join(problems))
        return self

    def to_dict(self) -> Dict:
        d = asdict(self)
        d["exits"] = list(self.exits) if self.exits is not None else None
        return d
