import numpy as np
import pytest

from jei_edge.data.sources import read_image as load_image  # the one image reader
from jei_edge.data.transforms import (compute_preprocessing, convert_channels, raw_to_model,
                                      resize_array, to_input_shape)
from jei_edge.errors import InputError


def test_raw_to_model_is_affine_per_channel():
    x = np.random.default_rng(0).random((5, 3, 4, 4)).astype(np.float32)
    prep = {"input_shape": [3, 4, 4], "mean": [0.1, 0.2, 0.3], "std": [0.5, 1.0, 2.0]}
    out = raw_to_model(x, prep)
    assert out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[:, c], (x[:, c] - prep["mean"][c]) / prep["std"][c], rtol=1e-6)


@pytest.mark.parametrize("prep", [
    {"input_shape": [1, 4, 4], "mean": [0.0], "std": [0.0]},
    {"input_shape": [1, 4, 4], "mean": [0.0, 1.0], "std": [1.0]},
    {"mean": [0.0], "std": [1.0]},
])
def test_bad_preprocessing(prep):
    with pytest.raises(InputError):
        raw_to_model(np.zeros((1, 1, 4, 4)), prep)


def test_raw_to_model_shape_mismatch_names_shapes():
    with pytest.raises(InputError, match=r"expected \[N, 1, 4, 4\]"):
        raw_to_model(np.zeros((2, 1, 5, 5)), {"input_shape": [1, 4, 4], "mean": [0.0], "std": [1.0]})


def test_compute_preprocessing():
    x = np.stack([np.full((2, 2), 0.2), np.full((2, 2), 0.6)])[:, None]  # two samples, one channel
    p = compute_preprocessing(x)
    assert p["input_shape"] == [1, 2, 2]
    assert p["mean"] == pytest.approx([0.4]) and p["std"] == pytest.approx([0.2])


def test_resize_preserves_constants_and_means():
    x = np.full((2, 1, 8, 8), 0.7, np.float32)
    np.testing.assert_allclose(resize_array(x, (16, 16)), 0.7, rtol=1e-6)
    np.testing.assert_allclose(resize_array(x, (3, 5)), 0.7, rtol=1e-6)
    y = np.random.default_rng(0).random((1, 1, 8, 8))
    # shrinking by an integer factor averages blocks (the filter is antialiased)
    down = resize_array(y, (4, 4))
    assert abs(down.mean() - y.mean()) < 0.02
    up = resize_array(y, (16, 16))
    assert up.shape == (1, 1, 16, 16) and abs(up.mean() - y.mean()) < 0.02


def test_channel_conversion():
    rgb = np.zeros((1, 3, 2, 2), np.float32)
    rgb[:, 1] = 1.0
    gray = convert_channels(rgb, 1)
    np.testing.assert_allclose(gray, 0.587, rtol=1e-5)
    assert convert_channels(gray, 3).shape == (1, 3, 2, 2)
    with pytest.raises(InputError):
        convert_channels(np.zeros((1, 2, 2, 2)), 3)
    out = to_input_shape(rgb, (1, 4, 4))
    assert out.shape == (1, 1, 4, 4) and out.min() >= 0 and out.max() <= 1


def test_load_image_rgb_and_gray(tmp_path):
    from PIL import Image

    arr = np.zeros((6, 8, 3), np.uint8)
    arr[..., 0] = 255
    Image.fromarray(arr).save(tmp_path / "red.png")
    rgb = load_image(tmp_path / "red.png", (3, 6, 8))
    assert rgb.shape == (3, 6, 8)
    np.testing.assert_allclose(rgb[0], 1.0)
    np.testing.assert_allclose(rgb[1:], 0.0)
    gray = load_image(tmp_path / "red.png", (1, 3, 4))
    assert gray.shape == (1, 3, 4) and 0.25 < gray.mean() < 0.35  # PIL's L = 0.299 R
