"""The compiler: model.pt -> bundle ``NAME.jei/`` (export needs the ``[build]`` extra: torch, onnx).

Three steps (``build`` runs them, ``writer`` makes the bundle appear atomically):

- **export** (torch): ``plan``/``planning`` (stage boundaries), ``export`` (ONNX per stage + plain
  backbone), ``quantize`` (INT8 Q/DQ), ``parity`` (each stage graph vs its PyTorch stage) and
  ``references`` (the PyTorch model's outputs and exit decisions, stored in the bundle);
- **lower** (torch-free): ``lower`` (backend engines; nothing for onnxruntime);
- **verify** (torch-free): ``verify`` (the real runtime against the stored references; also
  ``jei-edge verify`` on another machine).

The bundle format itself (manifest schema, integrity check) lives in ``jei_edge.bundle`` so the
torch-free runtime reads it.

Example::

    from jei_edge.compile import BuildOptions, build_bundle, verify_bundle
    report = build_bundle("model.pt", "model.jei", BuildOptions(target="cpu"))
    verify_bundle("model.jei")["decisions"]["agreement"]
"""

from jei_edge.compile.build import BuildOptions, build_bundle
from jei_edge.compile.verify import ParityError, verify_bundle

__all__ = ["BuildOptions", "ParityError", "build_bundle", "verify_bundle"]
