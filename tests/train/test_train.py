import numpy as np
import pytest
import torch

from jei_edge.errors import CheckpointError, JeiEdgeError
from jei_edge.train import train_jei
from jei_edge.train.config import ALPHAS, TrainConfig

from .conftest import tiny_config


def test_checkpoint_is_complete_and_loadable(tiny_ckpt, tiny_data, tmp_path):
    from jei_edge.model.checkpoint import load_checkpoint, save_checkpoint

    ck = tiny_ckpt
    G = len(ck["exits"]["positions"])
    assert G == 2  # depth 3 -> an exit after blocks 0 and 1
    assert len(ck["exits"]["pos_weights"]) == G
    assert all(0.0 <= w <= 5.0 for w in ck["exits"]["pos_weights"])
    cal = ck["calibration"]
    assert cal["alphas"] == list(ALPHAS) and cal["split_size"] == len(tiny_data.calib)
    assert len(cal["qhat"]) == G + 1 and all(len(row) == len(ALPHAS) for row in cal["qhat"])
    for row in cal["qhat"]:  # qhat shrinks (weakly) as alpha grows
        assert all(a >= b for a, b in zip(row, row[1:]))
    assert ck["preprocessing"] == tiny_data.preprocessing
    assert ck["class_names"] == tiny_data.class_names
    assert ck["config"]["backbone_kwargs"]["img_size"] == 8 and ck["config"]["backbone_kwargs"]["num_classes"] == 4
    tr = ck["training"]
    assert tr["lambda"] == 0.3 and tr["data"]["source"] == tiny_data.source
    path = save_checkpoint(tmp_path / "m.pt", checkpoint=ck)
    model, again = load_checkpoint(path)
    logits, gates = model(torch.from_numpy(tiny_data.test.x[:5]))
    assert logits.shape == (5, G + 1, 4) and gates.shape == (5, G)


def test_training_is_reproducible(tiny_data, tiny_ckpt):
    again = train_jei(tiny_config(), tiny_data, progress=False)
    for k, v in tiny_ckpt["state_dict"].items():
        assert torch.equal(v, again["state_dict"][k]), k
    assert again["calibration"] == tiny_ckpt["calibration"]
    other = train_jei(tiny_config(seed=1), tiny_data, progress=False)
    assert not all(torch.equal(v, other["state_dict"][k]) for k, v in tiny_ckpt["state_dict"].items())


def test_phases_touch_only_their_parameters(tiny_data, monkeypatch):
    """The backbone is frozen after phase 1; GATE steps move only gates, CLASSIFIER steps only IMs."""
    from jei_edge.train import phases
    from jei_edge.train.features import FrozenFeatures, freeze_backbone
    from jei_edge.train.pipeline import build_jei_model
    from jei_edge.model.costs import count_costs

    cfg = tiny_config(min_steps=2, epochs=0, switch_every=1, batch_size=64)
    model = build_jei_model(cfg, tiny_data)
    freeze_backbone(model)
    ftr = FrozenFeatures(model, tiny_data.train.x)
    fval = FrozenFeatures(model, tiny_data.val.x)
    snap = lambda mod: [p.detach().clone() for p in mod.parameters()]  # noqa: E731
    backbone0, ims0, gates0 = snap(model.blocks), snap(model.ims), snap(model.gates)
    # one epoch of 2 batches with switch_every=1: batch 0 = GATE, batch 1 = CLASSIFIER
    steps = []
    real_gate, real_clf = phases._gate_loss, phases._classifier_loss

    def gate_loss(*a, **k):
        steps.append("gate")
        return real_gate(*a, **k)

    def clf_loss(*a, **k):
        steps.append("clf")
        return real_clf(*a, **k)

    monkeypatch.setattr(phases, "_gate_loss", gate_loss)
    monkeypatch.setattr(phases, "_classifier_loss", clf_loss)
    big = tiny_data.train.y[:128]
    ftr.n = 128
    phases.bilevel(model, cfg, ftr, big, fval, tiny_data.val.y, count_costs(model).to_dict(),
                   torch.Generator().manual_seed(0), progress=False)
    assert steps[:2] == ["gate", "clf"]
    assert all(torch.equal(a, b) for a, b in zip(backbone0, snap(model.blocks)))
    assert not all(torch.equal(a, b) for a, b in zip(ims0, snap(model.ims)))
    assert not all(torch.equal(a, b) for a, b in zip(gates0, snap(model.gates)))


