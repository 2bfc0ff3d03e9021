"""LSQ (Esser et al., ICLR 2020): `qdistill.nn.quantizers.lsq` and its layers against the
formulas of their docstrings, in float64.

Expected values come from a numpy transcription of the paper's equations (never from the
function under test) or are written out by hand. Inputs avoid rounding ties (`_codes`
checks), include values exactly on the range's bounds (where the paper's strict
inequalities decide), and make the wrong variants differ: Q_P = 2**b instead of 2**b - 1,
no grad scale or the batch in N, floor for round, inclusive bounds, a mean over the
whole fused tensor instead of per member.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qdistill.nn import SCHEMES, scheme_bits_error
from qdistill.nn.layers import QuantAct, QuantConv2d, QuantLinear
from qdistill.nn.models import build, names
from qdistill.nn.quantizers import lsq, lsq_activation, lsq_range, lsq_weight

F64 = torch.float64


def _codes(r):
    """round-half-to-even of ``r``, refusing inputs near a tie."""
    frac = np.abs(np.asarray(r) % 1.0 - 0.5)
    assert frac.min() > 1e-6, "test input too close to a rounding tie"
    return np.round(r)


def ref_lsq(v, s, bits, signed, g, grad_out):
    """The paper's eqs. 1-5 in numpy float64: ``(v_hat, dL/dv, dL/ds)`` for upstream
    gradient ``grad_out`` and one scalar step ``s``."""
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    v, grad_out = np.asarray(v, np.float64), np.asarray(grad_out, np.float64)
    r = v / s
    v_hat = _codes(np.clip(r, -qn, qp)) * s
    inside = (-qn < r) & (r < qp)
    dv = np.where(inside, grad_out, 0.0)
    ds_elem = np.where(inside, -r + _codes(np.where(inside, r, 0.0)), np.where(r <= -qn, -qn, qp))
    return v_hat, dv, g * float((grad_out * ds_elem).sum())


def _leaf(a):
    return torch.tensor(a, dtype=F64, requires_grad=True)


# v / s for s = 0.5: [-3.2, -2, -1.4, -0.3, 0.2, 0.9, 1, 1.7, 2.6]: below -Q_N, on it, inside, on Q_P, above
V = [-1.6, -1.0, -0.7, -0.15, 0.1, 0.45, 0.5, 0.85, 1.3]
G = [0.3, -1.2, 0.7, 2.0, -0.4, 0.9, 1.1, -0.6, 0.25]


def test_lsq_2_bit_signed_by_hand():
    """2 bits signed: Q_N = 2, Q_P = 1, s = 0.5, g = 0.1. v/s as listed above V;
    clamp to [-2, 1] and round: codes [-2, -2, -1, 0, 0, 1, 1, 1, 1]."""
    v, s = _leaf(V), _leaf([0.5])
    out = lsq(v, s, 2, True, 0.1)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, -0.5, 0, 0, 0.5, 0.5, 0.5, 0.5], dtype=F64))
    out.backward(torch.tensor(G, dtype=F64))
    # straight through strictly inside (-2 < v/s < 1): the bound values -2 and 1 get 0
    assert torch.equal(v.grad, torch.tensor([0, 0, 0.7, 2.0, -0.4, 0.9, 0, 0, 0], dtype=F64))
    # ds: -v/s + round(v/s) inside (-1.4 -> 0.4, -0.3 -> 0.3, 0.2 -> -0.2, 0.9 -> 0.1),
    # -Q_N = -2 at or below, Q_P = 1 at or above; times g
    per = [-2, -2, 0.4, 0.3, -0.2, 0.1, 1, 1, 1]
    assert s.grad.item() == pytest.approx(0.1 * sum(a * b for a, b in zip(G, per)), rel=1e-14)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_matches_the_paper(bits, signed):
    rng = np.random.default_rng(bits + 10 * signed)
    qn, qp = lsq_range(bits, signed)
    s = 0.37
    r = rng.uniform(-qn - 3, qp + 3, 200)
    r = np.concatenate([r, [-qn, qp, 0.0]])  # on the bounds, and 0
    v, grad = r * s, rng.normal(size=r.size)
    g = 1 / math.sqrt(r.size * qp)
    want, dv, ds = ref_lsq(v, s, bits, signed, g, grad)
    vt, st = _leaf(v), _leaf([s])
    out = lsq(vt, st, bits, signed, g)
    out.backward(torch.tensor(grad, dtype=F64))
    # code * s is one float64 product in both
    np.testing.assert_array_equal(out.detach().numpy(), want)
    np.testing.assert_array_equal(vt.grad.numpy(), dv)
    # a sum of 203 float64 terms each way, then the product by g: gamma_204(u64) * g * sum |terms|,
    # each term |grad_i d_i| <= |grad_i| max(Q_N, Q_P)
    bound = 2 * 204 * 2.0**-53 / (1 - 204 * 2.0**-53) * g * np.abs(grad).sum() * max(qn, qp)
    assert abs(st.grad.item() - ds) <= bound


@pytest.mark.parametrize("bits,signed", [(2, True), (3, True), (4, True), (1, False), (2, False), (4, False)])
def test_level_set(bits, signed):
    """Every code from -Q_N to Q_P occurs, times s, and nothing else."""
    qn, qp = lsq_range(bits, signed)
    s = torch.tensor([0.3], dtype=F64)
    out = lsq(torch.linspace(-3 * qn - 1, 3 * qp + 1, 1001, dtype=F64) * s, s, bits, signed, 1.0)
    assert sorted(set(out.tolist())) == [c * 0.3 for c in range(-qn, qp + 1)]


def test_ranges_and_the_one_bit_check():
    assert lsq_range(2, True) == (2, 1) and lsq_range(4, True) == (8, 7)
    assert lsq_range(1, False) == (0, 1) and lsq_range(3, False) == (0, 7)
    assert "lsq" in SCHEMES
    msg = scheme_bits_error("lsq", 1, 2)
    assert "weight_bits >= 2" in msg and "no signed levels" in msg
    assert scheme_bits_error("lsq", 2, 1) is None and scheme_bits_error("dorefa", 1, 1) is None
    with pytest.raises(ValueError, match="weight_bits >= 2"):
        build("vgg7", weight_bits=1, act_bits=2, scheme="lsq")
    build("vgg7", weight_bits=32, act_bits=1, scheme="lsq")  # full-precision weights: no step


def test_weight_quantizer_scales_the_step_gradient_by_the_layer_size():
    """``g = 1 / sqrt(N Q_P)``, N the number of weights of the layer: 4 * 3 * 3 * 3 = 108."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=F64, requires_grad=True)
    s = torch.tensor([0.4], dtype=F64, requires_grad=True)
    grad = torch.randn(4, 3, 3, 3, dtype=F64)
    lsq_weight(w, s, 3, None).backward(grad)
    _, dv, ds = ref_lsq(w.detach().numpy(), 0.4, 3, True, 1 / math.sqrt(108 * 3), grad.numpy())
    assert s.grad.item() == pytest.approx(ds, rel=1e-12)
    np.testing.assert_array_equal(w.grad.numpy(), dv)


