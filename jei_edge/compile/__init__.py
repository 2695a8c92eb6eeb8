"""The compiler: model.pt -> bundle ``NAME.jei/`` (needs the ``[build]`` extra: torch, onnx).

Pipeline, one module per step: ``plan`` (stage boundaries) -> ``export`` (ONNX per stage + plain
backbone) -> ``parity`` (onnxruntime vs PyTorch, exit decisions) -> ``writer`` (atomic bundle);
``build`` runs them. The bundle format itself (manifest schema, integrity check) lives in
``jei_edge.runtime.bundle`` so the torch-free runtime reads it.

Example::

    from jei_edge.compile import BuildOptions, build_bundle
    report = build_bundle("model.pt", "model.jei", BuildOptions(target="cpu"))
"""

from jei_edge.compile.build import BuildOptions, build_bundle

__all__ = ["BuildOptions", "build_bundle"]
