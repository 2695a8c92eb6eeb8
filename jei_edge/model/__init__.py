"""Model core: backbones, exits (IM + gate), the JEI model, cost counting and checkpoints.

Needs torch (the ``[build]`` extra). The numpy exit rule lives in ``jei_edge.exit_rule``.
"""

from jei_edge.model.backbone import BackboneSpec, available_backbones, get_backbone, register_backbone
from jei_edge.model.checkpoint import FORMAT, FORMAT_VERSION, load_checkpoint, read_checkpoint, save_checkpoint
from jei_edge.model.costs import CostTable, count_costs
from jei_edge.model.exits import Gate, gate_features, exit_levels_torch
from jei_edge.model.jei import JEIModel, build_model

__all__ = [
    "BackboneSpec",
    "CostTable",
    "FORMAT",
    "FORMAT_VERSION",
    "Gate",
    "JEIModel",
    "available_backbones",
    "build_model",
    "count_costs",
    "exit_levels_torch",
    "gate_features",
    "get_backbone",
    "load_checkpoint",
    "read_checkpoint",
    "register_backbone",
    "save_checkpoint",
]