def test_gate_loss_uses_oracle_targets_and_pos_weight():
    from jei_edge.train.phases import _gate_loss
    from jei_edge.model.jei import build_model

    model = build_model({"backbone": "vit", "backbone_kwargs": {"num_classes": 3, "img_size": 8, "embed_dim": 8,
                                                                "depth": 3, "heads": 2}})
    y = torch.tensor([0, 1])
    # sample 0: IM 0 is right and confident -> oracle exit 0; sample 1: only the head is right
    zs = [torch.tensor([[9.0, 0, 0], [9.0, 0, 0]]), torch.tensor([[9.0, 0, 0], [9.0, 0, 0]])]
    final = torch.tensor([[9.0, 0, 0], [0, 9.0, 0]])
    costs = torch.tensor([0.3, 0.6, 1.0])
    pw = torch.tensor([2.0, 3.0])
    loss = _gate_loss(model, zs, final, y, costs, 0.5, pw)
    gl = torch.stack([g(z) for g, z in zip(model.gates, zs)], dim=1)
    t = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    ref = -(pw * t * torch.nn.functional.logsigmoid(gl) + (1 - t) * torch.nn.functional.logsigmoid(-gl)).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_gate_weighted_classifier_loss_runs(tiny_data):
    ck = train_jei(tiny_config(classifier_loss="gate_weighted", min_steps=4), tiny_data, progress=False)
    assert ck["training"]["config"]["classifier_loss"] == "gate_weighted"


def test_backbone_weights_start_and_mismatch(tiny_ckpt, tiny_data, tmp_path):
    sd = {k: v for k, v in tiny_ckpt["state_dict"].items() if k.split(".")[0] in ("stem", "blocks", "head")}
    torch.save(sd, tmp_path / "bb.pt")
    ck = train_jei(tiny_config(backbone_weights=str(tmp_path / "bb.pt"), backbone_epochs=0), tiny_data,
                   progress=False)
    for k, v in sd.items():
        assert torch.equal(ck["state_dict"][k], v)
    torch.save({k: v for k, v in list(sd.items())[1:]}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing"):
        train_jei(tiny_config(backbone_weights=str(tmp_path / "partial.pt")), tiny_data, progress=False)
    with pytest.raises(CheckpointError, match="do not exist"):
        train_jei(tiny_config(backbone_weights=str(tmp_path / "nope.pt")), tiny_data, progress=False)


@pytest.mark.parametrize("kw", [{"lam": -1.0}, {"lam": float("nan")}, {"batch_size": 0},
                                {"classifier_loss": "bogus"}, {"epochs": -1}])
def test_bad_settings(kw):
    with pytest.raises(JeiEdgeError):
        TrainConfig(**kw).validate()


def test_random_shift_moves_content_and_keeps_shape():
    from jei_edge.train.phases import random_shift

    x = torch.zeros(16, 1, 6, 6)
    x[:, :, 3, 3] = 1.0
    out = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pos = [tuple(torch.nonzero(o[0] == 1.0)[0].tolist()) for o in out]
    assert all(abs(r - 3) <= 1 and abs(c - 3) <= 1 for r, c in pos) and len(set(pos)) > 1
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_evaluate_checkpoint_reports_jei_and_baseline(tiny_ckpt, tiny_data):
    from jei_edge.exit_rule import exit_levels
    from jei_edge.model.checkpoint import model_from_checkpoint
    from jei_edge.train.evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(tiny_ckpt, tiny_data)
    G = len(tiny_ckpt["exits"]["positions"])
    j = r["jei"]
    assert sum(j["exit_histogram"]) == len(tiny_data.test) and len(j["exit_histogram"]) == G + 1
    assert 0 < j["mean_cost"] <= 1 and len(j["conformal"]) == len(ALPHAS)
    # the histogram is the numpy exit rule applied to the model's own gates
    model = model_from_checkpoint(tiny_ckpt)
    with torch.no_grad():
        _, gl = model(torch.from_numpy(tiny_data.test.x))
    assert np.bincount(exit_levels(torch.sigmoid(gl).numpy()), minlength=G + 1).tolist() == j["exit_histogram"]
    costs = [p["mean_cost"] for p in r["baseline"]["curve"]]
    assert costs == sorted(costs)
    assert "interpolated_accuracy" in r["baseline"]["at_jei_cost"]
    # offsets move exits: a large negative offset sends everyone to exit 0
    r2 = evaluate_checkpoint(tiny_ckpt, tiny_data, offsets=[-5.0] * G)
    assert r2["jei"]["exit_histogram"][0] == len(tiny_data.test)


@pytest.mark.slow
def test_realistic_synthetic_run_spreads_exits():
    """Default settings on the synthetic set: >= 3 exits with >= 5% of test samples (what the
    compiler benchmarks need) and JEI within 2 points of the thresholding baseline at its cost."""
    from jei_edge.data import load_data
    from jei_edge.train.evaluate import evaluate_checkpoint

    data = load_data("synthetic", seed=0)
    ck = train_jei(TrainConfig(lam=0.3), data, progress=False)
    r = evaluate_checkpoint(ck, data)
    frac = np.array(r["jei"]["exit_histogram"]) / r["n_test"]
    assert (frac >= 0.05).sum() >= 3, frac
    assert r["jei"]["accuracy"] >= r["baseline"]["at_jei_cost"]["interpolated_accuracy"] - 0.02
