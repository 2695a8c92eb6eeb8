"""Warm-up IM weights in the checkpoint and the four thresholding baselines built on them."""

import numpy as np
import pytest
import torch

from jei_edge.errors import CheckpointError
from jei_edge.train import train_jei
from jei_edge.train.metrics import pos_weights

from .conftest import tiny_config


@pytest.fixture(scope="module")
def no_bilevel_ckpt(tiny_data):
    """No bi-level step: the final IMs are the warm-up IMs, so (c) must equal (a) and (d) equal (b)."""
    return train_jei(tiny_config(epochs=0, min_steps=0), tiny_data, progress=False)


def test_checkpoint_keeps_the_warmup_ims(tiny_ckpt, no_bilevel_ckpt, tiny_data):
    sd, warm = tiny_ckpt["state_dict"], tiny_ckpt["warmup_ims"]
    assert set(warm) == {k for k in sd if k.startswith("ims.")}
    assert all(warm[k].shape == sd[k].shape for k in warm)
    # the bi-level phase moved the IMs away from their warm-up weights ...
    assert not all(torch.equal(warm[k], sd[k]) for k in warm)
    # ... and without it they are the same tensors
    assert all(torch.equal(v, no_bilevel_ckpt["state_dict"][k]) for k, v in no_bilevel_ckpt["warmup_ims"].items())
    # the warm-up does not depend on lambda or the pos_weight rule (so baselines c, d are shared)
    other = train_jei(tiny_config(lam=2.0, pos_weight="none"), tiny_data, progress=False)
    assert all(torch.equal(v, other["warmup_ims"][k]) for k, v in warm.items())


def test_saved_and_read_back_safely(tiny_ckpt, tmp_path):
    from jei_edge.model.checkpoint import load_checkpoint, save_checkpoint, warmup_model

    path = save_checkpoint(tmp_path / "m.pt", checkpoint=tiny_ckpt)
    model, ck = load_checkpoint(path)  # torch.load(weights_only=True) inside
    warm = warmup_model(ck, model)
    for k, v in tiny_ckpt["warmup_ims"].items():
        assert torch.equal(warm.state_dict()[k], v)
    for k, v in model.state_dict().items():  # the model itself keeps its trained weights; only IMs differ
        assert torch.equal(v, tiny_ckpt["state_dict"][k])
        if not k.startswith("ims."):
            assert torch.equal(warm.state_dict()[k], v)


def test_old_checkpoint_without_warmup_ims_loads(tiny_ckpt, tiny_data, tmp_path):
    from jei_edge.model.checkpoint import load_checkpoint, save_checkpoint, warmup_model
    from jei_edge.train.evaluate import evaluate_checkpoint

    old = {k: v for k, v in tiny_ckpt.items() if k != "warmup_ims"}
    model, ck = load_checkpoint(save_checkpoint(tmp_path / "old.pt", checkpoint=old))
    assert warmup_model(ck, model) is None
    r = evaluate_checkpoint(ck, tiny_data)
    assert sorted(r["baselines"]) == ["a", "b"] and r["warmup_ims"] is False
    assert r["baseline"] is r["baselines"]["a"]


@pytest.mark.parametrize("change, message", [
    (lambda w: w.update({"ims.0.fc.weight": torch.zeros(3, 3)}), "shape"),
    (lambda w: w.pop("ims.1.fc.bias"), "missing"),
    (lambda w: w.update({"ims.9.fc.bias": torch.zeros(4)}), "not an IM tensor"),
    (lambda w: w.update({"blocks.0.x": torch.zeros(4)}), "IM tensor names"),
    (lambda w: w.update({"ims.0.fc.bias": [0.0] * 4}), "must be a tensor"),
    (lambda w: w.update({"ims.0.fc.bias": torch.full((4,), float("nan"))}), "NaN"),
])
def test_malformed_warmup_ims_are_named(tiny_ckpt, tmp_path, change, message):
    from jei_edge.model.checkpoint import load_checkpoint, save_checkpoint

    bad = dict(tiny_ckpt)
    bad["warmup_ims"] = dict(tiny_ckpt["warmup_ims"])
    change(bad["warmup_ims"])
    path = save_checkpoint(tmp_path / "bad.pt", checkpoint=bad)
    with pytest.raises(CheckpointError, match="warmup_ims") as err:
        load_checkpoint(path)
    assert message in str(err.value)


def test_warmup_ims_not_a_dict(tiny_ckpt, tmp_path):
    from jei_edge.model.checkpoint import read_checkpoint, save_checkpoint

    bad = dict(tiny_ckpt, warmup_ims=[1, 2])
    with pytest.raises(CheckpointError, match="field 'warmup_ims' must be a dict"):
        read_checkpoint(save_checkpoint(tmp_path / "bad.pt", checkpoint=bad))


def test_four_baselines(tiny_ckpt, no_bilevel_ckpt, tiny_data):
    from jei_edge.train.evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(tiny_ckpt, tiny_data)
    assert sorted(r["baselines"]) == ["a", "b", "c", "d"] and r["warmup_ims"] is True
    assert r["baseline"] is r["baselines"]["a"]
    labels = {k: (b["ims"], b["score"]) for k, b in r["baselines"].items()}
    assert labels == {"a": ("jei", "p_max"), "b": ("jei", "max_logit"), "c": ("warmup", "p_max"),
                      "d": ("warmup", "max_logit")}
    for b in r["baselines"].values():
        costs = [p["mean_cost"] for p in b["curve"]]
        assert costs == sorted(costs) and 0 <= b["at_jei_cost"]["interpolated_accuracy"] <= 1
        assert len(b["at_jei_cost"]["conformal"]) == len(tiny_ckpt["calibration"]["alphas"])
    assert len(r["per_exit_accuracy_warmup"]) == len(r["per_exit_accuracy"])
    assert r["per_exit_accuracy_warmup"][-1] == r["per_exit_accuracy"][-1]  # the same final head

    same = evaluate_checkpoint(no_bilevel_ckpt, tiny_data)["baselines"]
    for jei_ims, warm_ims in (("a", "c"), ("b", "d")):
        assert same[jei_ims]["curve"] == same[warm_ims]["curve"]
        assert same[jei_ims]["at_jei_cost"]["interpolated_accuracy"] == same[warm_ims]["at_jei_cost"]["interpolated_accuracy"]


def test_pos_weight_rule_reaches_the_gates(tiny_data):
    ck = train_jei(tiny_config(pos_weight="none", min_steps=4), tiny_data, progress=False)
    assert ck["exits"]["pos_weights"] == [1.0, 1.0]
    assert ck["training"]["config"]["pos_weight"] == "none"
    assert all(v["pos_weights"] == [1.0, 1.0] for v in ck["training"]["bilevel"]["validation"])
    bal = train_jei(tiny_config(pos_weight="balanced", min_steps=4), tiny_data, progress=False)
    last = bal["training"]["bilevel"]["validation"][-1]  # the weights come from the last validation pass
    oracle = np.repeat(np.arange(len(last["oracle_histogram"])), last["oracle_histogram"])
    assert bal["exits"]["pos_weights"] == pos_weights(oracle, 2, rule="balanced") == last["pos_weights"]
    assert bal["training"]["config"]["pos_weight"] == "balanced"


def test_bad_pos_weight_setting():
    from jei_edge.errors import JeiEdgeError

    with pytest.raises(JeiEdgeError, match=r"--pos-weight \(pos_weight\) must be one of"):
        tiny_config(pos_weight="inverse").validate()
