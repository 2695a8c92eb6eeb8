import numpy as np
import pytest

from jei_edge.data.synthetic import SyntheticSpec, make_synthetic, parse_synthetic
from jei_edge.errors import InputError


def test_parse_options():
    s = parse_synthetic("n=300, classes=3,hard=0.2,channels=3")
    assert (s.n, s.classes, s.hard, s.channels) == (300, 3, 0.2, 3)
    assert parse_synthetic("") == SyntheticSpec()
    with pytest.raises(InputError, match="keys"):
        parse_synthetic("size")
    with pytest.raises(InputError, match="hard"):
        parse_synthetic("hard=1.5")


def test_deterministic_and_balanced():
    spec = SyntheticSpec(n=400, size=8, seed=3)
    x1, y1, d1 = make_synthetic(spec)
    x2, y2, d2 = make_synthetic(spec)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.shape == (400, 1, 8, 8) and x1.min() >= 0 and x1.max() <= 1
    assert np.bincount(y1).tolist() == [40] * 10
    x3, _, _ = make_synthetic(SyntheticSpec(n=400, size=8, seed=4))
    assert not np.array_equal(x1, x3)


def test_difficulty_controls_how_hard_samples_are():
    """A nearest-class-mean classifier is right far more often on low-difficulty samples."""
    x, y, d = make_synthetic(SyntheticSpec(n=3000, seed=0))
    flat = x.reshape(len(x), -1)
    means = np.stack([flat[y == k].mean(0) for k in range(10)])
    pred = np.argmin(((flat[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    easy, hard = pred[d < 0.2] == y[d < 0.2], pred[d > 0.8] == y[d > 0.8]
    assert easy.mean() > 0.85
    assert hard.mean() < easy.mean() - 0.15
    # and the knob works globally: hard=0, noise=0 is trivially separable
    x0, y0, _ = make_synthetic(SyntheticSpec(n=300, shift=0, hard=0.0, noise=0.0, seed=0))
    f0 = x0.reshape(len(x0), -1)
    m0 = np.stack([f0[y0 == k].mean(0) for k in range(10)])
    assert (np.argmin(((f0[:, None] - m0[None]) ** 2).sum(-1), 1) == y0).all()
