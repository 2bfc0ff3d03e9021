"""The Q1-Q4 losses against values computed independently with numpy, and the teacher
terms (kl, dkd, ls, dist) against direct float64 implementations of their papers."""
import numpy as np
import pytest
import torch

from qdistill import cli
from qdistill.errors import UserError
from qdistill.nn import KD_DEFAULTS, KD_TERMS
from qdistill.nn.losses import LossError, build_loss, dkd_parts, standardize

from conftest import SMALL

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
    with pytest.raises(LossError):
        build_loss("soft", 0.0)
    with pytest.raises(LossError):
        build_loss("soft", -1.0)
    with pytest.raises(LossError):
        build_loss("kl")
    with pytest.warns(UserWarning):
        build_loss("soft", 0.5)


# ---------------------------------------------------------------- teacher terms (float64)
#
# Each term against a direct float64 implementation written from its paper's formula (in
# torch, so autograd gives the formula's gradient by the chain rule), computed another
# way than `qdistill.nn.losses` does (p_hat = p / (1 - p_y) rather than a masked
# log-softmax, KL as sum q log(q / p), explicit means and norms). Both are float64
# evaluations of one function on O(1) values with < 100 operations each, condition below
# 1e2 here (logits within +-6, T >= 1): they differ by < 100 * 1e2 * u64 ~ 1e-12, so
# F64 = 1e-10 is a bound, while every wrong variant tried (T on one side only, Bessel's
# correction dropped, eps moved or 1e-8 for 1e-7, NCKD over all classes, rows for
# columns) moves values by more than 1e-7.
F64 = 1e-10
N, C = 6, 5


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (N,), generator=g)
    return z, t, y


def kl_rows(q, p):
    return (q * (q.log() - p.log())).sum(-1)


def direct_dkd_parts(z, t, y, T):
    p, q = torch.softmax(z / T, -1), torch.softmax(t / T, -1)
    py, qy = p.gather(1, y[:, None])[:, 0], q.gather(1, y[:, None])[:, 0]
    tckd = kl_rows(torch.stack([qy, 1 - qy], -1), torch.stack([py, 1 - py], -1))
    keep = ~torch.nn.functional.one_hot(y, C).bool()
    p_hat = p[keep].view(N, C - 1) / (1 - py)[:, None]
    q_hat = q[keep].view(N, C - 1) / (1 - qy)[:, None]
    return tckd, kl_rows(q_hat, p_hat)


def direct_ls(z, t, T):
    def s(v):
        m = v.sum(-1, keepdim=True) / C
        sd = (((v - m) ** 2).sum(-1, keepdim=True) / (C - 1)).sqrt()
        return (v - m) / (sd + 1e-7)
    q = torch.softmax(s(t) / T, -1)
    return -(q * torch.log_softmax(s(z) / T, -1)).sum(-1).mean()


def direct_dist(z, t, T, beta, gamma):
    P, Q = torch.softmax(z / T, -1), torch.softmax(t / T, -1)

    def rho(a, b):  # rows
        a, b = a - a.sum(-1, keepdim=True) / a.shape[-1], b - b.sum(-1, keepdim=True) / b.shape[-1]
        return (a * b).sum(-1) / ((a * a).sum(-1).sqrt() * (b * b).sum(-1).sqrt() + 1e-8)
    return beta * (1 - rho(P, Q).sum() / N) + gamma * (1 - rho(P.T, Q.T).sum() / C)


def value_and_grad(fn, z):
    z = z.detach().clone().requires_grad_(True)
    v = fn(z)
    v.backward()
    return v.item(), z.grad


def assert_same(a, b):
    """Values and gradients of two float64 evaluations, within F64 (relative to the size)."""
    (va, ga), (vb, gb) = a, b
    assert abs(va - vb) <= F64 * max(1.0, abs(vb)), (va, vb)
    assert (ga - gb).abs().max().item() <= F64 * max(1.0, gb.abs().max().item())


@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0)])
def test_dkd_is_the_papers_formula(T, alpha, beta):
    z, t, y = batch(1)
    loss = build_loss("soft", T, kd="dkd", dkd_alpha=alpha, dkd_beta=beta)
    want = value_and_grad(lambda v: (alpha * direct_dkd_parts(v, t, y, T)[0]
                                     + beta * direct_dkd_parts(v, t, y, T)[1]).mean(), z)
    assert_same(value_and_grad(lambda v: loss(v, t, y), z), want)
    assert loss.kd == "dkd" and loss.needs_teacher and loss.options["dkd_beta"] == beta


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_parts_decompose_kl_per_image(T):
    """Zhao et al.'s eq. 6, ``KL(q || p) = TCKD + (1 - q_y) NCKD``, per image: DKD with
    alpha = 1 and beta = 1 - q_y is KD."""
    z, t, y = batch(2)
    tckd, nckd = dkd_parts(z, t, y, T)
    p, q = torch.softmax(z / T, -1), torch.softmax(t / T, -1)
    qy = q.gather(1, y[:, None])[:, 0]
    kl = kl_rows(q, p)
    assert (tckd + (1 - qy) * nckd - kl).abs().max().item() <= F64
    assert tckd.shape == nckd.shape == (N,) and (nckd > 1e-3).all() and (tckd > 1e-4).any()
    # and the unreduced parts are the direct ones, gradients included
    for k in (0, 1):
        assert_same(value_and_grad(lambda v: dkd_parts(v, t, y, T)[k].sum(), z),
                    value_and_grad(lambda v: direct_dkd_parts(v, t, y, T)[k].sum(), z))


