"""Backbone registry, both built-in families, the plugin mechanism and the staged forward."""

import numpy as np
import pytest
import torch

from jei_edge.errors import CheckpointError, JeiEdgeError
from jei_edge.model import available_backbones, build_model
from jei_edge.model.backbone import PLUGIN_ENV, trust_plugin

PLUGIN = "tests.model.plugin_backbone:tiny_mlp"


@pytest.fixture(params=[
    {"backbone": "vit", "backbone_kwargs": {"embed_dim": 32, "depth": 4, "heads": 2, "img_size": 8, "patch": 4}},
    {"backbone": "resnet", "backbone_kwargs": {"widths": [8, 16], "blocks_per_stage": [1, 2], "img_size": 8}},
    # ResNet-18's stem (7x7 stride 2 + max-pool): the deployment-size benchmark models use it
    {"backbone": "resnet", "backbone_kwargs": {"widths": [8, 16], "blocks_per_stage": [1, 1], "img_size": 32,
                                               "in_chans": 3, "stem": "imagenet"}},
])
def model(request):
    torch.manual_seed(0)
    return build_model(request.param).eval()


def test_builtins_registered():
    assert {"vit", "resnet"} <= set(available_backbones())


def test_forward_shapes_and_default_exits(model):
    x = torch.randn(5, *model.input_shape)
    logits, gates = model(x)
    n_blocks = len(model.blocks)
    assert model.exits == list(range(n_blocks - 1))
    assert logits.shape == (5, n_blocks, model.num_classes)
    assert gates.shape == (5, n_blocks - 1)


def test_stages_compose_to_full_forward(model):
    x = torch.randn(3, *model.input_shape)
    logits, gate_logits = model(x)
    h = x
    for k in range(len(model.stage_ranges())):
        out = model.stage(k)(h)
        if k < model.num_gates:
            h, probs, g = out
            torch.testing.assert_close(probs, torch.softmax(logits[:, k], -1))
            torch.testing.assert_close(g, torch.sigmoid(gate_logits[:, k]))
        else:
            torch.testing.assert_close(out, torch.softmax(logits[:, -1], -1))
    torch.testing.assert_close(model.plain_backbone()(x), torch.softmax(logits[:, -1], -1))


def test_custom_exit_positions():
    m = build_model({"backbone": "vit", "backbone_kwargs": {"depth": 5, "embed_dim": 16, "heads": 2}, "exits": [3, 1]})
    assert m.exits == [1, 3]
    assert m.stage_ranges() == [(0, 2), (2, 4), (4, 5)]
    logits, gates = m(torch.randn(2, *m.input_shape))
    assert logits.shape[1] == 3 and gates.shape[1] == 2
    with pytest.raises(JeiEdgeError, match="out of range"):
        build_model({"backbone": "vit", "backbone_kwargs": {"depth": 3}, "exits": [2]})


def test_vit_im_shares_final_norm_without_owning_it():
    m = build_model({"backbone": "vit", "backbone_kwargs": {"depth": 3, "embed_dim": 16, "heads": 2}})
    assert all(len(list(im.parameters())) == 2 for im in m.ims)  # only its Linear
    assert m.ims[0]._norm() is m.head.norm
    assert not any(k.startswith("ims.") and "norm" in k for k in m.state_dict())


def test_unknown_backbone_is_clear():
    with pytest.raises(CheckpointError, match="unknown backbone 'nope'"):
        build_model({"backbone": "nope"})


def test_plugin_requires_trust(monkeypatch):
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    with pytest.raises(CheckpointError, match="not trusted"):
        build_model({"backbone": "tests.model.plugin_backbone:tiny_mlp_untrusted_name"})


def test_plugin_via_env_and_trust(monkeypatch):
    monkeypatch.setenv(PLUGIN_ENV, PLUGIN)
    m = build_model({"backbone": PLUGIN, "backbone_kwargs": {"depth": 4}})
    assert m.spec.family == "mlp" and len(m.blocks) == 4 and m.exits == [0, 1, 2]
    logits, _ = m(torch.randn(2, *m.input_shape))
    assert logits.shape == (2, 4, 3)
    trust_plugin("tests.model.plugin_backbone:not_a_spec")
    with pytest.raises(JeiEdgeError, match="not a BackboneSpec"):
        build_model({"backbone": "tests.model.plugin_backbone:not_a_spec"})


def test_missing_plugin_module_is_clear(monkeypatch):
    monkeypatch.setenv(PLUGIN_ENV, "no_such_pkg.mod:factory")
    with pytest.raises(CheckpointError, match="cannot import module 'no_such_pkg.mod'"):
        build_model({"backbone": "no_such_pkg.mod:factory"})
    monkeypatch.setenv(PLUGIN_ENV, "tests.model.plugin_backbone:missing_fn")
    with pytest.raises(CheckpointError, match="no function 'missing_fn'"):
        build_model({"backbone": "tests.model.plugin_backbone:missing_fn"})


def test_bad_backbone_options_are_clear():
    with pytest.raises(JeiEdgeError, match="rejected its options"):
        build_model({"backbone": "vit", "backbone_kwargs": {"wings": 2}})


def test_resnet_stem_choice():
    m = build_model({"backbone": "resnet", "backbone_kwargs": {"widths": [8], "blocks_per_stage": [2], "img_size": 32,
                                                               "stem": "imagenet"}})
    assert m.stem(torch.zeros(1, 1, 32, 32)).shape == (1, 8, 8, 8)  # /2 conv, /2 max-pool
    with pytest.raises(ValueError, match="stem must be"):
        build_model({"backbone": "resnet", "backbone_kwargs": {"stem": "huge"}})


def test_confidence_gates_spread_exits_of_an_untrained_model():
    from jei_edge.exit_rule import exit_levels
    from jei_edge.model.jei import confidence_gates

    torch.manual_seed(0)
    m = build_model({"backbone": "resnet", "backbone_kwargs": {"widths": [8, 16], "blocks_per_stage": [1, 2]}})
    x = torch.randn(400, *m.input_shape)
    confidence_gates(m, x, quantiles=(0.5,))
    with torch.no_grad():
        _, gl = m(x)
    hist = np.bincount(exit_levels(torch.sigmoid(gl).double().numpy()), minlength=m.num_exits).tolist()
    assert hist[0] > 0.3 * len(x) and sum(h > 0 for h in hist) >= 2, hist  # gate 0 fires on ~half the rows
