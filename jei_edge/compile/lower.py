"""Lowering: the exported ONNX graphs -> what the target's backend runs (torch-free).

The second build step, between export and verify. onnxruntime runs the ONNX graphs directly, so
there is nothing to do for it. TensorRT / TensorRT-RTX targets will build one engine per stage
here (``engines/...``, recorded in ``Stage.engines`` of the manifest) on the machine that has the
toolchain; verify then runs those engines against the stored references.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

from jei_edge.bundle.manifest import Manifest
from jei_edge.errors import BuildError

LOWERABLE = ("onnxruntime",)


def check_lowerable(target) -> None:
    """Refuse a target whose backend this build cannot lower (before any export work).

    Args:
        target: a ``jei_edge.runtime.targets.Target``.
    """
    if target.backend not in LOWERABLE:
        raise BuildError(f"target '{target.name}' uses backend '{target.backend}', which this build does not "
                         "produce yet", hint=f"use a target with backend {' or '.join(LOWERABLE)} (e.g. --target cpu)")


def lower_bundle(root: Path, manifest: Manifest, target, progress=None) -> Tuple[Manifest, Dict]:
    """Compile the exported graphs in ``root`` for ``target``'s backend.

    Args:
        root: the bundle's staging directory (graphs from the export step).
        manifest: the manifest the export step wrote.
        target: the ``Target``.
        progress: a message callback (unused by onnxruntime).

    Returns:
        ``(manifest, report)``: the manifest with any engines added (unchanged for onnxruntime) and
        the lowering report.
    """
    check_lowerable(target)
    return manifest, {"backend": target.backend, "engines": 0,
                      "note": "onnxruntime runs the ONNX graphs directly: nothing to lower"}
