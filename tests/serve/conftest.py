"""Fixtures for the serving tests: a small bundle, the serving environment, servers that always stop.

Two kinds of tests live here:

- host logic (``Handler``, the repository writer): need only the runtime and a bundle, run in any
  environment;
- ``serve``-marked tests: start the ``tritonserver`` binary of the ``nvidia-pytriton`` wheel and
  query it with ``tritonclient``, so they run in the serving environment (``.venv-serve``, numpy < 2;
  ``make test`` runs them there: ``.venv-serve/bin/python -m pytest tests/serve -m serve``).

Without the serving environment the ``serve`` tests skip with the reason, except under ``CI=true``,
where they fail: CI installs the serving environment from requirements/serve.txt and must run them.
The serving environment has no torch, so the test bundle is built by the build environment's
Python (``$JEI_EDGE_BUILD_PYTHON``, default ``.venv/bin/python`` of this checkout) when torch is not
importable here.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _absent(reason: str):
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the serving tests (make test installs .venv-serve and runs them)",
                    pytrace=False)
    pytest.skip(reason)


def serving_env_missing() -> str:
    for mod, pkg in (("pytriton", "nvidia-pytriton"), ("tritonclient.http", "tritonclient[http]"),
                     ("tritonclient.grpc", "tritonclient[grpc]")):
        try:
            if importlib.util.find_spec(mod) is None:
                return f"{pkg} is not installed in {sys.executable}"
        except ModuleNotFoundError:
            return f"{pkg} is not installed in {sys.executable}"
    return ""


@pytest.fixture(scope="session")
def serve_env():
    """The serving environment (nvidia-pytriton's tritonserver and tritonclient) or a skip/fail."""
    missing = serving_env_missing()
    if missing:
        _absent(f"serving environment absent ({missing}): `make setup-serve`, then "
                f"`.venv-serve/bin/python -m pytest tests/serve -m serve`")


def _build_python() -> str:
    exe = os.environ.get("JEI_EDGE_BUILD_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
    if not Path(exe).exists():
        _absent(f"no torch here and no build environment at {exe} to build the test bundle "
                f"(`make setup`, or set JEI_EDGE_BUILD_PYTHON)")
    return exe


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory) -> Path:
    """The calibrated spread ViT bundle of tests/runtime/helpers.py (input [1, 8, 8], 5 classes)."""
    tmp = tmp_path_factory.mktemp("serve_bundle")
    if importlib.util.find_spec("torch") is not None:
        from tests.runtime.helpers import build_spread_bundle

        return build_spread_bundle(tmp, "vit")
    code = ("import sys; from pathlib import Path; from tests.runtime.helpers import build_spread_bundle; "
            "print(build_spread_bundle(Path(sys.argv[1]), 'vit'))")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([_build_python(), "-c", code, str(tmp)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"building the test bundle failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def samples(n: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)
