"""Tests of qdistill.nn.quantizers and qdistill.nn.layers against the formulas in their docstrings.

Expected values are either written out by hand or computed by a float64 numpy
transcription of the formula (never by the function under test). Inputs are chosen
so that the wrong variants (no tanh, mean instead of max, floor instead of round,
n = 2**k instead of 2**k - 1, per-row instead of whole-tensor statistics) give
different numbers, and so that no value sits near a rounding tie, where float32
and float64 could disagree (`_ref_round` checks that).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qdistill.nn.layers import QuantAct, QuantConv2d, QuantLinear
from qdistill.nn.quantizers import (
    dorefa_activation, dorefa_gradient, dorefa_weight, homework_activation, homework_weight, quantize_gradient,
    quantize_k,
)

BITS = [1, 2, 3, 4, 8, 32]
LOW_BITS = [1, 2, 3, 4, 8]


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


def leaf(values):
    return t32(values).requires_grad_(True)


def assert_close(actual, expected, rtol=1e-6, atol=1e-7):
    np.testing.assert_allclose(actual.detach().numpy(), np.asarray(expected, dtype=np.float64),
                               rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# float64 reference transcriptions of the docstrings' formulas
# ---------------------------------------------------------------------------
def _ref_round(z):
    """round-half-to-even of ``z``, refusing inputs near a tie (float32 might differ)."""
    frac = np.abs(np.asarray(z) % 1.0 - 0.5)
    assert frac.min() > 1e-3, "test input too close to a rounding tie"
    return np.round(z)


def ref_q(x, bits):
    n = 2.0**bits - 1
    return _ref_round(np.asarray(x, dtype=np.float64) * n) / n


def ref_dorefa_weight(w, bits):
    w = np.asarray(w, dtype=np.float64)
    if bits >= 32:
        return w
    if bits == 1:
        return np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean()
    t = np.tanh(w)
    return 2 * ref_q(t / np.abs(t).max() * 0.5 + 0.5, bits) - 1


def ref_dorefa_weight_grad(w, g, bits):
    """dL/dw of ``2 q_k(x) - 1``, ``x = tanh(w) / M * 0.5 + 0.5``, ``M = max|tanh(w)|``:
    q_k is straight through, so dL/dx = 2g; the gradient also flows through M into the
    single arg-max element (the test inputs have no ties)."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    if bits == 1 or bits >= 32:
        return g
    t = np.tanh(w)
    j = np.unravel_index(np.abs(t).argmax(), t.shape)
    m = np.abs(t[j])
    dx = 2 * g
    dt = dx * 0.5 / m
    dm = np.sum(dx * 0.5 * (-t / m**2))
    dt[j] += dm * np.sign(t[j])
    return dt * (1 - t**2)


def ref_dorefa_activation(x, bits):
    x = np.asarray(x, dtype=np.float64)
    if bits >= 32:
        return np.maximum(x, 0.0)
    return ref_q(np.clip(x, 0.0, 1.0), bits)


def ref_homework_weight(w, bits):
    w = np.asarray(w, dtype=np.float64)
    if bits >= 32:
        return w
    t = np.tanh(w)
    s = 2 * np.abs(t).mean()
    return (ref_q(np.clip(t / s, -0.5, 0.5) + 0.5, bits) - 0.5) * s


def ref_homework_weight_grad(w, g, bits):
    """dL/dw of ``(q_k(clamp(t/s, -.5, .5) + .5) - .5) * s`` with ``t = tanh(w)``,
    ``s = 2 mean|t|``: q_k straight through, clamp passes gradient only inside, and s
    depends on every element (ds/dt_j = 2 sign(t_j) / N)."""
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    if bits >= 32:
        return g
    t = np.tanh(w)
    s = 2 * np.abs(t).mean()
    r = t / s
    inside = np.abs(r) < 0.5
    q = ref_q(np.clip(r, -0.5, 0.5) + 0.5, bits)
    ds = np.sum(g * (q - 0.5)) + np.sum(g * s * inside * (-t / s**2))
    dt = g * inside + ds * 2 * np.sign(t) / t.size
    return dt * (1 - t**2)


def ref_homework_activation(y, bits):
    x = np.clip(0.1 * np.asarray(y, dtype=np.float64), 0.0, 1.0)
    return x if bits >= 32 else ref_q(x, bits)


