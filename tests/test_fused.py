"""FusedStudents: K members trained as one grouped network match K separate runs."""
import copy

import pytest
import torch
import torch.nn as nn

from qdistill.fused import (FusedStudents, dorefa_weight_per_member, fused_loss, gradient_per_member,
                            homework_weight_per_member, measure_step_rate, train_step)
from qdistill.losses import build_loss
from qdistill.models import build
from qdistill.quant import QuantConv2d, QuantLinear, dorefa_weight, homework_weight

LOSSES = [build_loss("hard"), build_loss("soft", temperature=4.0), build_loss("hard+soft", temperature=2.0)]


@pytest.fixture(autouse=True)
def one_thread():
    """Equivalence is asserted with one thread. With several, a grouped convolution and
    K plain ones split their reductions differently, so weight gradients differ in the
    last bits; Adam at lr 0.01 turns a ~1e-7 gradient difference on a parameter whose
    gradient is near its eps into a ~5e-5 step difference, and 20 steps on random data
    grow chaotically (measured on 2 threads: 6e-2 after 20 steps). With one thread both
    paths reduce in the same order, and on the 2-core dev box the fused members matched
    separate runs to the bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _members(k, seed=0, **kw):
    torch.manual_seed(seed)
    return [build("vgg7", **kw) for _ in range(k)]


def _batches(n, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 3, 32, 32, generator=g), torch.randn(size, 10, generator=g) * 3,
             torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def _train_both(members, steps, losses, size=8, **adam):
    """Train deep copies of ``members`` one by one and fused on the same batches.
    Returns (separate models, fused, max |logit difference| over all steps)."""
    separate = [copy.deepcopy(m) for m in members]
    fused = FusedStudents(members)
    opts = [torch.optim.Adam(m.parameters(), lr=0.01, **adam) for m in separate]
    fopt = torch.optim.Adam(fused.parameters(), lr=0.01, **adam)
    worst = 0.0
    for x, t, y in _batches(steps, size):
        _, logits = train_step(fused, fopt, x, t, y, losses)
        for m, opt, fn, z_fused in zip(separate, opts, losses, logits):
            opt.zero_grad()
            z = m(x)
            fn(z, t, y).backward()
            opt.step()
            worst = max(worst, (z.detach() - z_fused).abs().max().item())
    return separate, fused, worst


def _quantized_layers(model):
    return [m for m in model if isinstance(m, (QuantConv2d, QuantLinear)) and m.weight_bits < 32]


def test_full_precision_members_match_separate_runs():
    members = _members(3)
    separate, fused, worst_logit = _train_both(members, 20, LOSSES, weight_decay=1e-4)
    assert worst_logit < 1e-4
    split = fused.split()
    moved = 0.0
    for m0, ms, mf in zip(members, separate, split):
        for (name, a), b, c in zip(ms.state_dict().items(), mf.state_dict().values(),
                                   m0.state_dict().values()):
            assert (a - b).abs().max().item() < 1e-4, name
            moved = max(moved, (a - c).abs().max().item())
    assert moved > 0.05  # the members really trained (and the fused members did too)


@pytest.mark.parametrize("scheme", ["dorefa", "homework"])
def test_w2a1_members_quantized_weights_match_separate_runs(scheme):
    members = _members(3, seed=2, weight_bits=2, act_bits=1, scheme=scheme)
    separate, fused, _ = _train_both(members, 3, LOSSES)
    same = changed = total = 0
    with torch.no_grad():
        for m0, ms, mf in zip(members, separate, fused.split()):
            for l0, ls, lf in zip(_quantized_layers(m0), _quantized_layers(ms), _quantized_layers(mf)):
                qs, qf = ls.quantized_weight(), lf.quantized_weight()
                # Same level: homework levels are s * code with a float scale s, so an ulp
                # in s must not count; distinct levels differ by >= s/3, far above 1e-5.
                same += torch.isclose(qs, qf, rtol=1e-5, atol=0).sum().item()
                changed += (qs != l0.quantized_weight()).sum().item()
                total += qs.numel()
    assert same >= 0.999 * total
    assert changed >= 0.01 * total  # three steps move enough weights for the test to bite


@pytest.mark.parametrize("kw", [{}, dict(weight_bits=2, act_bits=1)])
def test_split_members_evaluate_like_fused_network(kw):
    members = _members(3, seed=3, **kw)
    fused = FusedStudents(members)
    opt = torch.optim.Adam(fused.parameters(), lr=0.01)
    for x, t, y in _batches(3, seed=4):
        train_step(fused, opt, x, t, y, LOSSES)
    assert all(m.training for m in fused.split())
    fused.eval()
    split = fused.split()
    assert not any(m.training or any(layer.training for layer in m) for m in split)
    x, _, y = _batches(1, size=64, seed=5)[0]
    with torch.no_grad():
        fz = fused(x)
        sz = torch.stack([m(x) for m in split])
    assert torch.equal(fz.argmax(-1), sz.argmax(-1))
    assert torch.equal((fz.argmax(-1) == y).sum(1), (sz.argmax(-1) == y).sum(1))
    assert (fz - sz).abs().max().item() < 1e-4
    # BN running statistics came back as trained, member by member.
    bn = [i for i, layer in enumerate(fused.net) if isinstance(layer, nn.BatchNorm2d)]
    for i in bn:
        c = fused.net[i].num_features // 3
        for k, m in enumerate(split):
            assert torch.equal(m[i].running_mean, fused.net[i].running_mean[k * c:(k + 1) * c])
            assert torch.equal(m[i].running_var, fused.net[i].running_var[k * c:(k + 1) * c])
            assert m[i].num_batches_tracked.item() == 3
    assert not torch.equal(split[0][bn[0]].running_mean, split[1][bn[0]].running_mean)


@pytest.mark.parametrize("quantizer,fused_quantizer,bits", [
    (dorefa_weight, dorefa_weight_per_member, 2), (dorefa_weight, dorefa_weight_per_member, 1),
    (homework_weight, homework_weight_per_member, 2)])
def test_weight_quantization_is_per_member(quantizer, fused_quantizer, bits):
    torch.manual_seed(0)
    # Members on scales 100x apart: statistics over the fused tensor would crush member 0.
    ws = [torch.randn(8, 4, 3, 3) * s for s in (0.01, 1.0, 0.3)]
    w = torch.cat(ws).requires_grad_()
    q = fused_quantizer(w, bits, 3)
    expected = torch.cat([quantizer(x, bits) for x in ws])
    assert torch.equal(q, expected)
    assert not torch.equal(quantizer(w, bits), expected)
    # Gradients too: member 1's loss must not reach members 0 and 2 (through max or mean).
    q[8:16].sum().backward()
    assert w.grad[:8].abs().sum() == 0 and w.grad[16:].abs().sum() == 0 and w.grad[8:16].abs().sum() > 0


def test_gradient_quantization_takes_its_max_per_sample_and_member():
    torch.manual_seed(0)
    x = torch.zeros(4, 2 * 5, 3, 3, requires_grad=True)
    g = torch.randn(4, 2 * 5, 3, 3)
    g[:, :5] *= 1000.0  # member 0's gradient dwarfs member 1's
    gradient_per_member(x, 2, 2).backward(g)
    gq = x.grad.unflatten(1, (2, 5))
    m = g.unflatten(1, (2, 5)).abs().amax(dim=(2, 3, 4), keepdim=True)
    # 2-bit levels are 2m(c/3 - 1/2) with m the block's own max: {-m, -m/3, m/3, m}.
    codes = (gq / (2 * m) + 0.5) * 3
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert gq[:, 1].abs().max() <= m[:, 1].max() * (1 + 1e-6)


def test_fused_loss_sums_each_members_own_loss():
    x, t, y = _batches(1, size=8)[0]
    z = torch.randn(3, 8, 10)
    expected = sum(fn(z[k], t, y) for k, fn in enumerate(LOSSES))
    assert torch.allclose(fused_loss(z, t, y, LOSSES), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="2 losses for 3"):
        fused_loss(z, t, y, LOSSES[:2])


def test_members_must_share_architecture_and_bits():
    with pytest.raises(ValueError, match="at least one"):
        FusedStudents([])
    with pytest.raises(ValueError, match="architecture"):
        FusedStudents([build("vgg7"), build("vgg7-wide")])
    with pytest.raises(ValueError, match="layer 0"):
        FusedStudents([build("vgg7", weight_bits=2, scheme="homework"), build("vgg7", weight_bits=4,
                                                                             scheme="homework")])
    with pytest.raises(ValueError, match="layer 4"):
        FusedStudents([build("vgg7", weight_bits=2), build("vgg7", weight_bits=4)])
    with pytest.raises(ValueError, match="nn.Sequential"):
        FusedStudents([nn.Linear(3, 3)])


def test_dorefa_svhn_fuses_and_splits_back():
    torch.manual_seed(0)
    members = [build("dorefa-svhn", weight_bits=2, act_bits=2) for _ in range(2)]
    for m in members:
        m.eval()
    fused = FusedStudents(members)
    assert not fused.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert (fused(x) - torch.stack([m(x) for m in members])).abs().max() < 1e-5
    for a, b in zip(members, fused.split()):
        assert type(b) is type(a) and b.arch == a.arch
        for (name, s), t in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(s, t), name


def test_channels_last_gives_the_same_logits():
    members = _members(2, weight_bits=2, act_bits=1)
    fused = FusedStudents(members).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        a = fused(x)
        b = fused.to_channels_last()(x)
    assert fused.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (a - b).abs().max() < 1e-4
    assert fused.split()[0][0].weight.is_contiguous()


def test_measure_step_rate_runs():
    assert measure_step_rate(k=2, batch=4, steps=1, warmup=1) > 0
    assert measure_step_rate(k=1, batch=4, steps=1, warmup=1, channels_last=False) > 0
