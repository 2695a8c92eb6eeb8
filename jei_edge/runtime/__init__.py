"""The on-device runtime: load a compiled bundle and run it with per-sample early termination.

Needs numpy plus a backend (onnxruntime on the CPU); never imports torch, onnx or tensorrt.
The conditional loop lives in ``loop.py`` (written once for every backend); the CPU backend is
``ort_backend.py`` (stage executor) + ``workspace.py`` (numpy decisions and compaction).
"""

from jei_edge.runtime.bundle import SCHEMA, SCHEMA_VERSION, Bundle
from jei_edge.runtime.loop import Results, StageExecutor, Workspace, run_conditional
from jei_edge.runtime.runtime import Runtime

__all__ = ["Bundle", "Results", "Runtime", "SCHEMA", "SCHEMA_VERSION", "StageExecutor", "Workspace", "run_conditional"]