# ---------------------------------------------------------------------------
# quantize_k
# ---------------------------------------------------------------------------
X_Q = [0.0, 0.05, 0.2, 0.43, 0.77, 0.98, 1.0]
# round(x * n) / n with n = 2**k - 1, worked out by hand (x * n is listed in the comment)
Q_GOLDEN = {
    1: [0, 0, 0, 0, 1, 1, 1],                                    # x*1
    2: [0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1],                          # 0 .15 .6 1.29 2.31 2.94 3
    3: [0, 0, 1 / 7, 3 / 7, 5 / 7, 1, 1],                          # 0 .35 1.4 3.01 5.39 6.86 7
    4: [0, 1 / 15, 3 / 15, 6 / 15, 12 / 15, 1, 1],                 # 0 .75 3 6.45 11.55 14.7 15
    8: [0, 13 / 255, 51 / 255, 110 / 255, 196 / 255, 250 / 255, 1],  # 0 12.75 51 109.65 ...
}


@pytest.mark.parametrize("bits", LOW_BITS)
def test_quantize_k_golden(bits):
    assert_close(quantize_k(t32(X_Q), bits), Q_GOLDEN[bits])
    assert_close(quantize_k(t32(X_Q), bits), ref_q(X_Q, bits))


def test_quantize_k_32_bits_is_the_formula_not_the_identity():
    # n = 2**32 - 1: values below 0.5/n round to 0, others come back (nearly) unchanged
    out = quantize_k(t32([0.0, 1e-10, 3e-10, 0.3, 1.0]), 32)
    assert out[1].item() == 0.0
    assert_close(out, [0.0, 0.0, 1 / (2.0**32 - 1), 0.3, 1.0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits,expected", [(1, 0.0), (2, 2 / 3), (3, 4 / 7), (4, 8 / 15),
                                           (8, 128 / 255)])
def test_quantize_k_rounds_half_to_even(bits, expected):
    # 0.5 * n is an exact tie: round-half-to-even (tf.round, torch.round) picks the even
    # code; floor(x * n + 0.5) would give 1 at k = 1.
    assert quantize_k(t32([0.5]), bits).item() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("bits", BITS)
def test_quantize_k_gradient_is_straight_through(bits):
    x = leaf([-0.3, 0.2, 0.77, 1.7])
    g = t32([1.5, -2.0, 3.0, 0.25])
    quantize_k(x, bits).backward(g)
    assert torch.equal(x.grad, g)


# ---------------------------------------------------------------------------
# dorefa_weight
# ---------------------------------------------------------------------------
W = [[0.3, -0.8, 2.0], [-0.05, 1.0, -1.3]]
G_W = [[0.7, -1.1, 0.4], [0.9, -0.3, 1.6]]


@pytest.mark.parametrize("bits", BITS)
def test_dorefa_weight_forward(bits):
    assert_close(dorefa_weight(t32(W), bits), ref_dorefa_weight(W, bits))


def test_dorefa_weight_2_bits_by_hand():
    # tanh(W) = [[.2913, -.6640, .9640], [-.0500, .7616, -.8617]], max|.| = .9640;
    # x = tanh/max * .5 + .5 = [[.651, .156, 1], [.474, .895, .053]];
    # 3x = [[1.95, .47, 3], [1.42, 2.69, .16]] -> codes [[2, 0, 3], [1, 3, 0]].
    out = dorefa_weight(t32(W), 2)
    assert torch.equal(out, t32([[1 / 3, -1, 1], [-1 / 3, 1, -1]]))


def test_dorefa_weight_1_bit_by_hand():
    # E = mean|w| over the whole tensor = 3 / 6 = 0.5 (row means 2/3 and 1/3, max 1.5);
    # sign(0) is +1.
    w = [[0.5, -1.5, 0.0], [0.5, -0.25, 0.25]]
    assert torch.equal(dorefa_weight(t32(w), 1), t32([[0.5, -0.5, 0.5], [0.5, -0.5, 0.5]]))


@pytest.mark.parametrize("bits", BITS)
def test_dorefa_weight_gradient(bits):
    w = leaf(W)
    dorefa_weight(w, bits).backward(t32(G_W))
    assert_close(w.grad, ref_dorefa_weight_grad(W, G_W, bits), rtol=1e-5, atol=1e-6)


