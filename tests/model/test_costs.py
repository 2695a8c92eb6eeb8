"""MAC counting from real modules and the cost normalisations of docs/architecture.md."""

import pytest
import torch

from jei_edge.model import build_model, count_costs


def test_vit_costs_by_hand():
    d, t, c, depth, hid = 16, 5, 3, 3, 32  # img 4, patch 2 -> 4 patches + CLS
    m = build_model({"backbone": "vit", "backbone_kwargs": {
        "embed_dim": d, "depth": depth, "heads": 2, "mlp_ratio": 2.0, "img_size": 4, "patch": 2,
        "in_chans": 1, "num_classes": c}})
    ct = count_costs(m)
    stem = 4 * d * (1 * 2 * 2)  # conv: out elements x in x k*k
    block = t * d * 3 * d + t * d * d + 2 * t * t * d + t * d * hid + t * hid * d
    im = d * c
    gate = 4
    assert ct.stem_macs == stem
    assert ct.block_macs == [block] * depth
    assert ct.im_macs == [im] * (depth - 1) and ct.gate_macs == [gate] * (depth - 1)
    assert ct.head_macs == d * c
    plain = stem + depth * block + d * c
    full = plain + (depth - 1) * (im + gate)
    assert (ct.plain_macs, ct.full_macs) == (plain, full)
    assert ct.exit_macs[0] == stem + block + im + gate
    assert ct.exit_macs[1] == stem + 2 * block + 2 * (im + gate)
    assert ct.exit_macs[-1] == full
    assert ct.cost[-1] == 1.0
    assert ct.cost_vs_plain[-1] == pytest.approx(full / plain)


def test_resnet_costs_monotone_and_normalised():
    m = build_model({"backbone": "resnet", "backbone_kwargs": {"img_size": 8, "widths": [8, 16], "blocks_per_stage": [2, 2]}})
    ct = count_costs(m)
    assert all(a < b for a, b in zip(ct.exit_macs, ct.exit_macs[1:]))
    assert ct.cost == pytest.approx([x / ct.full_macs for x in ct.exit_macs])
    assert ct.cost_vs_plain == pytest.approx([x / ct.plain_macs for x in ct.exit_macs])
    # first block: two 3x3 convs 8->8 on 8x8
    assert ct.block_macs[0] == 2 * (8 * 8 * 8) * 8 * 9
    assert m.training is True  # count_costs restores the mode
