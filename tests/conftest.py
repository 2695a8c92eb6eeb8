"""Test-wide configuration: GPU tests skip cleanly without CUDA."""

import os

import pytest

os.environ.setdefault("PYTHONHASHSEED", "0")


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and driver")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Small bundles built once per test session and shared by every folder (bundle/, backends/,
# runtime/, profile/): a ViT and a ResNet whose gates spread exits (tests/runtime/helpers.py).
@pytest.fixture(scope="session")
def vit_bundle(tmp_path_factory):
    from tests.runtime.helpers import build_spread_bundle

    return build_spread_bundle(tmp_path_factory.mktemp("vit"), "vit")


@pytest.fixture(scope="session")
def resnet_bundle(tmp_path_factory):
    from tests.runtime.helpers import build_spread_bundle

    return build_spread_bundle(tmp_path_factory.mktemp("resnet"), "resnet")