def test_dorefa_weight_gradient_flows_through_the_max():
    # The arg-max element (w = 2.0) gets an extra term from d/dM; without it its
    # gradient would be (1 - tanh(2)^2) * g / M alone.
    w = leaf(W)
    dorefa_weight(w, 2).backward(t32(G_W))
    t = np.tanh(np.array(W))
    direct_only = (1 - t[0, 2]**2) * G_W[0][2] / np.abs(t).max()
    assert abs(w.grad[0, 2].item() - direct_only) > 1e-3


def test_dorefa_weight_1_bit_gradient_treats_e_as_constant():
    # If E = mean|w| carried gradient, each element would get an extra
    # sign(w_i) / N * sum_j g_j sign(w_j) = +-0.2 here.
    w = leaf([0.5, -1.5, 0.0, 3.0, -0.25])
    g = t32([1.0, 2.0, 3.0, 4.0, 5.0])
    out = dorefa_weight(w, 1)
    assert_close(out, [1.05, -1.05, 1.05, 1.05, -1.05])  # mean|w| = 5.25 / 5
    out.backward(g)
    assert torch.equal(w.grad, g)


def test_dorefa_weight_2_bit_levels_are_exact():
    out = dorefa_weight(torch.linspace(-3, 3, 101), 2)
    expected = set(t32([-1.0, -1 / 3, 1 / 3, 1.0]).tolist())
    assert set(out.tolist()) == expected


# ---------------------------------------------------------------------------
# dorefa_activation
# ---------------------------------------------------------------------------
X_A = [-0.5, -0.01, 0.2, 0.45, 0.6, 0.95, 1.01, 1.3]
G_A = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


@pytest.mark.parametrize("bits", BITS)
def test_dorefa_activation_forward(bits):
    assert_close(dorefa_activation(t32(X_A), bits), ref_dorefa_activation(X_A, bits))


def test_dorefa_activation_by_hand():
    x = t32(X_A)
    assert torch.equal(dorefa_activation(x, 1), t32([0, 0, 0, 0, 1, 1, 1, 1]))
    # clamp then 3x = [0, 0, .6, 1.35, 1.8, 2.85, 3, 3]
    assert torch.equal(dorefa_activation(x, 2), t32([0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1]))
    # 32 bits is relu: not clipped at 1
    assert torch.equal(dorefa_activation(x, 32), t32([0, 0, 0.2, 0.45, 0.6, 0.95, 1.01, 1.3]))


@pytest.mark.parametrize("bits", BITS)
def test_dorefa_activation_gradient(bits):
    x = leaf(X_A)
    dorefa_activation(x, bits).backward(t32(G_A))
    if bits >= 32:  # relu: 1 where x > 0
        expected = [0, 0, 3, 4, 5, 6, 7, 8]
    else:  # clamp: 1 inside (0, 1), 0 outside; rounding is straight through
        expected = [0, 0, 3, 4, 5, 6, 0, 0]
    assert torch.equal(x.grad, t32(expected))


def test_dorefa_activation_1_bit_levels():
    out = dorefa_activation(torch.linspace(-1, 2, 61), 1)
    assert set(out.tolist()) == {0.0, 1.0}


# ---------------------------------------------------------------------------
# homework scheme
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_homework_weight_forward(bits):
    assert_close(homework_weight(t32(W), bits), ref_homework_weight(W, bits), rtol=1e-5)


