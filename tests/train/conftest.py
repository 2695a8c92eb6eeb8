"""Tiny training settings shared by the training tests (seconds, not minutes)."""

import pytest

TINY_DATA = "synthetic:n=240,size=8,classes=4"
TINY_VIT = {"embed_dim": 16, "depth": 3, "heads": 2, "patch": 4}


def tiny_config(**overrides):
    from jei_edge.train import TrainConfig

    kw = dict(backbone="vit", backbone_kwargs=dict(TINY_VIT), backbone_epochs=1, im_epochs=1, epochs=1,
              min_steps=0, batch_size=32, lam=0.3, threads=1)
    kw.update(overrides)
    return TrainConfig(**kw)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one thread is fastest, and on a busy machine several threads spin for nothing."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data():
    from jei_edge.data import load_data

    return load_data(TINY_DATA, seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_data):
    from jei_edge.train import train_jei

    return train_jei(tiny_config(), tiny_data, progress=False)
