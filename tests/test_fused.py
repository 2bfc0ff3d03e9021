"""FusedStudents: K members trained as one grouped network match K separate runs.

Where the claim is "the same computation" (fused members against separate models) the
comparison runs in float64. The two paths then differ only by the rounding of grouped
against plain kernels, about 1e-16 relative per operation; twenty Adam steps amplify
that by at most a few thousand (Adam divides by sqrt(v) + eps, which magnifies
differences in gradients near eps; measured in float32 the amplification was ~1e3), so
differences stay below 1e-11. The bound used, 1e-7, is four orders above that and five
below what any real coupling of members gives (statistics over the fused tensor move
weights by ~1e-2). These bounds hold on any x86-64 CPU: no float32 last bits decide them.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from qdistill.nn.fused import FusedStudents, Solo
from qdistill.nn.layers import QuantConv2d, QuantLinear
from qdistill.nn.losses import build_loss
from qdistill.nn.models import build
from qdistill.nn.quantizers import dorefa_gradient, dorefa_weight, homework_weight
from qdistill.training.step import train_step as engine_step

FP64 = 1e-7  # the float64 bound derived in the module docstring

LOSSES = [build_loss("hard"), build_loss("soft", temperature=4.0), build_loss("hard+soft", temperature=2.0)]


@pytest.fixture(autouse=True)
def one_thread():
    """Equivalence is asserted with one thread: with several, a grouped convolution and
    K plain ones split their reductions differently and training amplifies the
    difference chaotically (measured in float32 on 2 threads: 6e-2 after 20 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _members(k, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return [build("vgg7", **kw).to(dtype) for _ in range(k)]


def _batches(n, size=32, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 3, 32, 32, generator=g).to(dtype), (torch.randn(size, 10, generator=g) * 3).to(dtype),
             torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def train_step(net, opt, x, t, y, losses):
    return engine_step(net, opt, x, y, t, losses, contextlib.nullcontext())


def _train_both(members, steps, losses, size=8, dtype=torch.float64, **adam):
    """Train deep copies of ``members`` one by one and fused on the same batches.
    Returns (separate models, fused, max |logit difference| over all steps)."""
    separate = [copy.deepcopy(m) for m in members]
    fused = FusedStudents(members)
    opts = [torch.optim.Adam(m.parameters(), lr=0.01, **adam) for m in separate]
    fopt = torch.optim.Adam(fused.parameters(), lr=0.01, **adam)
    worst = 0.0
    for x, t, y in _batches(steps, size, dtype=dtype):
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
    assert worst_logit < FP64
    split = fused.split()
    moved = 0.0
    for m0, ms, mf in zip(members, separate, split):
        for (name, a), b, c in zip(ms.state_dict().items(), mf.state_dict().values(),
                                   m0.state_dict().values()):
            assert (a - b).abs().max().item() < FP64, name
            moved = max(moved, (a - c).abs().max().item())
    assert moved > 0.05  # the members really trained (and the fused members did too)


@pytest.mark.parametrize("scheme", ["dorefa", "homework"])
def test_w2a1_members_quantized_weights_match_separate_runs(scheme):
    members = _members(3, seed=2, dtype=torch.float32, weight_bits=2, act_bits=1, scheme=scheme)
    separate, fused, _ = _train_both(members, 3, LOSSES, dtype=torch.float32)
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


def _states_within(a: dict, b: dict, bound: float) -> None:
    for (name, x), y in zip(a.items(), b.values()):
        if x.is_floating_point():
            assert (x - y).abs().max().item() < bound, name
        else:  # BN's counts, LSQ's flags
            assert torch.equal(x, y), name


LSQ = dict(weight_bits=2, act_bits=2, scheme="lsq", quantize_first_last=True)


def test_lsq_members_match_separate_runs():
    """LSQ in float64: every member's steps -- the first conv's (shared input, ``(K,)``),
    the grouped convs' ``(K,)``, the linear's ``(K, 1)``, the activation quantizers'
    ``(K,)`` set from each member's own channels on the first batch -- and everything else
    match K separate runs within the float64 bound of the module docstring.

    A quantizer is discontinuous (its level, and its STE mask at the range's bounds), so
    the claim needs its inputs off those points by more than float64 rounding. Generic
    values are (a difference of ~1e-15 crosses a level boundary with probability ~1e-10
    over these steps), but one kind is not: LSQ makes each conv output a lattice
    ``s_w * s_a * integer``, so an output often equals its channel's batch mean exactly,
    and BatchNorm maps it to its shift beta, computed as ``beta +- 1e-16`` by kernels that
    reduce in different orders. At beta = 0 (PyTorch's init) that is the activation
    quantizer's lower bound, where the STE mask ``v / s > 0`` takes the rounding's sign
    (measured: 3 such elements in a layer's 49152 at the first step, after which Adam
    turns gradient differences of 1e-5 into weight differences of 2 * lr). So the BN
    shifts start away from 0, as any trained student's are."""
    members = _members(3, seed=6, **LSQ)
    with torch.no_grad():
        for m in members:
            for bn in (layer for layer in m if isinstance(layer, nn.BatchNorm2d)):
                bn.bias.uniform_(0.05, 0.3)
    separate, fused, worst_logit = _train_both(members, 20, LOSSES)
    assert worst_logit < FP64
    split = fused.split()
    for ms, mf in zip(separate, split):
        _states_within(ms.state_dict(), mf.state_dict(), FP64)
    steps = [n for n in split[0].state_dict() if n.endswith("step")]
    assert len(steps) == 15  # 7 convs and the linear, 7 activation quantizers
    moved = max((a.state_dict()[n] - b.state_dict()[n]).abs().max().item()
                for a, b in zip(members, split) for n in steps)
    assert moved > 1e-3  # the steps really trained


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
    assert (fz - sz).abs().max().item() < FP64
    # BN running statistics came back as trained, member by member.
    bn = [i for i, layer in enumerate(fused.net) if isinstance(layer, nn.BatchNorm2d)]
    for i in bn:
        c = fused.net[i].num_features // 3
        for k, m in enumerate(split):
            assert torch.equal(m[i].running_mean, fused.net[i].running_mean[k * c:(k + 1) * c])
            assert torch.equal(m[i].running_var, fused.net[i].running_var[k * c:(k + 1) * c])
            assert m[i].num_batches_tracked.item() == 3
    assert not torch.equal(split[0][bn[0]].running_mean, split[1][bn[0]].running_mean)


@pytest.mark.parametrize("quantizer,bits", [(dorefa_weight, 2), (dorefa_weight, 1), (homework_weight, 2)])
def test_weight_quantization_is_per_member(quantizer, bits):
    torch.manual_seed(0)
    # Members on scales 100x apart: statistics over the fused tensor would crush member 0.
    ws = [torch.randn(8, 4, 3, 3) * s for s in (0.01, 1.0, 0.3)]
    w = torch.cat(ws).requires_grad_()
    q = quantizer(w, bits, members=3)
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
    dorefa_gradient(x, 2, members=2).backward(g)
    gq = x.grad.unflatten(1, (2, 5))
    m = g.unflatten(1, (2, 5)).abs().amax(dim=(2, 3, 4), keepdim=True)
    # 2-bit levels are 2m(c/3 - 1/2) with m the block's own max: {-m, -m/3, m/3, m}.
    codes = (gq / (2 * m) + 0.5) * 3
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert gq[:, 1].abs().max() <= m[:, 1].max() * (1 + 1e-6)


def test_the_step_takes_each_members_own_loss():
    x, t, y = _batches(1, size=8)[0]
    fused = FusedStudents(_members(3))
    opt = torch.optim.Adam(fused.parameters(), lr=0.01)
    per_member, z = train_step(fused, opt, x, t, y, LOSSES)
    expected = torch.stack([fn(z[k], t, y) for k, fn in enumerate(LOSSES)])
    assert torch.equal(per_member, expected)  # the same float64 ops on the same logits
    assert len({round(v, 6) for v in per_member.tolist()}) == 3  # three different losses
    with pytest.raises(ValueError, match="2 losses for 3"):
        train_step(fused, opt, x, t, y, LOSSES[:2])


def test_members_must_share_architecture_and_bits():
    with pytest.raises(ValueError, match="at least one"):
        FusedStudents([])
    with pytest.raises(ValueError, match="another architecture"):
        FusedStudents([build("vgg7"), build("dorefa-svhn")])
    with pytest.raises(ValueError, match=r"layer 0: QuantConv2d\(3, 64"):  # vgg7-wide: the first layer differs
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
    members = [build("dorefa-svhn", weight_bits=2, act_bits=2).double() for _ in range(2)]
    for m in members:
        m.eval()
    fused = FusedStudents(members)
    assert not fused.training
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (fused(x) - torch.stack([m(x) for m in members])).abs().max() < FP64
    for a, b in zip(members, fused.split()):
        assert type(b) is type(a)
        for (name, s), t in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(s, t), name


def test_channels_last_gives_the_same_logits():
    members = _members(2, weight_bits=2, act_bits=1)
    fused = FusedStudents(members).eval()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a = fused(x)
        b = fused.to_channels_last()(x)
    assert fused.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (a - b).abs().max() < FP64
    assert fused.split()[0][0].weight.is_contiguous()


def test_solo_is_the_model_as_a_group_of_one():
    model = _members(1)[0]
    solo = Solo(model)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(solo(x), model(x).unsqueeze(0))
    assert solo.split()[0] is model
    assert list(solo.state_dict()) == list(model.state_dict())  # a run's checkpoint holds the plain model


@pytest.mark.parametrize("kw", [dict(weight_bits=2, act_bits=1), LSQ], ids=["dorefa", "lsq"])
def test_a_split_member_with_its_optimizer_slice_trains_on_like_the_group(kw):
    members = _members(3, **kw)
    fused = FusedStudents(members)
    opt = torch.optim.Adam(fused.parameters(), lr=0.01)
    batches = _batches(4, 8)
    for x, t, y in batches[:3]:
        train_step(fused, opt, x, t, y, LOSSES)
    split = fused.split()
    state = copy.deepcopy(opt.state_dict())  # the live state moves on with the next step
    x, t, y = batches[3]
    train_step(fused, opt, x, t, y, LOSSES)  # one more step, fused
    for i, member in enumerate(split):
        mine = torch.optim.Adam(member.parameters(), lr=0.01)
        mine.load_state_dict(fused.split_optimizer_state(state, i))
        assert all(s["step"] == 3 for s in mine.state_dict()["state"].values()), [s["step"] for s in mine.state_dict()["state"].values()]
        train_step(Solo(member), mine, x, t, y, LOSSES[i:i + 1])  # and the same step alone
        _states_within(member.state_dict(), fused.split()[i].state_dict(), FP64)
    # Without the optimizer slice (fresh Adam) the step would differ: the check can fail.
    fresh = fused.split()[0]
    moved = copy.deepcopy(split[0])
    train_step(Solo(moved), torch.optim.Adam(moved.parameters(), lr=0.01), x, t, y, LOSSES[:1])
    assert max((a - b).abs().max().item() for a, b in zip(moved.parameters(), fresh.parameters())) > 1e-4