def test_activation_quantizer_scales_by_the_activations_of_one_image():
    """N = C * H * W = 2 * 3 * 3 = 18 per image, not the 5 * 18 of the batch."""
    torch.manual_seed(1)
    x = (torch.randn(5, 2, 3, 3, dtype=F64) + 0.5).requires_grad_(True)
    s = torch.tensor([0.25], dtype=F64, requires_grad=True)
    grad = torch.randn(5, 2, 3, 3, dtype=F64)
    out = lsq_activation(x, s, 2, None)
    out.backward(grad)
    want, dv, ds = ref_lsq(x.detach().numpy(), 0.25, 2, False, 1 / math.sqrt(18 * 3), grad.numpy())
    np.testing.assert_array_equal(out.detach().numpy(), want)
    assert s.grad.item() == pytest.approx(ds, rel=1e-12)
    assert torch.equal(lsq_activation(x, s, 32), F.relu(x))


def test_members_quantize_and_learn_alone():
    """A member's block with its own step: values and gradients as alone, whatever the
    other members' scales (100x apart)."""
    torch.manual_seed(2)
    ws = [torch.randn(4, 3, 3, 3, dtype=F64) * c for c in (0.01, 1.0, 0.3)]
    steps = [0.004, 0.5, 0.1]
    w, s = torch.cat(ws).requires_grad_(True), torch.tensor(steps, dtype=F64, requires_grad=True)
    fused = lsq_weight(w, s, 2, members=3)
    grad = torch.randn_like(fused)
    fused.backward(grad)
    for k in range(3):
        wk, sk = ws[k].clone().requires_grad_(True), torch.tensor([steps[k]], dtype=F64, requires_grad=True)
        alone = lsq_weight(wk, sk, 2)
        alone.backward(grad[4 * k:4 * k + 4])
        assert torch.equal(fused[4 * k:4 * k + 4], alone)
        assert torch.equal(w.grad[4 * k:4 * k + 4], wk.grad)
        assert s.grad[k].item() == pytest.approx(sk.grad.item(), rel=1e-12)
    # activations: member k owns channels [2k, 2k+2) of (N, 3 * 2, H, W)
    x = (torch.randn(4, 6, 3, 3, dtype=F64) * torch.tensor([0.01, 0.01, 1, 1, 3, 3], dtype=F64).view(1, 6, 1, 1))
    fused = lsq_activation(x, torch.tensor(steps, dtype=F64), 2, members=3)
    for k in range(3):
        alone = lsq_activation(x[:, 2 * k:2 * k + 2], torch.tensor([steps[k]], dtype=F64), 2)
        assert torch.equal(fused[:, 2 * k:2 * k + 2], alone)


