"""TensorRT and TensorRT-RTX: one folder for both toolchains (same Python API for what we use).

- ``toolchain.py``: the one place that imports ``tensorrt`` or ``tensorrt_rtx``; TensorRT's logger
  routed into Python logging;
- ``builder.py``: one engine per stage graph (strongly typed network, an optimisation profile
  over the target's batch range, compute capabilities named explicitly for TensorRT-RTX's
  ahead-of-time builds), with an engine cache keyed by what an engine depends on.

The executor (running engines on the CUDA core's workspace) is not here yet: the registry
(``jei_edge.backends``) lists both backends as unavailable for running, with the reason.
"""