def test_homework_weight_2_bits_by_hand():
    # s = 2 mean|tanh W| = 1.19755; tanh(W)/s = [[.243, -.554, .805], [-.042, .636, -.720]]
    # clamp to +-.5, + .5 -> [[.743, 0, 1], [.458, 1, 0]]; 3x -> codes [[2, 0, 3], [1, 3, 0]];
    # (code/3 - .5) * s.
    s = 2 * np.abs(np.tanh(np.array(W))).mean()
    expected = s * np.array([[1 / 6, -1 / 2, 1 / 2], [-1 / 6, 1 / 2, -1 / 2]])
    assert_close(homework_weight(t32(W), 2), expected, rtol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_homework_weight_gradient(bits):
    w = leaf(W)
    homework_weight(w, bits).backward(t32(G_W))
    assert_close(w.grad, ref_homework_weight_grad(W, G_W, bits), rtol=1e-5, atol=1e-6)


def test_homework_weight_gradient_flows_through_s():
    # w = 2.0 is clipped (tanh/s > .5), so its whole gradient comes through s.
    w = leaf(W)
    homework_weight(w, 2).backward(t32(G_W))
    assert abs(w.grad[0, 2].item()) > 1e-3


Y_H = [-3.0, 0.5, 2.4, 4.9, 7.2, 9.6, 12.0]


@pytest.mark.parametrize("bits", BITS)
def test_homework_activation_forward(bits):
    assert_close(homework_activation(t32(Y_H), bits), ref_homework_activation(Y_H, bits))


def test_homework_activation_by_hand():
    y = t32(Y_H)  # 0.1 y = [-.3, .05, .24, .49, .72, .96, 1.2]
    assert torch.equal(homework_activation(y, 1), t32([0, 0, 0, 0, 1, 1, 1]))
    assert torch.equal(homework_activation(y, 2), t32([0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1]))
    assert_close(homework_activation(y, 32), [0, 0.05, 0.24, 0.49, 0.72, 0.96, 1.0])
    # 32 bits only clamps: a value far below one step of a 32-bit grid survives
    assert homework_activation(t32([1e-9]), 32).item() == pytest.approx(1e-10, rel=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_homework_activation_gradient(bits):
    y = leaf(Y_H)
    homework_activation(y, bits).backward(t32([1.0, 2, 3, 4, 5, 6, 7]))
    assert_close(y.grad, [0, 0.2, 0.3, 0.4, 0.5, 0.6, 0])


def test_bits_must_be_positive():
    with pytest.raises(ValueError):
        dorefa_weight(t32([1.0]), 0)


# ---------------------------------------------------------------------------
# properties (hypothesis)
# ---------------------------------------------------------------------------
finite = st.floats(-4, 4, allow_nan=False, allow_subnormal=False, width=32)
unit = st.floats(0, 1, allow_nan=False, allow_subnormal=False, width=32)
QUANTIZERS = {
    "dorefa_weight": dorefa_weight, "dorefa_activation": dorefa_activation,
    "homework_weight": homework_weight, "homework_activation": homework_activation,
}


@settings(max_examples=150, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), st.sampled_from(LOW_BITS),
       st.sampled_from(sorted(QUANTIZERS)))
def test_k_bit_quantizer_has_at_most_2k_values(values, bits, name):
    # weights that are all zero have no scale (max|tanh w| = 0); the reference divides
    # by zero there too
    assume(name.endswith("activation") or any(v != 0 for v in values))
    out = QUANTIZERS[name](t32(values), bits)
    assert torch.isfinite(out).all()
    assert torch.unique(out).numel() <= 2**bits


@settings(max_examples=100, deadline=None)
@given(st.lists(unit, min_size=1, max_size=64), st.sampled_from(LOW_BITS))
def test_quantize_k_on_unit_interval_has_at_most_2k_values_and_is_idempotent(values, bits):
    q = quantize_k(t32(values), bits)
    assert torch.unique(q).numel() <= 2**bits
    assert torch.equal(quantize_k(q, bits), q)


@settings(max_examples=100, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), st.sampled_from(BITS))
def test_dorefa_activation_is_idempotent(values, bits):
    once = dorefa_activation(t32(values), bits)
    assert torch.equal(dorefa_activation(once, bits), once)


