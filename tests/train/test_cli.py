"""``jei-edge train`` / ``jei-edge eval`` end to end with tiny settings, and their error paths."""

import json

import pytest

from jei_edge.cli import main

from .conftest import TINY_DATA

TINY = ["--data", TINY_DATA, "--backbone-opt", "embed_dim=16", "--backbone-opt", "depth=3",
        "--backbone-opt", "heads=2", "--backbone-epochs", "1", "--im-epochs", "1", "--epochs", "1",
        "--min-steps", "0", "--batch-size", "32", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "model.pt"
    assert main(["train", *TINY, "--lambda", "0.3", "-o", str(out)]) == 0
    return out


def test_train_writes_checkpoint_and_eval_reads_it(trained, capsys):
    from jei_edge.model.checkpoint import read_checkpoint

    ck = read_checkpoint(trained)
    assert ck["training"]["lambda"] == 0.3 and ck["training"]["data"]["source"] == TINY_DATA
    capsys.readouterr()
    assert main(["eval", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["data"] == TINY_DATA and info["split"] == "test"
    assert set(info["jei"]) >= {"accuracy", "mean_cost", "mean_cost_vs_plain", "exit_histogram", "ece", "conformal"}
    assert len(info["baseline"]["curve"]) > 5 and "interpolated_accuracy" in info["baseline"]["at_jei_cost"]
    assert set(info["baselines"]) == {"a", "b", "c", "d"} and info["warmup_ims"] is True
    for b in info["baselines"].values():
        assert {"label", "ims", "score", "curve", "at_jei_cost"} <= set(b)
        assert 0.0 <= b["at_jei_cost"]["interpolated_accuracy"] <= 1.0
    assert main(["eval", str(trained)]) == 0
    text = capsys.readouterr().out
    assert "JEI-DNN" in text and "threshold" in text and "ECE" in text and "alpha" in text
    assert "(d) max_logit on warm-up-only IMs" in text and "(a) p_max on JEI IMs" in text


def test_train_pos_weight_and_old_checkpoint_eval(tmp_path, capsys):
    import torch

    from jei_edge.model.checkpoint import read_checkpoint, save_checkpoint

    out = tmp_path / "m.pt"
    assert main(["train", *TINY, "--pos-weight", "none", "--json", "-o", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["pos_weight"] == "none"
    ck = read_checkpoint(out)
    assert ck["exits"]["pos_weights"] == [1.0, 1.0] and "warmup_ims" in ck
    del ck["warmup_ims"]  # a checkpoint written before warm-up IMs were kept
    old = save_checkpoint(tmp_path / "old.pt", checkpoint=ck)
    assert isinstance(torch.load(old, weights_only=True), dict)
    assert main(["eval", str(old), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["baselines"]) == {"a", "b"} and info["warmup_ims"] is False
    assert main(["eval", str(old)]) == 0
    assert "no warm-up IM weights" in capsys.readouterr().out


def test_train_json_output(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["train", *TINY, "--json", "-o", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["output"] == str(out) and "validation" in info and out.is_file()


def test_eval_with_offsets_and_other_split(trained, capsys):
    assert main(["eval", str(trained), "--offsets", "-5", "--split", "val", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["split"] == "val" and info["jei"]["exit_histogram"][0] == info["n_test"]
    assert main(["eval", str(trained), "--offsets", "1,2,3,4,5"]) == 2
    assert "gates" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.npz"], "does not exist"),
    (["--data", "mystery"], "unknown data source"),
    (["--data", "synthetic:wat=1"], "bad synthetic option"),
    (["--backbone", "nosuchnet"], "unknown backbone"),
    (["--lambda", "-1"], "lambda"),
    (["--backbone-opt", "novalue"], "KEY=VALUE"),
    (["--exits", "a,b"], "--exits"),
    (["--pos-weight", "inverse"], "'inverse' is not one of 'reference', 'balanced', 'none'"),
    (["--exits", "9"], "out of range"),
    (["--backbone-weights", "nope.pt"], "do not exist"),
])
def test_train_errors_are_clear_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "model.pt"
    assert main(["train", *TINY, *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_npz_without_y(tmp_path, capsys):
    import numpy as np

    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((40, 8, 8), np.float32))
    assert main(["train", "--data", str(p), "-o", str(tmp_path / "m.pt")]) == 2
    assert "lacks array(s) ['y']" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_empty_image_folder(tmp_path, capsys):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir(parents=True)
    assert main(["train", "--data", str(tmp_path / "imgs"), "-o", str(tmp_path / "m.pt")]) == 2
    assert "holds no image files" in capsys.readouterr().err


def test_interrupt_leaves_no_file(tmp_path, monkeypatch, capsys):
    import jei_edge.train

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(jei_edge.train, "train_jei", boom)
    out = tmp_path / "model.pt"
    assert main(["train", *TINY, "-o", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_eval_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["eval", str(bad)]) == 2
    assert "cannot be loaded" in capsys.readouterr().err


def test_bad_backbone_options_and_class_mismatch(tmp_path, trained, capsys):
    assert main(["train", *TINY, "--img-size", "10", "-o", str(tmp_path / "m.pt")]) == 2
    assert "multiple of patch" in capsys.readouterr().err
    assert main(["eval", str(trained), "--data", "digits"]) == 2
    assert "same classes" in capsys.readouterr().err
