"""The Q1-Q4 losses against values computed independently with numpy."""
import numpy as np
import pytest
import torch

from qdistill.errors import ConfigError
from qdistill.nn.losses import build_loss

Z = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
TL = np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
Y = np.array([0, 2])


def np_log_softmax(a):
    a = a - a.max(1, keepdims=True)
    return a - np.log(np.exp(a).sum(1, keepdims=True))


def np_ce(p, z):
    return float(-(p * np_log_softmax(z)).sum(1).mean())


def onehot(y, k=3):
    return np.eye(k)[y]


def call(name, T=1.0, c=None):
    z = torch.tensor(Z, dtype=torch.float32, requires_grad=True)
    loss = build_loss(name, T, c)(z, torch.tensor(TL, dtype=torch.float32), torch.tensor(Y))
    loss.backward()
    return loss.item(), z.grad.numpy()


def soft_targets(T):
    e = np.exp(TL / T)
    return e / e.sum(1, keepdims=True)


def test_hard_is_cross_entropy_with_labels():
    value, _ = call("hard")
    # by hand for row 0: logsumexp(1, 2, 3) - 1
    row0 = np.log(np.exp(1) + np.exp(2) + np.exp(3)) - 1.0
    row1 = np.log(np.exp(0.5) + np.exp(-1) + np.exp(2)) - 2.0
    assert value == pytest.approx((row0 + row1) / 2, rel=1e-6)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 15.0])
def test_soft_uses_temperature_on_both_sides(T):
    value, grad = call("soft", T)
    assert value == pytest.approx(np_ce(soft_targets(T), Z / T), rel=1e-5)
    # d/dz CE(softmax(t/T), z/T) = (softmax(z/T) - softmax(t/T)) / T, averaged over the batch
    p = np.exp(np_log_softmax(Z / T))
    assert np.allclose(grad, (p - soft_targets(T)) / T / len(Z), atol=1e-6)


def test_hard_plus_soft_defaults_c_to_T_squared():
    T = 4.0
    value, _ = call("hard+soft", T)
    expected = np_ce(onehot(Y), Z) + T**2 * np_ce(soft_targets(T), Z / T)
    assert value == pytest.approx(expected, rel=1e-5)
    value_c, _ = call("hard+soft", T, c=0.5)
    assert value_c == pytest.approx(np_ce(onehot(Y), Z) + 0.5 * np_ce(soft_targets(T), Z / T), rel=1e-5)


def test_hard_plus_softgt_uses_labels_at_temperature():
    T = 2.0
    value, grad = call("hard+softgt", T)
    expected = np_ce(onehot(Y), Z) + T**2 * np_ce(onehot(Y), Z / T)
    assert value == pytest.approx(expected, rel=1e-5)
    p1 = np.exp(np_log_softmax(Z))
    pT = np.exp(np_log_softmax(Z / T))
    expected_grad = ((p1 - onehot(Y)) + T**2 * (pT - onehot(Y)) / T) / len(Z)
    assert np.allclose(grad, expected_grad, atol=1e-6)


def test_soft_at_T1_with_teacher_equal_to_student_has_zero_gradient():
    z = torch.tensor(Z, dtype=torch.float32, requires_grad=True)
    build_loss("soft", 1.0)(z, z.detach().clone(), torch.tensor(Y)).backward()
    assert torch.allclose(z.grad, torch.zeros_like(z.grad), atol=1e-7)


def test_bad_temperature_and_name():
    with pytest.raises(ConfigError):
        build_loss("soft", 0.0)
    with pytest.raises(ConfigError):
        build_loss("soft", -1.0)
    with pytest.raises(ConfigError):
        build_loss("kl")
    with pytest.warns(UserWarning):
        build_loss("soft", 0.5)