def test_weight_step_is_initialised_from_the_weight():
    torch.manual_seed(3)
    conv = QuantConv2d(3, 4, 3, weight_bits=3, scheme="lsq")
    want = 2 * conv.weight.detach().double().abs().mean().item() / math.sqrt(3)  # Q_P = 3 at 3 bits
    assert conv.step.shape == (1,) and conv.step.item() == pytest.approx(want, rel=1e-6)
    assert [n for n, _ in conv.named_parameters()] == ["weight", "bias", "step"]  # step last, as fused
    assert QuantLinear(4, 2, scheme="lsq").step is None  # 32 bits: no step


def test_activation_step_is_initialised_on_the_first_training_batch():
    torch.manual_seed(4)
    act = QuantAct(2, "lsq").double()
    x1, x2 = torch.randn(8, 3, 4, 4, dtype=F64), torch.randn(8, 3, 4, 4, dtype=F64) * 5
    act.eval()
    act(x1)
    assert act.step.item() == 1.0 and not act.initialized  # eval mode: no initialisation
    act.train()
    out = act(x1)
    want = 2 * x1.abs().mean().item() / math.sqrt(3)  # unsigned 2 bits: Q_P = 3
    assert act.step.item() == pytest.approx(want, rel=1e-12) and bool(act.initialized)
    want_out = ref_lsq(x1.numpy(), act.step.item(), 2, False, 1, x1.numpy())[0]
    np.testing.assert_array_equal(out.detach().numpy(), want_out)
    act(x2)  # once only
    assert act.step.item() == pytest.approx(want, rel=1e-12)
    state = act.state_dict()
    assert set(state) == {"step", "initialized"} and bool(state["initialized"])
    # a loaded state (resume) keeps its step and flag: no second initialisation
    fresh = QuantAct(2, "lsq").double().train()
    fresh.load_state_dict(state)
    fresh(x2)
    assert fresh.step.item() == pytest.approx(want, rel=1e-12)
    # and a model that loads an uninitialised state initialises on its next batch
    act.load_state_dict(QuantAct(2, "lsq").double().state_dict())
    act(x2)
    assert act.step.item() == pytest.approx(2 * x2.abs().mean().item() / math.sqrt(3), rel=1e-12)


def test_an_activation_step_follows_its_state_dict_however_the_module_was_made():
    """The flag lives in the state_dict alone: a trained quantizer whose flag is cleared in
    place (as a state copied in may say), its deep copy, and a fresh one loading that state
    all initialise alike on the next training batch (issue 30, item 4). A quantizer called
    twice in one forward still trains."""
    torch.manual_seed(6)
    x1, x2 = torch.randn(8, 3, 4, 4, dtype=F64), torch.randn(8, 3, 4, 4, dtype=F64) * 5
    trained = QuantAct(2, "lsq").double().train()
    trained(x1)
    trained.initialized.fill_(False)
    copied, fresh = copy.deepcopy(trained), QuantAct(2, "lsq").double().train()
    fresh.load_state_dict(trained.state_dict())
    want = 2 * x2.abs().mean().item() / math.sqrt(3)
    for act in (trained, copied, fresh):
        act(x2)
        assert act.step.item() == pytest.approx(want, rel=1e-12) and bool(act.initialized)
    shared = QuantAct(2, "lsq").double().train()
    shared(shared(x1) * 2).sum().backward()
    assert shared.step.grad.abs().item() > 0


@pytest.mark.parametrize("name", names())
def test_every_model_trains_a_step_with_lsq(name):
    """Every registered model built with scheme lsq (first and last layer quantized too)
    takes an Adam step: every step parameter gets a gradient and moves, every activation
    step is initialised, and the logits change."""
    torch.manual_seed(5)
    model = build(name, weight_bits=2, act_bits=2, scheme="lsq", quantize_first_last=True).train()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    steps = {n: p for n, p in model.named_parameters() if n.endswith("step")}
    acts = [m for m in model.modules() if isinstance(m, QuantAct)]
    assert len(steps) == sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules()) + len(acts)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    F.cross_entropy(model(x), y).backward()
    before = {n: p.detach().clone() for n, p in steps.items()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in steps.values())
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in steps.items())
    assert all(bool(m.initialized) for m in acts) and all(m.scheme == "lsq" for m in acts)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
