"""model.pt: round trip, and every kind of bad file gets a clear CheckpointError; nothing runs."""

import io
import os
import pickle
import zipfile

import pytest
import torch

from jei_edge.errors import CheckpointError
from jei_edge.model import FORMAT_VERSION, build_model, load_checkpoint, read_checkpoint, save_checkpoint
from jei_edge.model.checkpoint import make_checkpoint

CFG = {"backbone": "vit", "backbone_kwargs": {"embed_dim": 16, "depth": 3, "heads": 2, "img_size": 8, "patch": 4}}


@pytest.fixture
def ckpt_path(tmp_path):
    torch.manual_seed(0)
    m = build_model(CFG)
    calib = {"alphas": [0.01, 0.05], "qhat": [[0.9, 0.5], [0.8, 0.4], [0.7, 0.3]], "split_size": 10}
    p = tmp_path / "model.pt"
    save_checkpoint(p, m, pos_weights=[2.0, 3.0], calibration=calib, class_names=["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"],
                    preprocessing={"input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25]}, training={"lambda": 0.7})
    return p, m


def test_round_trip(ckpt_path):
    p, m = ckpt_path
    m2, ck = load_checkpoint(p)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(m2(x)[0], m.eval()(x)[0])
    assert ck["format_version"] == FORMAT_VERSION
    assert ck["exits"]["pos_weights"] == [2.0, 3.0]
    assert ck["calibration"]["qhat"][2] == [0.7, 0.3]
    assert ck["costs"]["cost"][-1] == 1.0
    assert ck["preprocessing"]["std"] == [0.25]
    assert ck["config"]["backbone"] == "vit"
    # loadable by plain torch with weights_only (no jei_edge classes inside)
    torch.load(p, weights_only=True)


def test_no_partial_file_left(tmp_path):
    p = tmp_path / "model.pt"

    class Boom(Exception):
        pass

    def bad_write(f):
        f.write(b"half")
        raise Boom()

    from jei_edge.model.checkpoint import atomic_write_bytes

    with pytest.raises(Boom):
        atomic_write_bytes(p, bad_write)
    assert list(tmp_path.iterdir()) == []


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/jei_edge_pwned_marker"


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle", "in_dict"])
def test_malicious_pickle_never_executes(tmp_path, how):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    p = tmp_path / "evil.pt"
    if how == "torch_save":
        torch.save(Evil(), p)
    elif how == "raw_pickle":
        p.write_bytes(pickle.dumps(Evil()))
    else:
        torch.save({"format": "jei-edge/model", "format_version": 1, "config": Evil()}, p)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        read_checkpoint(p)
    assert not os.path.exists(MARKER)


def test_truncated_empty_and_foreign_files(tmp_path, ckpt_path):
    good, _ = ckpt_path
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello, not a model\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.txt", "zip but not torch")
    (tmp_path / "zip.pt").write_bytes(buf.getvalue())
    for name, msg in [("trunc.pt", "cannot be loaded safely"), ("empty.pt", "is empty"),
                      ("text.pt", "cannot be loaded safely"), ("zip.pt", "cannot be loaded safely"),
                      ("missing.pt", "does not exist")]:
        with pytest.raises(CheckpointError, match=msg):
            read_checkpoint(tmp_path / name)


def test_other_torch_files_and_versions(tmp_path, ckpt_path):
    good, m = ckpt_path
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="not a jei-edge model checkpoint"):
        read_checkpoint(tmp_path / "sd.pt")
    ck = make_checkpoint(m)
    ck["format_version"] = FORMAT_VERSION + 1
    torch.save(ck, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="newer than this jei-edge supports"):
        read_checkpoint(tmp_path / "future.pt")
    ck = make_checkpoint(m)
    del ck["costs"]
    torch.save(ck, tmp_path / "nocost.pt")
    with pytest.raises(CheckpointError, match="lacks"):
        read_checkpoint(tmp_path / "nocost.pt")


def test_unknown_backbone_and_mismatched_weights(tmp_path, ckpt_path):
    _, m = ckpt_path
    ck = make_checkpoint(m)
    ck["config"] = dict(ck["config"], backbone="alexnet9000")
    torch.save(ck, tmp_path / "unk.pt")
    with pytest.raises(CheckpointError, match="unknown backbone 'alexnet9000'"):
        load_checkpoint(tmp_path / "unk.pt")
    ck = make_checkpoint(m)
    ck["config"] = dict(ck["config"], backbone_kwargs=dict(ck["config"]["backbone_kwargs"], embed_dim=32))
    torch.save(ck, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "mismatch.pt")
