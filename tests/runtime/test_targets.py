import json
import textwrap

import pytest
from click.testing import CliRunner

from jei_edge.backends.onnxruntime import OrtSettings
from jei_edge.cli.targets_cmd import targets as targets_command
from jei_edge.errors import JeiEdgeError
from jei_edge.runtime.targets import BUILT_HERE, BUILT_ON_BOARD, available_targets, load_target, load_targets


def test_cpu_target():
    t = load_target("cpu")
    assert "cpu" in available_targets()
    assert t.backend == "onnxruntime" and t.default_precision == "fp32" and t.opset >= 17 and t.max_batch >= 64
    s = OrtSettings.from_options(t.backend_options)
    assert s.allow_spinning is True and s.spin_after_run is False and s.io_binding is True


def test_target_files_and_errors(tmp_path):
    p = tmp_path / "board.toml"
    p.write_text('name = "board"\nbackend = "onnxruntime"\n[onnxruntime]\nintra_op_threads = 2\n[batch]\nmax = 8\n')
    t = load_target(str(p))
    assert t.name == "board" and t.max_batch == 8 and OrtSettings.from_options(t.backend_options).intra_op_threads == 2
    with pytest.raises(JeiEdgeError, match="unknown target 'mars'"):
        load_target("mars")
    bad = tmp_path / "bad.toml"
    bad.write_text("backend = [")
    with pytest.raises(JeiEdgeError, match="cannot be read"):
        load_target(str(bad))
    nob = tmp_path / "nob.toml"
    nob.write_text('name = "x"\n')
    with pytest.raises(JeiEdgeError, match="malformed"):
        load_target(str(nob))


def test_settings_validation():
    assert OrtSettings.from_options({"intra_op_threads": 1}).intra_op_threads == 1
    for bad in ({"intra_op_threads": -1}, {"intra_op_threads": True}, {"graph_optimization": "max"},
                {"allow_spinning": 1}, {"nope": 1}):
        with pytest.raises(JeiEdgeError):
            OrtSettings.from_options(bad)


def test_spinning_settings_reach_the_session_options():
    from jei_edge.backends.onnxruntime.executor import session_options
    from tests.runtime.helpers import spinning_entries

    def entries(**opts):
        return spinning_entries(session_options(OrtSettings.from_options(opts)))

    assert entries(allow_spinning=False) == ("0", "0")
    assert entries(allow_spinning=True) == ("1", "1")  # spin inside a run, stop when it returns
    assert entries(allow_spinning=True, spin_after_run=True) == ("1", "0")  # onnxruntime's own behaviour


# -- the catalog ------------------------------------------------------------------------------------
def test_every_shipped_target_loads_and_round_trips():
    catalog = load_targets()
    assert [t.name for t in catalog] == available_targets()  # a file's name is its target's name
    for t in catalog:
        info = t.to_manifest()
        assert (info.name, info.backend, info.device, info.max_batch, info.compute_capability) == \
            (t.name, t.backend, t.device, t.max_batch, t.compute_capability)
        assert info.backend_options == t.backend_options
        assert json.loads(json.dumps(info.to_dict()))["compute_capability"] == t.compute_capability
        assert t.default_precision in t.precisions and t.min_batch <= t.opt_batch <= t.max_batch
        assert t.description and (t.device == "cpu") == (t.compute_capability is None)
        assert t.toolchain, t.name
        if t.backend != "onnxruntime":
            assert t.workspace_mib and t.memory_mib and t.notes, t.name
        json.dumps(t.to_dict())