# ---------------------------------------------------------------------------
# dorefa_gradient
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
def test_dorefa_gradient_forward_is_identity(bits):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dorefa_gradient(x, bits), x)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_gradient_lies_on_the_per_sample_grid(bits):
    torch.manual_seed(1)
    n = 2**bits - 1
    # samples with very different scales (per-sample max, not a global one) and one
    # all-zero sample
    g = torch.randn(5, 2, 7, generator=torch.Generator().manual_seed(2))
    g = g * t32([1.0, 100.0, 0.01, 3.0, 0.0]).view(5, 1, 1)
    x = torch.zeros(5, 2, 7, requires_grad=True)
    dorefa_gradient(x, bits).backward(g)
    gq = x.grad.double().numpy().reshape(5, -1)
    gd = g.double().numpy().reshape(5, -1)
    for i in range(5):
        m = np.abs(gd[i]).max()
        if m == 0:
            assert np.all(gq[i] == 0)
            continue
        # g_q = m (2 q / n - 1) with an integer q in 0..n ...
        q = (gq[i] / m + 1) * n / 2
        assert np.allclose(q, np.round(q), atol=1e-4)
        assert q.min() > -1e-4 and q.max() < n + 1e-4
        # ... and stochastic rounding only picks one of the two codes around g
        z = (gd[i] / (2 * m) + 0.5) * n
        assert np.all(np.round(q) >= np.floor(z - 1e-4)) and np.all(np.round(q) <= np.ceil(z + 1e-4))
        # the largest-magnitude element sits at code 0 or n: it comes back exactly
        j = np.abs(gd[i]).argmax()
        assert gq[i, j] == pytest.approx(gd[i, j], rel=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_gradient_is_unbiased(bits):
    torch.manual_seed(3)
    n = 2**bits - 1
    g0 = t32([0.3, -0.55, 1.0, 0.0, -0.8, 0.125])  # m = 1 in every sample
    draws = 10_000
    x = torch.zeros(draws, 6, requires_grad=True)
    dorefa_gradient(x, bits).backward(g0.expand(draws, 6))
    mean = x.grad.double().mean(0).numpy()
    # one draw has variance (2m/n)^2 f (1 - f) <= (m/n)^2; allow five standard errors
    tol = 5 * 1.0 / n / np.sqrt(draws)
    np.testing.assert_allclose(mean, g0.double().numpy(), atol=tol, rtol=0)
    # and the draws really are spread over two levels (it is not a deterministic rounding)
    assert torch.unique(x.grad[:, 0]).numel() == 2


def test_bf16_gradients_at_8_bits_carry_no_bias_of_bf16_arithmetic():
    """A bf16 gradient is rounded stochastically as its float32 value would be, then cast
    to bf16 once (issue 23, item 7). The mean of each element over D draws is compared
    with the exact expectation of that, in float64: ``(1 - f) bf16(l_c) + f bf16(l_{c+1})``
    with ``z = (g / 2m + 0.5) n``, ``c = floor(z)``, ``f = z - c``, ``l_c = 2m (c / n - 0.5)``.
    Each draw is one of two values ``r`` apart, so by Hoeffding's inequality and a union
    bound over the E elements, every mean lies within ``r sqrt(ln(2E / delta) / 2D)`` of
    its expectation but with probability ``delta = 1e-9``; ``r * 1e-4`` more covers the
    float32 grid of the noise (``y * n`` is exact to ``n * 2**-23 < 1e-4``).
    Computed in bf16 (8 significant bits: ``g / 2m + 0.5`` is rounded to 1/256 before the
    1/255 grid is drawn), 405 of these 511 means fell outside it, by up to 13 times."""
    n, draws = 2 ** 8 - 1, 4096
    c = torch.arange(n + 1, dtype=torch.float32)  # the float32 levels round to bf16 as the exact ones do
    assert torch.equal((2 * (c / n - 0.5)).bfloat16(), (2 * (c.double() / n - 0.5)).bfloat16())
    g = torch.linspace(-1, 1, 511).bfloat16()  # m = 1 in every sample (a row: one draw of every element)
    torch.manual_seed(5)
    mean = quantize_gradient(g.expand(draws, -1).contiguous(), n).double().mean(0)
    z = (g.double() / 2 + 0.5) * n
    lo = torch.floor(z).clamp(max=n - 1)
    f = z - lo
    a, b = ((2 * (k / n - 0.5)).bfloat16().double() for k in (lo, lo + 1))
    r = b - a
    bound = r * math.sqrt(math.log(2 * len(g) / 1e-9) / (2 * draws)) + r * 1e-4
    assert torch.all((mean - ((1 - f) * a + f * b)).abs() <= bound)


def test_dorefa_gradient_32_bits_is_identity():
    x = torch.zeros(3, 4, requires_grad=True)
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    dorefa_gradient(x, 32).backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_dorefa_gradient_zero_stays_zero(bits):
    x = torch.zeros(3, 4, requires_grad=True)
    dorefa_gradient(x, bits).backward(torch.zeros(3, 4))
    assert torch.equal(x.grad, torch.zeros(3, 4))


# ---------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------
def _seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_quant_conv2d_at_32_bits_equals_conv2d():
    torch.manual_seed(0)
    q = QuantConv2d(3, 4, 3, padding=1, bias=True)
    ref = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    ref.load_state_dict(q.state_dict())
    x1 = _seeded(2, 3, 6, 6).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = _seeded(2, 4, 6, 6, seed=1)
    y1, y2 = q(x1), ref(x2)
    assert torch.equal(y1, y2)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(q.weight.grad, ref.weight.grad)
    assert torch.equal(q.bias.grad, ref.bias.grad)


def test_quant_linear_at_32_bits_equals_linear():
    torch.manual_seed(0)
    q = QuantLinear(5, 3)
    ref = nn.Linear(5, 3)
    ref.load_state_dict(q.state_dict())
    x1 = _seeded(4, 5).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = _seeded(4, 3, seed=1)
    y1, y2 = q(x1), ref(x2)
    assert torch.equal(y1, y2)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(q.weight.grad, ref.weight.grad)
    assert torch.equal(q.bias.grad, ref.bias.grad)


def test_quant_act_at_32_bits_is_relu_and_quantizes_below():
    x = t32(X_A)
    assert torch.equal(QuantAct(32)(x), F.relu(x))
    assert torch.equal(QuantAct(2)(x), t32([0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1]))
    assert torch.equal(QuantAct(1, "homework")(t32(Y_H)), t32([0, 0, 0, 0, 1, 1, 1]))


def test_reprs_show_the_bits():
    assert "weight_bits=2" in repr(QuantConv2d(3, 4, 3, weight_bits=2, grad_bits=4))
    assert "grad_bits=4" in repr(QuantConv2d(3, 4, 3, weight_bits=2, grad_bits=4))
    assert "weight_bits=1" in repr(QuantLinear(4, 2, weight_bits=1))
    assert "bits=3" in repr(QuantAct(3))
    assert "homework" in repr(QuantConv2d(3, 4, 3, weight_bits=2, scheme="homework"))


@pytest.mark.parametrize("scheme,quantizer", [("dorefa", dorefa_weight), ("homework", homework_weight)])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quantized_conv_uses_the_quantized_weight(scheme, quantizer, bits):
    torch.manual_seed(0)
    conv = QuantConv2d(3, 4, 3, padding=1, bias=True, weight_bits=bits, scheme=scheme)
    x = _seeded(2, 3, 5, 5)
    wq = quantizer(conv.weight.detach(), bits)
    assert torch.unique(wq).numel() <= 2**bits
    expected = F.conv2d(x, wq, conv.bias.detach(), padding=1)
    out = conv(x)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, F.conv2d(x, conv.weight.detach(), conv.bias.detach(), padding=1))


