"""Bad input to train / build / eval gets one clear line, exit code != 0, no traceback and nothing
written: unwritable output paths (checked before any work), checkpoints whose fields have the
wrong types or shapes, recipe and target files with wrong value types, out-of-range training
settings; and no message passes on a library's advice to load unsafely or is cut mid-word.

The CLI cases run as subprocesses (``python -m jei_edge.cli``), all at once in a module fixture
(the torch import dominates each one); the rest are checked in-process.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from jei_edge.errors import BuildError, CheckpointError, InputError, JeiEdgeError

REPO = Path(__file__).resolve().parents[1]
SYNTH = "synthetic:size=8,n=300,classes=5"
ADVICE = ("weights_only", "safe_globals", "allowlist", "allow_pickle", "trust")
MARKER = "/tmp/jei_edge_hardening_build_marker"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


# -- hostile inputs -------------------------------------------------------------------------------
def _mutations():
    """name -> (mutate(ckpt dict), what the error must name)."""

    def put(*path_and_value):
        *path, value = path_and_value

        def mutate(c):
            obj = c
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = value(obj[path[-1]]) if callable(value) else value
        return mutate

    def drop(*path):
        def mutate(c):
            obj = c
            for k in path[:-1]:
                obj = obj[k]
            del obj[path[-1]]
        return mutate

    return {
        "preprocessing_str": (put("preprocessing", "rgb"), "'preprocessing'"),
        "costs_list": (put("costs", [1, 2, 3]), "'costs'"),
        "positions_str": (put("exits", "positions", ["a", "b", "c"]), "'exits.positions[0]'"),
        "config_no_backbone": (drop("config", "backbone"), "'config.backbone'"),
        "config_str": (put("config", "vit"), "'config'"),
        "kwargs_list": (put("config", "backbone_kwargs", [1]), "'config.backbone_kwargs'"),
        "pos_weights_short": (put("exits", "pos_weights", [1.0]), "'exits.pos_weights'"),
        "pos_weights_nan": (put("exits", "pos_weights", [float("nan")] * 3), "'exits.pos_weights[0]'"),
        "cost_short": (put("costs", "cost", [0.5]), "'costs.cost'"),
        "cost_str": (put("costs", "cost", lambda v: ["x"] * len(v)), "'costs.cost[0]'"),
        "full_macs_float": (put("costs", "full_macs", 1.5), "'costs.full_macs'"),
        "qhat_row": (put("calibration", "qhat", lambda v: [r[:1] for r in v]), "'calibration.qhat[0]'"),
        "alphas_str": (put("calibration", "alphas", "0.1"), "'calibration.alphas'"),
        "calibration_none": (put("calibration", None), "'calibration'"),
        "class_names_str": (put("class_names", "abc"), "'class_names'"),
        "class_names_ints": (put("class_names", [0, 1, 2, 3, 4]), "'class_names[0]'"),
        "class_names_count": (put("class_names", ["a", "b"]), "'class_names'"),
        "input_shape_2d": (put("preprocessing", "input_shape", [8, 8]), "'preprocessing.input_shape'"),
        "input_shape_wrong": (put("preprocessing", "input_shape", [1, 16, 16]), "'preprocessing.input_shape'"),
        "std_zero": (put("preprocessing", "std", [0.0]), "'preprocessing.std[0]'"),
        "mean_str": (put("preprocessing", "mean", "0.5"), "'preprocessing.mean'"),
        "positions_unsorted": (put("exits", "positions", [2, 1, 0]), "'exits.positions'"),
        "positions_vs_config": (put("config", "exits", [0, 1]), "'exits.positions'"),
        "training_str": (put("training", "x"), "'training'"),
        "split_seed_str": (put("training", {"data": {"source": SYNTH, "split_seed": "zero"}}),
                           "'training.data.split_seed'"),
        "state_dict_value": (put("state_dict", "stem.proj.bias", [0.0] * 16), "state_dict['stem.proj.bias']"),
        "state_dict_empty": (put("state_dict", {}), "'state_dict'"),
        "tensor_shape": (put("state_dict", "stem.proj.bias", torch.zeros(17)), "tensor 'stem.proj.bias'"),
        "tensor_missing": (drop("state_dict", "blocks.0.norm1.weight"), "tensor 'blocks.0.norm1.weight'"),
        "tensor_extra": (put("state_dict", "bogus.weight", torch.zeros(3)), "tensor 'bogus.weight'"),
        "tensor_int": (put("state_dict", "stem.proj.bias", torch.zeros(16, dtype=torch.int64)),
                       "tensor 'stem.proj.bias'"),
        "tensor_nan": (put("state_dict", "stem.proj.bias", torch.full((16,), float("nan"))), "tensor 'stem.proj.bias'"),
    }


MUTATIONS = _mutations()


@pytest.fixture(scope="module")
def valid_ckpt():
    from tests.runtime.helpers import spread_checkpoint

    ck = spread_checkpoint("vit")
    ck["training"] = {"data": {"source": SYNTH, "split_seed": 0}}
    ck["class_names"] = [str(i) for i in range(5)]  # the classes of SYNTH, so eval reaches the checks
    return ck


def _hostile(valid_ckpt, name):
    ck = {k: copy.deepcopy(v) for k, v in valid_ckpt.items() if k != "state_dict"}
    ck["state_dict"] = dict(valid_ckpt["state_dict"])
    MUTATIONS[name][0](ck)
    return ck


# -- the CLI cases, run together ---------------------------------------------------------------------
def _cases(inp: Path):
    """id -> (args, [texts the error must contain], folder that must stay empty or None)."""
    ck = str(inp / "valid.pt")
    fast = ["--data", SYNTH, "--epochs", "1", "--min-steps", "1", "--backbone-epochs", "1", "--im-epochs", "1",
            "--threads", "1", "--no-progress"]
    cases = {
        # 1. output paths, checked before any work (train: with settings that would train for minutes)
        "build_parent_is_file": (["build", ck, "-o", str(inp / "afile" / "b.jei")], ["afile'", "not a folder"], None),
        "build_under_proc": (["build", ck, "-o", "/proc/jei-edge-test.jei"], ["/proc"], None),
        "train_parent_is_file": (["train", "--data", "digits", "--no-progress", "-o", str(inp / "afile" / "m.pt")],
                                 ["afile'", "not a folder"], None),
        "train_under_proc": (["train", "--data", "digits", "--no-progress", "-o", "/proc/jei-edge-test.pt"],
                             ["/proc"], None),
        # 2 + 5. checkpoint fields and tensors, through every command that reads a checkpoint
        "build_preprocessing_str": (["build", str(inp / "preprocessing_str.pt")], ["'preprocessing'"], "OUT"),
        "eval_costs_list": (["eval", str(inp / "costs_list.pt")], ["'costs'"], None),
        "eval_positions_str": (["eval", str(inp / "positions_str.pt")], ["'exits.positions[0]'"], None),
        "build_config_no_backbone": (["build", str(inp / "config_no_backbone.pt")], ["'config.backbone'"], "OUT"),
        "build_tensor_shape": (["build", str(inp / "tensor_shape.pt")], ["tensor 'stem.proj.bias'", "[17]"], "OUT"),
        "eval_tensor_missing": (["eval", str(inp / "tensor_missing.pt")], ["tensor 'blocks.0.norm1.weight'"], None),
        "build_pickled_code": (["build", str(inp / "evil.pt")], ["cannot be loaded safely", "evil.pt"], "OUT"),
        "eval_numpy_global": (["eval", str(inp / "numpy.pt")], ["cannot be loaded safely", "_reconstruct'"], None),
        # 3. recipes and targets
        "recipe_samples_str": (["build", ck, "--precision", "int8", "--calibration", str(inp / "r_samples.toml")],
                               ["r_samples.toml", "samples"], "OUT"),
        "recipe_exclude_str": (["build", ck, "--precision", "int8", "--calibration", str(inp / "r_exclude.toml")],
                               ["r_exclude.toml", "exclude"], "OUT"),
        "recipe_missing": (["build", ck, "--precision", "int8", "--calibration", str(inp / "nope.toml")],
                           ["nope.toml", "not found"], "OUT"),
        "target_missing": (["build", ck, "--target", str(inp / "board.toml")], ["board.toml", "not found"], "OUT"),
        "target_backend_list": (["build", ck, "--target", str(inp / "t_backend.toml")],
                                ["t_backend.toml", "'backend'"], "OUT"),
        # 4. training settings out of range
        "train_img_size_0": (["train", *fast, "--img-size", "0"], ["--img-size", "4..512"], "TRAIN"),
        "train_img_size_4000": (["train", *fast, "--img-size", "4000"], ["--img-size", "4..512"], "TRAIN"),
        "train_batch_size_huge": (["train", *fast, "--batch-size", str(10**9)], ["--batch-size", "4,096"], "TRAIN"),
        "train_threads_huge": (["train", *fast, "--threads", str(10**9)], ["--threads"], "TRAIN"),
        "train_model_huge": (["train", *fast, "--backbone-opt", "embed_dim=100000"], ["parameters"], "TRAIN"),
    }
    if not IS_ROOT:  # root writes anywhere: an unwritable folder exists only for other users
        cases["train_unwritable_folder"] = (["train", "--data", "digits", "-o", str(inp / "ro" / "m.pt")],
                                            ["'", "not writable"], None)
        cases["build_unwritable_folder"] = (["build", ck, "-o", str(inp / "ro" / "b.jei")], ["not writable"], None)
    return cases


def _run(args, cwd, timeout=120):
    t = time.perf_counter()
    env = dict(os.environ)
    env.pop("JEI_EDGE_PLUGINS", None)
    p = subprocess.run([sys.executable, "-m", "jei_edge.cli", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t


@pytest.fixture(scope="module")
def cli(tmp_path_factory, valid_ckpt):
    inp = tmp_path_factory.mktemp("inputs")
    torch.save(valid_ckpt, inp / "valid.pt")
    for name in ("preprocessing_str", "costs_list", "positions_str", "config_no_backbone", "tensor_shape",
                 "tensor_missing"):
        torch.save(_hostile(valid_ckpt, name), inp / f"{name}.pt")
    torch.save({"format": "jei-edge/model", "format_version": 1, "config": Evil()}, inp / "evil.pt")
    import numpy as np

    torch.save({"format": "jei-edge/model", "format_version": 1, "config": np.zeros(3)}, inp / "numpy.pt")
    (inp / "afile").write_text("a file\n")
    (inp / "ro").mkdir()
    os.chmod(inp / "ro", 0o555)
    (inp / "r_samples.toml").write_text('samples = "many"\n')
    (inp / "r_exclude.toml").write_text('exclude = "gate"\n')
    (inp / "t_backend.toml").write_text('backend = ["onnxruntime"]\n')
    if os.path.exists(MARKER):
        os.unlink(MARKER)

    cases = _cases(inp)
    jobs = {}
    for cid, (args, _, out) in cases.items():
        work = tmp_path_factory.mktemp(cid)
        args = list(args)
        if out == "OUT":
            args += ["-o", str(work / "out.jei")]
        elif out == "TRAIN":
            args += ["-o", str(work / "model.pt")]
        jobs[cid] = (args, work)
    jobs["train_help"] = (["train", "--help"], tmp_path_factory.mktemp("help"))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {cid: pool.submit(_run, args, REPO) for cid, (args, _) in jobs.items()}
        results = {cid: f.result() for cid, f in futures.items()}
    os.chmod(inp / "ro", 0o755)
    return {"cases": cases, "results": results, "work": {cid: w for cid, (_, w) in jobs.items()}, "inputs": inp}


CASE_IDS = list(_cases(Path("/x")).keys())


@pytest.mark.parametrize("cid", CASE_IDS)
def test_cli_refuses_with_one_clear_line(cli, cid):
    rc, out, err, seconds = cli["results"][cid]
    _, needles, _ = cli["cases"][cid]
    assert rc != 0, (out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not any(a in err.lower() for a in ADVICE), err
    assert list(cli["work"][cid].iterdir()) == [], "something was written"
    if cid.startswith("train_") and "--data" in cli["cases"][cid][0] and "digits" in cli["cases"][cid][0]:
        assert seconds < 60, f"the output was checked only after work ({seconds:.0f} s)"
    assert (cli["inputs"] / "afile").read_text() == "a file\n"
    assert not os.path.exists(MARKER), "pickled code ran"


def test_train_help_states_the_limits(cli):
    rc, out, err, _ = cli["results"]["train_help"]
    assert rc == 0, err
    text = " ".join(out.split())
    assert "4..512" in text and "1..4,096" in text and "0..10,000" in text and "1..1024" in text


def test_numpy_global_message_is_not_cut_mid_word(cli):
    err = cli["results"]["eval_numpy_global"][2]
    assert re.search(r"'numpy\.[\w.]*_reconstruct'", err), err


# -- output paths, in-process ------------------------------------------------------------------------
def test_check_writable_output(tmp_path, monkeypatch):
    from jei_edge._io import check_writable_output

    (tmp_path / "afile").write_text("x")
    with pytest.raises(JeiEdgeError, match="is a file, not a folder"):
        check_writable_output(tmp_path / "afile" / "deeper" / "m.pt", "checkpoint")
    with pytest.raises(JeiEdgeError, match="it is a folder"):
        check_writable_output(tmp_path, "checkpoint")
    with pytest.raises(JeiEdgeError, match="a file of that name exists"):
        check_writable_output(tmp_path / "afile", "bundle", directory=True)
    with pytest.raises(JeiEdgeError, match="/proc"):
        check_writable_output("/proc/x/m.pt", "checkpoint")
    assert check_writable_output(tmp_path / "new" / "sub" / "m.pt", "checkpoint") == tmp_path / "new" / "sub" / "m.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no folders created, no probe left

    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(JeiEdgeError, match="is not writable"):
        check_writable_output(tmp_path / "m.pt", "checkpoint")


def test_staging_dir_checks_before_creating(tmp_path):
    from jei_edge.compile.writer import StagingDir

    (tmp_path / "afile").write_text("x")
    with pytest.raises(BuildError, match="not a folder"):
        with StagingDir(tmp_path / "afile" / "sub" / "b.jei"):
            pass
    with pytest.raises(BuildError, match="/proc"):
        with StagingDir(Path("/proc/b.jei")):
            pass
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "x"


# -- checkpoint fields, in-process -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_checkpoint_field_is_named(tmp_path, valid_ckpt, name):
    from jei_edge.model.checkpoint import load_checkpoint

    p = tmp_path / f"{name}.pt"
    torch.save(_hostile(valid_ckpt, name), p)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    assert MUTATIONS[name][1] in e.value.message and str(p) in e.value.message, e.value.message
    assert "\n" not in e.value.message


def test_valid_checkpoint_still_loads(tmp_path, valid_ckpt):
    from jei_edge.model.checkpoint import load_checkpoint

    torch.save(valid_ckpt, tmp_path / "ok.pt")
    model, ck = load_checkpoint(tmp_path / "ok.pt")
    assert list(model.exits) == ck["exits"]["positions"]


def test_unsafe_load_advice_is_never_passed_on(tmp_path):
    from jei_edge.model.checkpoint import _load_reason, read_checkpoint

    torch.save(Evil(), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "evil.pt")
    text = f"{e.value.message} {e.value.hint}".lower()
    assert not any(a in text for a in ADVICE) and not os.path.exists(MARKER)
    torch_says = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
                  "succeed.\n\tWeightsUnpickler error: Unsupported global: GLOBAL evil.Thing was not an allowed "
                  "global by default. Please use `torch.serialization.add_safe_globals([evil.Thing])` to allowlist "
                  "this global if you trust this class/function.")
    reason = _load_reason(RuntimeError(torch_says))
    assert "'evil.Thing'" in reason and not any(a in reason.lower() for a in ADVICE)
    other = _load_reason(RuntimeError("PytorchStreamReader failed reading zip archive. You can use "
                                      "weights_only=False if you trust the file."))
    assert "PytorchStreamReader" in other and "weights_only" not in other


def test_shorten_cuts_at_a_word_boundary():
    from jei_edge._io import shorten

    text = "alpha beta gamma delta epsilon " * 20
    for limit in (10, 25, 61, 200):
        out = shorten(text, limit)
        assert len(out) <= limit and out.endswith("...")
        assert all(w in ("alpha", "beta", "gamma", "delta", "epsilon") for w in out[:-3].split()), out
    assert shorten("short text", 50) == "short text"
    assert shorten("line one\n  line two", 50) == "line one line two"
    path = "/a/very/long/path/without/spaces/at/all"
    for limit in (9, 12, 20, 30):
        out = shorten(path, limit)
        kept = out[:-3]
        assert len(out) <= limit and path.startswith(kept) and (kept[-1] == "/" or path[len(kept)] == "/"), out


# -- recipes and targets, in-process -------------------------------------------------------------------
@pytest.mark.parametrize("body, key", [
    ('samples = "many"\n', "samples"), ("samples = 1.5\n", "samples"), ("samples = 0\n", "samples"),
    ("samples = 100000000000\n", "samples"), ("method = 3\n", "method"), ('method = "magic"\n', "method"),
    ('exclude = "gate"\n', "exclude"), ('exclude = ["gate", "head"]\n', "exclude"), ("exclude = [1]\n", "exclude"),
    ('percentile = "high"\n', "percentile"), ("percentile = 150\n", "percentile"), ("percentile = nan\n", "percentile"),
    ('activations = 8\n', "activations"), ("ops = []\n", "ops"), ('ops = "Conv"\n', "ops"), ("name = 3\n", "name"),
    ("data = 3\n", "data"), ("colour = 1\n", "colour"), ("[extra]\nx = 1\n", "extra"),
    ("samples = \n", "cannot be read"),
])
def test_recipe_value_types(tmp_path, body, key):
    from jei_edge.compile.quantize import load_recipe

    p = tmp_path / "r.toml"
    p.write_text(body)
    with pytest.raises(InputError) as e:
        load_recipe(str(p))
    assert key in e.value.message and str(p) in e.value.message, e.value.message


def test_recipe_and_target_files_not_found(tmp_path):
    from jei_edge.compile.quantize import load_recipe
    from jei_edge.runtime.targets import load_target

    with pytest.raises(InputError, match="not found") as e:
        load_recipe(str(tmp_path / "gone.toml"))
    assert "gone.toml" in e.value.message
    with pytest.raises(JeiEdgeError, match="not found") as e:
        load_target(str(tmp_path / "gone.toml"))
    assert "gone.toml" in e.value.message and "unknown target" not in e.value.message
    with pytest.raises(JeiEdgeError, match="is not a file"):
        load_target(str(tmp_path) + "/")


@pytest.mark.parametrize("body, key", [
    ('backend = ["onnxruntime"]\n', "backend"), ("backend = {a = 1}\n", "backend"), ("backend = 3\n", "backend"),
    ('backend = "onnxruntime"\nname = 3\n', "name"), ('backend = "onnxruntime"\nprecisions = "fp32"\n', "precisions"),
    ('backend = "onnxruntime"\nprecisions = [1]\n', "precisions"), ('backend = "onnxruntime"\nbatch = 4\n', "batch"),
    ('backend = "onnxruntime"\n[batch]\nmax = "big"\n', "batch.max"),
    ('backend = "onnxruntime"\n[memory]\nshared = "yes"\n', "memory.shared"),
    ('backend = "onnxruntime"\n[toolchain]\ncuda = 12\n', "toolchain.cuda"),
    ('backend = "tensorrt"\ncompute_capability = 8.7\n', "compute_capability"),
    ('backend = "onnxruntime"\ndefault_precision = ["fp32"]\n', "default_precision"),
    ('backend = "onnxruntime"\nonnxruntime = 5\n', "onnxruntime"),
    ('backend = "onnxruntime"\nspeed = 5\n', "speed"),
])
def test_target_value_types(tmp_path, body, key):
    from jei_edge.runtime.targets import load_target

    p = tmp_path / "board.toml"
    p.write_text(body)
    with pytest.raises(JeiEdgeError) as e:
        load_target(str(p))
    assert f"'{key}'" in e.value.message and str(p) in e.value.message, e.value.message


# -- training settings, in-process ---------------------------------------------------------------------
@pytest.mark.parametrize("kw, flag", [
    ({"batch_size": 10**9}, "--batch-size"), ({"batch_size": 0}, "--batch-size"), ({"threads": 10**9}, "--threads"),
    ({"epochs": 10**9}, "--epochs"), ({"min_steps": 10**12}, "--min-steps"), ({"epochs": "3"}, "--epochs"),
    ({"seed": -1}, "--seed"), ({"im_epochs": 1.5}, "--im-epochs"), ({"lam": float("inf")}, "--lambda"),
    ({"lr": float("nan")}, "lr"),
])
def test_train_config_bounds(kw, flag):
    from jei_edge.train import TrainConfig

    with pytest.raises(JeiEdgeError) as e:
        TrainConfig(**kw).validate()
    assert flag in e.value.message


def test_img_size_bounds():
    from jei_edge.train.config import MAX_IMG_SIZE, MIN_IMG_SIZE, check_img_size

    for bad in (0, -8, MAX_IMG_SIZE + 1, 4000, "abc", 16.5, True):
        with pytest.raises(JeiEdgeError, match="--img-size"):
            check_img_size(bad)
    assert check_img_size(MIN_IMG_SIZE) == MIN_IMG_SIZE and check_img_size(16) == 16
