"""The compiled bundle ``NAME.jei/``: the typed manifest (schema v2), path rules and the integrity
check. Torch-free and onnx-free: the on-device runtime reads bundles through this package only.

Example::

    from jei_edge.bundle import Bundle
    b = Bundle.open("model.jei")            # parses every manifest field, checks sha256 and paths
    b.manifest.stages[0].outputs            # (TensorSpec('hidden_out', (17, 64), 'float32'), ...)
"""

from jei_edge.bundle.bundle import Bundle, check_relpath, resolve_inside, sha256_file
from jei_edge.bundle.manifest import (MANIFEST, SCHEMA, SCHEMA_VERSION, Costs, Deploy, Engine, Exits, Graph,
                                      Lowering,
                                      Manifest, Preprocessing, References, Stage, TargetInfo, TensorSpec, decode_manifest,
                                      parse_manifest)

__all__ = ["Bundle", "Costs", "Deploy", "Engine", "Exits", "Graph", "Lowering", "MANIFEST", "Manifest", "Preprocessing", "References",
           "SCHEMA", "SCHEMA_VERSION", "Stage", "TargetInfo", "TensorSpec", "check_relpath", "decode_manifest",
           "parse_manifest", "resolve_inside", "sha256_file"]
