"""The on-device runtime: load a compiled bundle and run it with per-sample early termination.

Needs numpy plus a backend (onnxruntime on the CPU); never imports torch, onnx or tensorrt.
The conditional loop and the executor <-> workspace contract live in ``loop.py`` (written once for
every backend); ``workspace.py`` is the CPU workspace (numpy decisions and compaction), ``cuda/``
the CUDA core (exit kernel, workspace, pipeline). Backends (``jei_edge.backends``) supply the
stage executors; the bundle format is ``jei_edge.bundle``.
"""

from jei_edge.bundle import SCHEMA, SCHEMA_VERSION, Bundle
from jei_edge.runtime.loop import Capability, Results, StageExecutor, Workspace, run_conditional
from jei_edge.runtime.runtime import Runtime

__all__ = ["Bundle", "Capability", "Results", "Runtime", "SCHEMA", "SCHEMA_VERSION", "StageExecutor", "Workspace",
           "run_conditional"]
