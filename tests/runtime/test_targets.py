import pytest

from jei_edge.errors import JeiEdgeError
from jei_edge.backends.onnxruntime import OrtSettings
from jei_edge.runtime.targets import available_targets, load_target


def test_cpu_target():
    t = load_target("cpu")
    assert "cpu" in available_targets()
    assert t.backend == "onnxruntime" and t.default_precision == "fp32" and t.opset >= 17 and t.max_batch >= 64
    s = OrtSettings.from_options(t.backend_options)
    assert s.allow_spinning is False and s.io_binding is True


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
