import pytest

from tests.runtime.helpers import build_spread_bundle


@pytest.fixture(scope="session")
def vit_bundle(tmp_path_factory):
    return build_spread_bundle(tmp_path_factory.mktemp("vit"), "vit")
