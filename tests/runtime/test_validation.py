"""Runtime.run input policy: clear InputErrors, never a crash inside onnxruntime."""

import numpy as np
import pytest

from jei_edge.errors import InputError
from jei_edge.runtime import Runtime
from tests.runtime.helpers import model_inputs


@pytest.fixture(scope="module")
def rt(vit_bundle):
    return Runtime.load(vit_bundle)


@pytest.mark.parametrize("x,match", [
    (np.zeros((1, 8, 8), np.float32), r"one sample without a batch axis.*x\[None\]"),
    (np.zeros((2, 1, 8), np.float32), "rank 3"),
    (np.zeros((2, 1, 8, 8, 1), np.float32), "rank 5"),
    (np.zeros((2, 1, 9, 8), np.float32), r"expects \[B, 1, 8, 8\]"),
    (np.zeros((2, 3, 8, 8), np.float32), r"expects \[B, 1, 8, 8\]"),
    (np.zeros((2, 1, 8, 8), np.int64), "dtype int64"),
    (np.zeros((2, 1, 8, 8), bool), "dtype bool"),
    (np.array([["a"]]), "dtype <U1"),
])
def test_bad_shapes_and_dtypes(rt, x, match):
    with pytest.raises(InputError, match=match):
        rt.run(x)


def test_non_finite_rows_are_named(rt):
    x = model_inputs(10)
    x[3, 0, 1, 1] = np.nan
    x[7, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match=r"2 row\(s\) \(rows 3, 7\)"):
        rt.run(x)


def test_empty_batch_gives_empty_results(rt):
    res = rt.run(np.zeros((0, 1, 8, 8), np.float32))
    assert res.probs.shape == (0, 5) and res.exit_index.shape == (0,) and res.reach == []


def test_float64_lists_and_views_are_accepted(rt):
    x = model_inputs(6)
    ref = rt.run(x)
    for variant in (x.astype(np.float64), x.astype(np.float16).astype(np.float32), x.tolist()):
        res = rt.run(variant)
        assert res.exit_index.shape == (6,)
    res = rt.run(np.asfortranarray(x))
    assert np.array_equal(res.exit_index, ref.exit_index)


@pytest.mark.parametrize("offsets,match", [([0.1], "one value per gated exit \\(3\\)"),
                                           ([0, np.nan, 0], "finite"), ("abc", "not numbers")])
def test_bad_offsets(rt, offsets, match):
    with pytest.raises(InputError, match=match):
        rt.run(model_inputs(2), offsets=offsets)


def test_bad_mode(rt):
    with pytest.raises(InputError, match="mode must be one of"):
        rt.run(model_inputs(2), mode="fast")


def test_offsets_tuple_checked_once_lists_every_time(rt):
    x = model_inputs(8)
    good = (0.0, 0.0, 0.0)
    a = rt.run(x, offsets=good)
    assert np.array_equal(rt.run(x, offsets=good).exit_index, a.exit_index)
    with pytest.raises(InputError):
        rt.run(x, offsets=(0.0, 0.0))  # another tuple: checked
    lst = [0.0, 0.0, 0.0]
    rt.run(x, offsets=lst)
    lst.append(1.0)  # a list may change between calls: always checked
    with pytest.raises(InputError):
        rt.run(x, offsets=lst)


def test_finiteness_check_has_no_false_positives_or_misses(rt):
    x = np.full((64, 1, 8, 8), np.finfo(np.float32).max, np.float32)  # a float32 sum would overflow
    x[1::2] = -np.finfo(np.float32).max
    from jei_edge.runtime.validate import check_batch

    assert check_batch(x, (1, 8, 8)) is x
    y = model_inputs(4)
    y[2, 0, 0, 0], y[2, 0, 0, 1] = np.inf, -np.inf  # cancelling infinities are still refused
    with pytest.raises(InputError, match=r"rows 2\)"):
        rt.run(y)
    y = model_inputs(1)
    y[0, 0, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN or infinite"):
        rt.run(y)
