"""One place for optional, heavy imports.

``require("torch")`` returns the module or raises a ``DependencyError`` that names the extra to
install. Nothing here is imported at package import time.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (pip requirement, extra that provides it)
_KNOWN = {
    "torch": ("torch>=2.6", "build"),
    "onnx": ("onnx", "build"),
    "onnxruntime": ("onnxruntime", "cpu"),
    "sklearn": ("scikit-learn", "build"),
    "PIL": ("pillow", "images"),
    "matplotlib": ("matplotlib", "plots"),
    "tqdm": ("tqdm", "build"),
    "cuda.bindings": ("cuda-python>=12", "cuda"),
    "tensorrt_rtx": ("tensorrt-rtx", "rtx"),
    "polygraphy": ("polygraphy", "selftest"),
    "cryptography": ("cryptography", "sign"),
    "tensorrt": ("tensorrt", None),  # from JetPack on Jetson boards, never from PyPI
}


def require(name: str, purpose: str | None = None) -> ModuleType:
    """Import ``name`` or raise a clear DependencyError naming the extra that provides it."""
    from jei_edge.errors import DependencyError

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        req, extra = _KNOWN.get(name, (name, None))
        what = f" for {purpose}" if purpose else ""
        how = f"pip install 'jei-edge[{extra}]'" if extra else f"pip install {req}"
        if name == "tensorrt":
            how = "TensorRT comes with JetPack on Jetson boards (not from PyPI): run on the board, or use the JetPack image"
        raise DependencyError(f"'{name}' is needed{what} but could not be imported ({exc})", hint=how) from exc