def test_catalog_families():
    by_name = {t.name: t for t in load_targets()}
    assert by_name["cpu"].backend == "onnxruntime" and by_name["cpu"].build_location == BUILT_HERE
    rtx = {t.compute_capability for t in by_name.values() if t.backend == "tensorrt_rtx"}
    assert {"7.5", "8.9", "12.0", "12.1"} <= rtx and rtx & {"8.0", "8.6"}
    jetson = [t for t in by_name.values() if t.backend == "tensorrt"]
    assert {t.compute_capability for t in jetson} == {"8.7", "11.0"}
    assert all(t.build_location == BUILT_ON_BOARD and t.shared_memory for t in jetson)
    assert all(not t.builds_here for t in jetson) and all(t.builds_here for t in by_name.values() if t not in jetson)
    for board in ("orin-nano", "orin-nx", "agx-orin"):
        jp6, jp7 = by_name[f"{board}-jp6"], by_name[f"{board}-jp7"]
        assert jp6.toolchain["tensorrt"] == ("10.3",) and jp6.toolchain["python"] == ("3.10",)
        assert jp7.toolchain["tensorrt"] == ("10.16",) and jp7.toolchain["jetpack"] == ("7.2",)
    assert by_name["thor-jp7"].compute_capability == "11.0" and by_name["thor-jp7"].dla == 0
    assert by_name["orin-nano-jp6"].dla == 0 and by_name["orin-nx-jp6"].dla > 0 and by_name["agx-orin-jp6"].dla > 0
    assert by_name["rtx-turing"].default_precision == "fp16" and "int8" not in by_name["rtx-turing"].precisions
    assert all(t.backend_options.get("mapped_io") is True for t in jetson)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(JeiEdgeError) as e:
        load_target("rtx-adda")
    assert "unknown target 'rtx-adda'" in e.value.message and "did you mean 'rtx-ada'" in e.value.hint
    with pytest.raises(JeiEdgeError) as e:
        load_target("orin-nano")
    assert "orin-nano-jp6" in e.value.hint and "orin-nano-jp7" in e.value.hint
    with pytest.raises(JeiEdgeError, match="does not exist"):
        load_target("nowhere/board.toml")


_GOOD = """
    name = "board"
    backend = "tensorrt"
    compute_capability = "8.7"
    precisions = ["fp32", "fp16"]
    default_precision = "fp16"
    dla = 1
    [batch]
    min = 1
    opt = 4
    max = 16
    [memory]
    device_mib = 8192
    workspace_mib = 512
    shared = true
    [toolchain]
    tensorrt = "10.3"
    jetpack = ["6.1", "6.2"]
    [tensorrt]
    anything = "the backend's settings class validates this table"
"""


