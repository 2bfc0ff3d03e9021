"""The memory-light autograd nodes (activation quantizer, max-pool) give exactly the
values and gradients of the plain torch expressions, and save fewer bytes for backward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from qdistill.nn.autograd import CHUNK as _CHUNK
from qdistill.nn.layers import MaxPool2d
from qdistill.nn.quantizers import dorefa_activation, homework_activation, quantize_k


def _saved_bytes(fn, x):
    """Bytes autograd keeps for backward while ``fn(x)`` is alive."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return out, sum(sizes)


def _plain_dorefa(x, bits):
    return quantize_k(torch.clamp(x, 0.0, 1.0), bits)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_activation_matches_clamp_then_round(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 5, generator=g) * 0.8 + 0.5
    x.view(-1)[:6] = torch.tensor([0.0, 1.0, -0.0, 0.5, float("nan"), 1.0 + 2**-23])  # bounds and ties
    up = torch.randn(x.shape, generator=g)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = dorefa_activation(a, bits), _plain_dorefa(b, bits)
    assert torch.equal(ya.nan_to_num(-1.0), yb.nan_to_num(-1.0))
    (ya.nan_to_num() * up).sum().backward()
    (yb.nan_to_num() * up).sum().backward()
    assert torch.equal(a.grad, b.grad)
    # the gradient passes at both bounds (as torch.clamp's), not for NaN or just above 1
    assert a.grad.view(-1)[:6].tolist() == [up.view(-1)[0].item(), up.view(-1)[1].item(),
                                            up.view(-1)[2].item(), up.view(-1)[3].item(), 0.0, 0.0]


@pytest.mark.parametrize("x_format,g_format", [(torch.contiguous_format, torch.contiguous_format),
                                               (torch.channels_last, torch.channels_last),
                                               (torch.channels_last, torch.contiguous_format)])
def test_activation_gradient_in_every_layout(x_format, g_format):
    """The backward's chunked product over the flat storage (several chunks here) equals
    ``torch.where``, keeps the incoming gradient's layout, and falls back when layouts differ."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(5, 8, 128, 160, generator=g) * 1.6 - 0.3).contiguous(memory_format=x_format)
    assert x.numel() > 3 * _CHUNK and x.numel() % _CHUNK  # a partial last chunk too
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, -2**-24, 1.0 + 2**-23])  # bounds, just outside
    up = torch.randn(x.shape, generator=g).contiguous(memory_format=g_format)
    a = x.clone(memory_format=torch.preserve_format).requires_grad_()
    (grad,) = torch.autograd.grad(dorefa_activation(a, 1), a, up)
    assert torch.equal(grad, torch.where((x >= 0) & (x <= 1), up, 0.0))
    if x_format == g_format:  # the fast path keeps the layout; the fallback is torch.where's
        assert grad.stride() == up.stride()
    assert grad[0, 0, 0, :4].tolist() == up[0, 0, 0, :2].tolist() + [0.0, 0.0]


def test_homework_activation_matches_clamp_then_round():
    x = torch.linspace(-3.0, 13.0, 400).reshape(4, 100)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    homework_activation(a, 2).pow(2).sum().backward()
    quantize_k(torch.clamp(0.1 * b, 0.0, 1.0), 2).pow(2).sum().backward()
    assert torch.equal(a.grad, b.grad) and a.grad.abs().sum() > 0


def test_activation_saves_a_one_byte_mask():
    x = torch.randn(8, 16, 8, 8, requires_grad=True)
    _, light = _saved_bytes(lambda t: dorefa_activation(t, 1), x)
    _, plain = _saved_bytes(lambda t: _plain_dorefa(t, 1), x)
    assert light == x.numel() and plain >= 4 * x.numel()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maxpool_matches_torch_on_ties(channels_last, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2, (3, 5, 8, 8), generator=g).to(dtype)  # {0, 1}: ties in most windows
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    up = torch.randn(3, 5, 4, 4, generator=g).to(dtype)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = MaxPool2d(2)(a), nn.MaxPool2d(2)(b)
    (ya * up).sum().backward()
    (yb * up).sum().backward()
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
    assert a.grad.stride() == b.grad.stride()


def test_maxpool_saves_int32_indices_only():
    x = torch.rand(4, 8, 16, 16, requires_grad=True)
    _, light = _saved_bytes(MaxPool2d(2), x)
    _, plain = _saved_bytes(lambda t: F.max_pool2d(t, 2), x)
    assert light == 4 * x.numel() // 4 and plain == 4 * x.numel() + 8 * x.numel() // 4


def test_maxpool_falls_back_without_grad_and_for_odd_settings():
    x = torch.rand(2, 3, 7, 7, requires_grad=True)
    for pool in (MaxPool2d(3, stride=2, padding=1), MaxPool2d(2, ceil_mode=True)):
        ref = nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)
        assert torch.equal(pool(x), ref(x))
    with torch.no_grad():
        assert torch.equal(MaxPool2d(2)(x), F.max_pool2d(x, 2))
