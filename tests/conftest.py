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
