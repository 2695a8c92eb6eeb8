"""jei-edge: make JEI-DNN early exits save real time on edge hardware.

Importing this package is cheap: it pulls in neither torch nor tensorrt. Heavy parts live in
subpackages (``jei_edge.model``, ``jei_edge.train``, ``jei_edge.compile``) that need the
``[build]`` extra; ``jei_edge.runtime`` needs only numpy plus a backend.
"""

__version__ = "0.1.0"

from jei_edge.errors import JeiEdgeError  # noqa: E402

__all__ = ["JeiEdgeError", "__version__"]