@pytest.mark.parametrize("bits", [1, 2])
def test_quantized_linear_uses_the_quantized_weight(bits):
    torch.manual_seed(0)
    lin = QuantLinear(6, 3, weight_bits=bits)
    x = _seeded(4, 6)
    assert torch.equal(lin(x), F.linear(x, dorefa_weight(lin.weight.detach(), bits), lin.bias.detach()))


def test_layer_grad_bits_quantize_the_output_gradient():
    # With one sample and grad_bits=1, the gradient reaching the output is +-m with
    # m = max|g|; the bias gradient is exactly that quantized gradient.
    torch.manual_seed(0)
    lin = QuantLinear(4, 5, grad_bits=1)
    g = t32([[0.3, -0.9, 0.05, 0.6, -0.2]])
    lin(_seeded(1, 4)).backward(g)
    assert torch.allclose(lin.bias.grad.abs(), torch.full((5,), 0.9))
    assert lin.bias.grad[1].item() == pytest.approx(-0.9)
    conv = QuantConv2d(2, 3, 1, bias=True, grad_bits=1)
    gc = _seeded(1, 3, 2, 2, seed=5)
    conv(_seeded(1, 2, 2, 2)).backward(gc)
    # each bias gradient is a sum of 4 values +-m
    m = gc.abs().max().item()
    codes = conv.bias.grad / m
    assert torch.allclose(codes, torch.round(codes), atol=1e-5)
