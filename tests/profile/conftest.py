import pytest


@pytest.fixture(scope="session")
def bundle(vit_bundle):
    return vit_bundle
