"""JEI-DNN training and evaluation (needs torch, the ``[build]`` extra).

Example::

    from jei_edge.data import load_data
    from jei_edge.train import TrainConfig, train_jei
    from jei_edge.model.checkpoint import save_checkpoint

    data = load_data("synthetic", seed=0)
    ckpt = train_jei(TrainConfig(backbone="vit", lam=0.7), data)
    save_checkpoint("model.pt", checkpoint=ckpt)

Operating points: ``lam`` (lambda) trades accuracy for cost; ``synthetic`` with the ViT and lambda
0.3-1.0 gives exits spread over depth (>= 3 exits with >= 5% of samples each), see docs/training.md.
"""

from jei_edge.train.config import ALPHAS, TrainConfig
from jei_edge.train.pipeline import calibrate, train_jei

__all__ = ["ALPHAS", "TrainConfig", "calibrate", "train_jei"]
