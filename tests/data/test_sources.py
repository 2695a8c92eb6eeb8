import subprocess
import sys

import numpy as np
import pytest

from jei_edge.data import load_data, split_indices
from jei_edge.data.sources import default_input_shape, load_raw
from jei_edge.errors import InputError


def _all_x(d):
    return [d.train, d.val, d.calib, d.test]


def test_digits_shapes_normalisation_and_disjoint_splits():
    d = load_data("digits", seed=0)
    assert d.input_shape == (1, 16, 16) and d.num_classes == 10
    sizes = [len(s) for s in _all_x(d)]
    assert sum(sizes) == 1797 and min(sizes) > 200
    assert all(s.x.dtype == np.float32 and s.y.dtype == np.int64 for s in _all_x(d))
    assert abs(float(d.train.x.mean())) < 1e-4 and abs(float(d.train.x.std()) - 1.0) < 1e-3
    # raw inputs are recovered from the preprocessing (mean/std) and lie in [0, 1]
    raw = d.test.x * d.preprocessing["std"][0] + d.preprocessing["mean"][0]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    np.testing.assert_allclose(raw, d.raw_test, atol=1e-5)


def test_split_indices_deterministic_stratified_and_partitioning():
    y = np.repeat(np.arange(5), 40)
    a = split_indices(y, seed=3)
    b = split_indices(y, seed=3)
    c = split_indices(y, seed=4)
    assert all(np.array_equal(i, j) for i, j in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    joined = np.sort(np.concatenate(a))
    assert np.array_equal(joined, np.arange(len(y)))  # a partition: disjoint and complete
    for idx in a:  # every class in every split, in about the same proportion
        counts = np.bincount(y[idx], minlength=5)
        assert counts.min() > 0 and counts.max() - counts.min() <= 1


def test_same_seed_same_data_and_external_preprocessing():
    a = load_data("synthetic:n=200,size=8", seed=1)
    b = load_data("synthetic:n=200,size=8", seed=1)
    np.testing.assert_array_equal(a.test.x, b.test.x)
    prep = {"input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25]}
    c = load_data("synthetic:n=200,size=8", seed=1, preprocessing=prep)
    np.testing.assert_allclose(c.test.x, (a.raw_test - 0.5) / 0.25, atol=1e-5)
    assert c.preprocessing == prep


def test_resize_on_request():
    d = load_data("digits", input_shape=(3, 12, 12))
    assert d.train.x.shape[1:] == (3, 12, 12)
    assert np.allclose(d.train.x[:, 0], d.train.x[:, 1])  # gray repeated to RGB


def test_npz_channels_last_uint8(npz_file):
    raw = load_raw(str(npz_file))
    assert raw.x.shape == (60, 3, 6, 6) and raw.class_names == ["a", "b", "c"]
    assert 0.0 <= raw.x.min() and raw.x.max() <= 1.0
    d = load_data(str(npz_file), input_shape=(1, 4, 4))
    assert d.train.x.shape[1:] == (1, 4, 4)
    assert default_input_shape(str(npz_file)) == (3, 6, 6)


def test_npz_labels_remapped_without_class_names(tmp_path):
    path = tmp_path / "l.npz"
    np.savez(path, x=np.zeros((8, 4, 4), np.float32), y=np.array([7, 3, 7, 3, 9, 9, 3, 7]))
    raw = load_raw(str(path))
    assert raw.class_names == ["3", "7", "9"]
    assert raw.y.tolist() == [1, 0, 1, 0, 2, 2, 0, 1]


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((4, 4, 4))}, "lacks"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(3, int)}, "4 samples but y has 3"),
    ({"x": np.full((4, 4, 4), 2.0), "y": np.arange(4) % 2}, r"\[0, 1\]"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4)}, "integer"),
    ({"x": np.zeros((4, 4, 4)), "y": np.zeros(4, int)}, "at least 2"),
    ({"x": np.zeros((4, 5, 5, 5)), "y": np.arange(4) % 2}, "channels"),
])
def test_bad_npz_is_a_clear_error(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=match):
        load_raw(str(path))


def test_image_folder(image_folder):
    raw = load_raw(str(image_folder))
    assert raw.class_names == ["cat", "dog", "eel"]
    assert raw.x.shape == (36, 1, 32, 32)  # grayscale detected, default size 32
    means = [raw.x[raw.y == k].mean() for k in range(3)]
    assert means[0] < means[1] < means[2]  # content survived loading
    rgb = load_raw(str(image_folder), input_shape=(3, 10, 10))
    assert rgb.x.shape == (36, 3, 10, 10)


def test_image_folder_errors(tmp_path, image_folder):
    (image_folder / "empty").mkdir()
    with pytest.raises(InputError, match="holds no image files"):
        load_raw(str(image_folder))
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    with pytest.raises(InputError, match="at least 2"):
        load_raw(str(one))


def test_unreadable_image_names_the_file(image_folder):
    (image_folder / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        load_raw(str(image_folder))


@pytest.mark.parametrize("source, match", [
    ("nonexistent.npz", "does not exist"),
    ("no/such/folder", "unknown data source"),
    ("", "no data source"),
    ("synthetic:bogus=1", "bad synthetic option"),
    ("synthetic:n=abc", "not a number"),
    ("synthetic:n=5", "must be >="),
])
def test_bad_sources(source, match):
    with pytest.raises(InputError, match=match):
        load_data(source)


def test_file_that_is_not_npz(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("1,2\n")
    with pytest.raises(InputError, match="not a .npz"):
        load_data(str(p))


def test_too_few_samples_for_four_splits(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, x=np.zeros((4, 4, 4), np.float32), y=np.array([0, 1, 0, 1]))
    with pytest.raises(InputError, match="too few"):
        load_data(str(path))


def test_data_package_is_torch_free():
    code = ("import sys; import jei_edge.data, jei_edge.data.transforms; from jei_edge.data import load_data; "
            "load_data('synthetic:n=100,size=8'); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