def test_dkd_survives_a_certain_teacher():
    """A teacher sure of the label (q_y = 1 in float64): no NaN, and NCKD's teacher
    distribution is still well defined (softmax over the other classes)."""
    z, t, y = batch(3)
    t = t.clone()
    t[torch.arange(N), y] = 800.0
    loss = build_loss("soft", 1.0, kd="dkd")(z, t, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_ls_is_the_papers_formula(T):
    z, t, y = batch(4)
    loss = build_loss("hard+soft", T, kd="ls")
    hard_part = lambda v: torch.nn.functional.cross_entropy(v, y)
    assert_same(value_and_grad(lambda v: loss(v, t, y), z),
                value_and_grad(lambda v: hard_part(v) + T * T * direct_ls(v, t, T), z))


def test_ls_is_invariant_to_shift_and_positive_scale():
    """``S(a v + b) = (v - m) / (sd + 1e-7 / a)``: a shift changes nothing but float64
    rounding, a scale moves each standardised logit by ``|v - m| 1e-7 |1 - 1/a| / sd**2``
    at most (exact algebra). CE(softmax(u / T), w / T) changes by at most
    ``(2 / T) (max|dw| + (max|log softmax(w / T)| + 1) max|du|)`` (softmax's Jacobian maps
    max-norm to 1-norm with factor 2; the + 1 covers log p moving along the way). Plain KD
    on the same change moves by more than 0.1."""
    z, t, y = batch(5)
    T = 2.0
    loss = build_loss("soft", T, kd="ls")
    base = loss(z, t, y).item()

    def moved(v, a):
        sd = v.std(-1, keepdim=True)
        return ((v - v.mean(-1, keepdim=True)).abs() * 1e-7 * abs(1 - 1 / a) / sd**2).max().item()
    log_p = torch.log_softmax(standardize(z.detach()) / T, -1).abs().max().item()
    for a_z, b_z, a_t, b_t in ((1.0, 7.0, 1.0, -3.0), (3.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.25, 2.0),
                               (5.0, -1.0, 9.0, 4.0)):
        got = loss(a_z * z + b_z, a_t * t + b_t, y).item()
        bound = (2 / T) * (moved(z.detach(), a_z) + (log_p + 1) * moved(t, a_t)) + F64
        assert abs(got - base) <= bound, (a_z, b_z, a_t, b_t, got - base, bound)
    kd = build_loss("soft", T)
    assert abs(kd(3.0 * z, t, y).item() - kd(z, t, y).item()) > 0.1


@pytest.mark.parametrize("beta,gamma", [(1.0, 1.0), (2.0, 0.5)])
def test_dist_is_the_papers_formula(beta, gamma):
    z, t, y = batch(6)
    T = 4.0
    loss = build_loss("soft", T, kd="dist", dist_beta=beta, dist_gamma=gamma)
    assert_same(value_and_grad(lambda v: loss(v, t, y), z),
                value_and_grad(lambda v: direct_dist(v, t, T, beta, gamma), z))


def test_dist_is_zero_when_the_distributions_agree():
    """P = Q: each correlation is ``|a|^2 / (|a|^2 + 1e-8)``, so the loss is
    ``beta mean_i 1e-8 / (|a_i|^2 + 1e-8) + gamma mean_j ...`` (``a`` the centred rows,
    then columns), below 1e-5 here, plus float64 rounding; with P != Q it is far from 0."""
    z, _, y = batch(7)
    zd = z.detach()
    loss = build_loss("soft", 1.0, kd="dist")
    got = loss(zd, zd.clone(), y).item()
    P = torch.softmax(zd, -1)
    eps_part = lambda M: (1e-8 / (((M - M.mean(-1, keepdim=True)) ** 2).sum(-1) + 1e-8)).mean().item()
    bound = eps_part(P) + eps_part(P.T) + F64
    assert 0 <= got <= bound < 1e-5
    assert loss(zd, batch(8)[1], y).item() > 0.1


def test_dist_needs_the_whole_batch():
    """Its intra-class term correlates columns over the batch: the loss of a batch is not
    the mean of its halves' (what a fused group must therefore not split)."""
    z, t, y = batch(9)
    loss = build_loss("soft", 1.0, kd="dist")
    whole = loss(z, t, y).item()
    halves = (loss(z[:3], t[:3], y[:3]).item() + loss(z[3:], t[3:], y[3:]).item()) / 2
    assert abs(whole - halves) > 1e-3


@pytest.mark.parametrize("kd", ["kl", "dkd", "ls", "dist"])
def test_soft_weight_and_terms(kd):
    """``loss(z, t, y, w)`` is hard + w * c * term (Q3), w * term (Q2), hard + w * c *
    CE(onehot(y), z / T) (Q4), hard (Q1); `terms` gives the two parts as they enter."""
    z, t, y = batch(10)
    T, c, w = 3.0, 2.5, 0.3
    hard_v = torch.nn.functional.cross_entropy(z, y)
    term = build_loss("soft", T, kd=kd)(z, t, y)  # w = 1: the term itself
    gt = torch.nn.functional.cross_entropy(z / T, y)
    cases = {"hard": (hard_v, None), "soft": (hard_v, term), "hard+soft": (hard_v, c * term),
             "hard+softgt": (hard_v, c * gt)}
    for name, (h, s) in cases.items():
        loss = build_loss(name, T, c, kd=kd)
        got_h, got_s = loss.terms(z, t, y)
        assert torch.equal(got_h, h)
        assert (got_s is None) == (s is None) and (s is None or abs(got_s.item() - s.item()) <= F64)
        want = {"hard": h, "soft": w * term, "hard+soft": h + w * c * term, "hard+softgt": h + w * c * gt}[name]
        assert abs(loss(z, t, y, soft_weight=w).item() - want.item()) <= F64
        assert abs(loss(z, t, y, soft_weight=0.0).item() - (0.0 if name == "soft" else h.item())) <= F64


def test_kd_changes_only_the_teacher_term():
    z, t, y = batch(11)
    for name in ("hard", "hard+softgt"):
        ref = build_loss(name, 2.0)(z, t, y)
        for kd in ("dkd", "ls", "dist"):
            assert torch.equal(build_loss(name, 2.0, kd=kd)(z, t, y), ref)
    for name in ("soft", "hard+soft"):
        values = {build_loss(name, 2.0, kd=kd)(z, t, y).item() for kd in ("kl", "dkd", "ls", "dist")}
        assert len(values) == 4


def test_kl_default_is_the_old_soft_term_bit_for_bit():
    """kd="kl" with soft_weight 1 computes what the closures did: CE(softmax(t/T), z/T)."""
    z, t, y = batch(12)
    T = 4.0
    old = -(torch.softmax(t / T, -1) * torch.log_softmax(z / T, -1)).sum(-1).mean()
    assert torch.equal(build_loss("soft", T)(z, t, y), 1.0 * old)
    old3 = torch.nn.functional.cross_entropy(z, y) + T * T * old
    assert torch.equal(build_loss("hard+soft", T)(z, t, y), old3)


def test_kd_names_and_options_are_checked():
    assert KD_TERMS == ("kl", "dkd", "ls", "dist")
    assert KD_DEFAULTS == {"dkd_alpha": 1.0, "dkd_beta": 8.0, "dist_beta": 1.0, "dist_gamma": 1.0}
    loss = build_loss("hard+soft", 2.0, kd="dkd")
    assert (loss.loss_name, loss.temperature, loss.c, loss.kd) == ("hard+soft", 2.0, 4.0, "dkd")
    assert loss.needs_teacher
    assert loss.options == KD_DEFAULTS
    with pytest.raises(LossError, match="unknown distillation term"):
        build_loss("soft", kd="crd")
    with pytest.raises(LossError, match="unknown distillation option"):
        build_loss("soft", kd="dkd", dkd_gamma=1.0)
    with pytest.raises(LossError, match="dkd_beta"):
        build_loss("soft", kd="dkd", dkd_beta=float("nan"))
    assert not build_loss("hard+softgt", kd="dist").needs_teacher


def test_a_bad_loss_is_the_librarys_own_value_error_and_one_line_exit_2_at_the_cli(tmp_path, capsys):
    """The library raises its own `LossError` (a ValueError, not the CLI's ConfigError);
    the CLI prints the same bad input as one line, exit 2 (issue 30, item 4)."""
    with pytest.raises(LossError, match="dkd_beta must be a finite number") as refused:
        build_loss("hard", dkd_beta=float("inf"))
    assert isinstance(refused.value, ValueError) and not isinstance(refused.value, UserError)
    out = tmp_path / "r"
    code = cli.main(["student", *SMALL, "--epochs", "1", "--set", "student.dkd_beta=inf", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dkd_beta" in err[0] and err[0].startswith("qdistill: error: ")
    assert not out.exists()