def _write(tmp_path, text, name="board.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_user_target_file(tmp_path):
    t = load_target(_write(tmp_path, _GOOD))
    assert (t.name, t.device, t.batch_profile, t.workspace_mib, t.dla) == ("board", "cuda", (1, 4, 16), 512, 1)
    assert t.toolchain == {"tensorrt": ("10.3",), "jetpack": ("6.1", "6.2")} and t.shared_memory
    assert t.to_manifest().compute_capability == "8.7" and t.backend_options == {"anything": t.backend_options["anything"]}


@pytest.mark.parametrize("old, new, key", [
    ('name = "board"', 'name = "board"\ncolour = "green"', "colour"),
    ("max = 16", "max = 16\nmaximum = 32", "batch.maximum"),
    ('tensorrt = "10.3"', 'tensorrt = "10.3"\ntensorrt_llm = "1.0"', "toolchain.tensorrt_llm"),
    ("[tensorrt]", "[onnxruntime]\nintra_op_threads = 1\n[tensorrt]", "onnxruntime"),
    ("max = 16", 'max = "16"', "batch.max"),
    ("max = 16", "max = true", "batch.max"),
    ("dla = 1", "dla = 1.5", "dla"),
    ('compute_capability = "8.7"', "compute_capability = 8.7", "compute_capability"),
    ('compute_capability = "8.7"', 'compute_capability = "sm87"', "compute_capability"),
    ('compute_capability = "8.7"', "", "compute_capability"),
    ('default_precision = "fp16"', 'default_precision = "int8"', "default_precision"),
    ('precisions = ["fp32", "fp16"]', 'precisions = ["fp32", "fp16", "fp8"]', "precisions"),
    ('precisions = ["fp32", "fp16"]', 'precisions = "fp16"', "precisions"),
    ("min = 1", "min = 32", "batch.min"),
    ("opt = 4", "opt = 64", "batch.opt"),
    ("workspace_mib = 512", "workspace_mib = 16384", "memory.workspace_mib"),
    ("shared = true", 'shared = "yes"', "memory.shared"),
    ('jetpack = ["6.1", "6.2"]', 'jetpack = ["6.1", 6.2]', "toolchain.jetpack"),
    ('backend = "tensorrt"', 'backend = "tensorrt"\ndevice = "cpu"', "device"),
    ('backend = "tensorrt"', 'backend = "torch-cuda"', "backend"),
    ('name = "board"', 'name = "my board"', "name"),
])
def test_user_target_file_refused_with_the_key_named(tmp_path, old, new, key):
    text = textwrap.dedent(_GOOD)
    assert old in text
    with pytest.raises(JeiEdgeError) as e:
        load_target(_write(tmp_path, text.replace(old, new, 1)))
    msg = e.value.message
    assert f"key '{key}'" in msg and "board.toml" in msg and "\n" not in str(e.value) and e.value.hint


def test_backend_specific_keys(tmp_path):
    with pytest.raises(JeiEdgeError, match="key 'dla'"):
        load_target(_write(tmp_path, 'backend = "onnxruntime"\ndla = 1\n'))
    with pytest.raises(JeiEdgeError, match="key 'compute_capability'"):
        load_target(_write(tmp_path, 'backend = "onnxruntime"\ncompute_capability = "8.7"\n'))
    with pytest.raises(JeiEdgeError, match="key 'compute_capability'.*TensorRT-RTX") as e:  # 8.7 is Jetson Orin
        load_target(_write(tmp_path, 'backend = "tensorrt_rtx"\ncompute_capability = "8.7"\n'))
    assert "tensorrt" in e.value.hint


def test_targets_cli_table_and_json(tmp_path):
    r = CliRunner().invoke(targets_command, [])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["name", "backend", "device"]
    names = available_targets()
    assert len(lines) == 1 + len(names) + 2 and len(lines) < 40  # one screen
    rows = {line.split()[0]: line for line in lines[1:1 + len(names)]}
    assert set(rows) == set(names)
    assert "fp32*" in rows["cpu"] and rows["cpu"].endswith("here")
    assert "cuda 8.9" in rows["rtx-ada"] and "fp16*" in rows["rtx-ada"] and "TRT-RTX 1.7" in rows["rtx-ada"]
    assert "cuda 8.7" in rows["agx-orin-jp6"] and "TRT 10.3" in rows["agx-orin-jp6"]
    assert rows["agx-orin-jp6"].endswith("on the board") and "1/8/256" in rows["agx-orin-jp6"]

    r = CliRunner().invoke(targets_command, ["--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert isinstance(data, list) and sorted(d["name"] for d in data) == names
    thor = next(d for d in data if d["name"] == "thor-jp7")
    assert thor["compute_capability"] == "11.0" and thor["build"] == BUILT_ON_BOARD and thor["dla"] == 0
    assert set(thor) >= {"precisions", "default_precision", "batch", "memory", "toolchain", "notes", "backend"}

    r = CliRunner().invoke(targets_command, ["orin-nx-jp6"])
    assert r.exit_code == 0 and "notes" in r.output and "JetPack 6.1/6.2" in r.output and "mapped_io = true" in r.output
    r = CliRunner().invoke(targets_command, [_write(tmp_path, _GOOD), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["name"] == "board"
    r = CliRunner().invoke(targets_command, ["rtx-adda"])
    assert r.exit_code != 0 and isinstance(r.exception, JeiEdgeError) and "rtx-ada" in r.exception.hint
