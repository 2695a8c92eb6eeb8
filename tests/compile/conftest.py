import pytest

from tests.runtime.helpers import build_spread_bundle


@pytest.fixture(scope="session")
def parity_bundle(tmp_path_factory):
    """A small ViT bundle built with the full 10,000-input decision check."""
    return build_spread_bundle(tmp_path_factory.mktemp("parity"), "vit", parity_samples=10_000)
