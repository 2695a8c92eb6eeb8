"""Gate features: numerically safe for one-hot, uniform, extreme and fp16 inputs; exportable ops."""

import numpy as np
import pytest
import torch

from jei_edge import exit_rule
from jei_edge.model.exits import Gate, gate_features


@pytest.mark.parametrize("case", ["one_hot", "uniform", "huge", "neg_inf", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_features_finite_and_match_numpy(case, dtype):
    c = 10
    if case == "one_hot":
        z = torch.full((4, c), -30.0)
        z[:, 3] = 30.0
    elif case == "uniform":
        z = torch.zeros((4, c))
    elif case == "huge":
        z = torch.randn(4, c) * 1e4 if dtype == torch.float32 else torch.randn(4, c) * 6e4 / 8
    elif case == "neg_inf":
        z = torch.randn(4, c)
        z[:, :5] = float("-inf")
    else:
        z = torch.randn(4, c) * 3
    z = z.to(dtype)
    f = gate_features(z)
    assert f.dtype == torch.float32
    assert torch.isfinite(f).all(), f
    ref = exit_rule.gate_features(z.float().numpy())
    np.testing.assert_allclose(f.double().numpy(), ref, atol=1e-5)
    assert ((f[:, 0] >= 1.0 / c - 1e-6) & (f[:, 0] <= 1 + 1e-6)).all()  # p_max
    assert (f[:, 1] >= -1e-6).all() and (f[:, 1] <= np.log(c) + 1e-5).all()  # entropy
    assert (f[:, 2] >= 0).all()  # margin


def test_uniform_and_one_hot_values():
    f = gate_features(torch.zeros(1, 4))[0]
    np.testing.assert_allclose(f.numpy(), [0.25, np.log(4), 0.0, np.log(4)], atol=1e-6)
    z = torch.tensor([[100.0, 0.0, 0.0]])
    np.testing.assert_allclose(gate_features(z)[0].numpy(), [1.0, 0.0, 1.0, 0.0], atol=1e-6)


def test_gate_is_linear_on_detached_features():
    gate = Gate()
    z = torch.randn(5, 6, requires_grad=True)
    out = gate(z)
    assert out.shape == (5,)
    expected = gate_features(z.detach()) @ gate.linear.weight[0] + gate.linear.bias
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert z.grad is None  # no gradient from the gate into the IM
    assert gate.linear.weight.grad is not None


def test_two_classes_minimum():
    with pytest.raises(ValueError):
        exit_rule.gate_features(np.zeros((2, 1)))
