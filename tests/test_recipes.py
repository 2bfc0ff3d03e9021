"""Recipes (``train.recipe``), the per-step schedule, the weight average and the compiled
step: each formula against a hand computation, the layering of a recipe under the
user's keys, and a compiled step against the eager one in float64."""
import contextlib
import copy

import pytest
import torch

from qdistill import cli
from qdistill.bench.step_rate import students
from qdistill.config import DEFAULTS
from qdistill.errors import ConfigError
from qdistill.nn.fused import group
from qdistill.nn.layers import MaxPool2d, QuantAct, QuantConv2d, QuantLinear
from qdistill.nn.losses import build_loss
from qdistill.resolve import resolve
from qdistill.training import compiled
from qdistill.training.averaging import Average
from qdistill.training.optim import make_optimizer, set_lr
from qdistill.training.recipes import DEFAULT, RECIPES
from qdistill.training.schedule import extends_exactly, lr_factor
from qdistill.training.step import train_step


def test_the_defaults_are_the_default_recipe_and_every_recipe_names_the_same_keys():
    assert DEFAULTS["train"]["recipe"] == DEFAULT
    assert {k: DEFAULTS["train"][k] for k in RECIPES[DEFAULT]} == RECIPES[DEFAULT]
    assert all(r.keys() == RECIPES["course"].keys() for r in RECIPES.values())
    assert resolve()["train"] == resolve(flags={"train": {"recipe": DEFAULT}})["train"]
    course = resolve(flags={"train": {"recipe": "course"}})["train"]  # the course's recipe, as before recipes
    assert (course["lr"], course["batch_size"], course["schedule"], course["ema"]) == (0.01, 256, "course", 0.0)


def test_a_recipe_lies_under_every_key_the_user_sets(tmp_path):
    fast = resolve(flags={"train": {"recipe": "fast"}})["train"]
    assert {k: fast[k] for k in RECIPES["fast"]} == RECIPES["fast"]
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\nrecipe = "fast"\nlr = 0.0123\n')
    t = resolve(toml, flags={"train": {"batch_size": 7}}, sets=["train.warmup=0.5"])["train"]
    assert (t["lr"], t["batch_size"], t["warmup"], t["schedule"]) == (0.0123, 7, 0.5, RECIPES["fast"]["schedule"])
    # a later layer's recipe wins, and the earlier layer's explicit keys still hold
    t = resolve(toml, flags={"train": {"recipe": "course"}})["train"]
    assert (t["recipe"], t["lr"], t["schedule"], t["batch_size"]) == ("course", 0.0123, "course", 256)


def test_an_unknown_recipe_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(ConfigError, match="train.recipe must be one of course, fast, got 'quick'"):
        resolve(sets=["train.recipe=quick"])
    with pytest.raises(SystemExit) as exit_:
        cli.main(["student", "--recipe", "quick", "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2
    assert "invalid choice: 'quick'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_linear_schedule_rises_then_falls_per_step():
    # S = 5 steps x 2 epochs = 10, W = round(0.2 * 10) = 2
    got = [lr_factor(i, 5, 2, "linear", 0.2) for i in range(10)]
    assert got == [1 / 2, 2 / 2] + [(10 - i) / 8 for i in range(2, 10)]
    assert lr_factor(0, 5, 2, "linear", 0.0) == 1.0  # no warm-up: the peak, then down
    # course and cosine still change per epoch, whatever the steps per epoch
    assert [lr_factor(i, 3, 4, "course") for i in range(12)] == [1.0] * 3 + [0.1] * 6 + [0.05] * 3
    assert not extends_exactly(1, 4, 8, "linear", 0.2, steps_per_epoch=5)
    assert extends_exactly(1, 4, 8, "course")


def test_set_lr_sets_peak_times_factor():
    cfg = {"train": {"optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0, "epochs": 2, "schedule": "linear",
                     "warmup": 0.25}}
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert set_lr(opt, cfg, 0, 4) == 0.5 * 1 / 2 and opt.param_groups[0]["lr"] == 0.25
    assert set_lr(opt, cfg, 7, 4) == 0.5 * 1 / 6


def test_average_follows_the_warmed_up_decay_in_float64():
    net = torch.nn.BatchNorm1d(2).double()
    avg = Average(net, decay=0.9)
    w0 = net.weight.detach().clone()
    expected = w0.clone()
    for n, value in enumerate([3.0, -1.0, 5.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
            net.num_batches_tracked.fill_(10 * n)
        avg.update()
        d = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13: still below 0.9
        expected = d * expected + (1 - d) * value
        # lerp's a + (1 - d)(w - a) rounds otherwise than d a + (1 - d) w: a few ulps of |w| <= 5
        assert (avg.state["weight"] - expected).abs().max() <= 5 * 5 * 2 ** -52
        assert avg.state["num_batches_tracked"].item() == 10 * n  # integers copied
    assert torch.equal(avg.network(net).weight.detach(), avg.state["weight"])
    other = Average(net, 0.9)
    other.load_state_dict(copy.deepcopy(avg.state_dict()))
    assert other.updates == 3 and torch.equal(other.state["weight"], avg.state["weight"])


def test_auto_compiles_long_runs_only():
    cfg = {"train": {"compile": "auto"}}
    cpu = torch.device("cpu")
    assert not compiled.wanted(cfg, compiled.AUTO_IMAGES - 1, cpu)
    assert compiled.wanted(cfg, compiled.AUTO_IMAGES, cpu) == compiled.has_compiler()
    assert compiled.wanted({"train": {"compile": True}}, 1, cpu)
    assert not compiled.wanted({"train": {"compile": False}}, 10 ** 9, cpu)


def _batches(n_list, dtype, channels_last=True):
    g = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for n in n_list:
        yield (torch.rand(n, 3, 32, 32, generator=g, dtype=dtype).contiguous(memory_format=layout),
               torch.randint(0, 10, (n,), generator=g), torch.randn(n, 10, generator=g, dtype=dtype))


def _small_student():
    """vgg7's kinds of layer (a full-precision first convolution, a W2 hidden one,
    BatchNorm, A1 activations, pooling, a linear head), two convolutions of its seven: the
    compile takes a few seconds instead of vgg7's 15-35 s here, the arithmetic is alike."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        QuantConv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), QuantAct(1), MaxPool2d(2),
        QuantConv2d(8, 16, 3, padding=1, bias=False, weight_bits=2), torch.nn.BatchNorm2d(16), QuantAct(1),
        torch.nn.AvgPool2d(16), torch.nn.Flatten(), QuantLinear(16, 10))


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_compiled_step_matches_eager_in_float64_with_one_graph_for_every_batch_size(channels_last):
    """Inductor reorders and fuses the same float64 arithmetic. Each step's results carry
    a relative rounding error of about (terms in the longest sum) x 2^-53 <= 6.6e4 x
    1.1e-16 = 7e-12 (BatchNorm's sums over 64 x 32 x 32 values), and Adam's update
    lr * m / (sqrt(v) + eps) passes it on without growth; a quantizer flip would need a
    latent weight within 1e-13 of a threshold. Five steps stay far below the bound 1e-9, which a wrong formula (a missed
    term, a float32 step) exceeds by orders of magnitude. The loop trains channels_last;
    contiguous tensors once took the quantizers' eager-only chunked mask product, which
    fixed the batch size into the graph and failed on the next one."""
    import torch._dynamo.utils as dynamo_utils
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    net = group([_small_student()]).double()
    net = net.to_channels_last() if channels_last else net
    ref = copy.deepcopy(net)
    cfg = {"train": {"optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "epochs": 2, "schedule": "linear",
                     "warmup": 0.2}}
    opt, opt_ref = make_optimizer(net.parameters(), cfg), make_optimizer(ref.parameters(), cfg)
    loss, step = build_loss("hard+soft", 4.0, 16.0), compiled.CompiledStep()
    for i, (x, y, t) in enumerate(_batches([64, 64, 17, 64, 17], torch.float64, channels_last)):
        set_lr(opt, cfg, i, 3), set_lr(opt_ref, cfg, i, 3)
        got, _ = step(net, opt, x, y, t, [loss], contextlib.nullcontext())
        want, _ = train_step(ref, opt_ref, x, y, t, [loss], contextlib.nullcontext())
        assert abs(got.item() - want.item()) <= 1e-9 * abs(want.item())
    assert step.compiled
    for (k, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        if a.is_floating_point():
            assert (a - b).abs().max() <= 1e-9 * (1 + b.abs().max()), k
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # no recompile for 17 images


class _TwoMembers(torch.nn.Module):
    """Logits (2, N, 3) of a shared linear layer: a group of two in the smallest form."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x):
        z = self.fc(x.flatten(1))
        return torch.stack([z, 2 * z])


def test_the_compiled_step_checks_one_loss_per_member_as_the_eager_one():
    """One step function run two ways: compiled, a group of two given one loss is refused
    as eagerly, before any weight moves (issue 30, item 5)."""
    torch._dynamo.reset()
    net = _TwoMembers()
    opt, before = torch.optim.SGD(net.parameters(), lr=0.1), copy.deepcopy(net.state_dict())
    x, y, loss = torch.rand(4, 3, 2, 2), torch.randint(0, 3, (4,)), build_loss("hard")
    step = compiled.CompiledStep()
    for run in (train_step, step):
        with pytest.raises(ValueError, match="1 losses for 2 members"):
            run(net, opt, x, y, None, [loss], contextlib.nullcontext())
    assert step.compiled  # refused by the compiled function, not by an eager fallback
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), before.values()))


def _no_compiler():
    from torch._inductor.exc import InductorError
    return InductorError(RuntimeError("no C++ compiler found"), "trace")


def _dynamic_batch_specialised():
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError
    return ConstraintViolationError("Constraints violated (L['xb'].size()[0])!")


@pytest.mark.parametrize("error", [_no_compiler, _dynamic_batch_specialised])
def test_a_step_that_cannot_compile_goes_on_eager_with_one_warning(monkeypatch, capsys, error):
    step = compiled.CompiledStep()

    def fails(*a, **k):
        raise error()
    monkeypatch.setattr(step, "_loss_fn", fails)
    net = students(1, torch.device("cpu"), False)
    opt = make_optimizer(net.parameters(), {"train": {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0}})
    loss = build_loss("hard")
    for x, y, _ in _batches([8, 8], torch.float32):
        member_loss, z = step(net, opt, x, y, None, [loss], contextlib.nullcontext())
        assert z.shape == (1, 8, 10) and torch.isfinite(member_loss).all()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: torch.compile failed") and "training eager" in err[0]
    assert not step.compiled


def test_the_homework_config_is_the_course_recipe_eager():
    t = resolve("configs/homework.toml")["train"]
    assert {k: t[k] for k in RECIPES["course"]} == RECIPES["course"]
    assert (t["recipe"], t["compile"], t["epochs"]) == ("course", False, 60)
    t = resolve("configs/homework.toml", flags={"train": {"recipe": "fast"}})["train"]
    assert {k: t[k] for k in RECIPES["fast"]} == RECIPES["fast"]  # the file sets no key of the bundle


@pytest.mark.slow
def test_a_compiled_run_killed_mid_epoch_resumes_to_the_uninterrupted_metrics(tmp_path, monkeypatch):
    """A run dies in epoch 2's evaluation (epoch 1's checkpoint stays, as after a kill -9
    there) and resumes compiled: the metrics and best weights of an uninterrupted
    compiled run, bit for bit (same graph, same machine)."""
    from qdistill.training.rundir import RunDir
    from conftest import SMALL, interrupted_in_epoch_2
    args = ["student", *SMALL, "--loss", "hard", "--epochs", "2", "--compile", "true"]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert interrupted_in_epoch_2(monkeypatch, [*args, "--out", str(tmp_path / "c")]) == 130
    assert cli.main([*args, "--resume", "--out", str(tmp_path / "c")]) == 0

    def metrics(name):
        return [{k: v for k, v in r.items() if k not in ("img_per_s", "wall_s")}
                for r in RunDir(tmp_path / name).read_metrics()]
    assert metrics("c") == metrics("a") and len(metrics("a")) == 2
    assert RunDir(tmp_path / "a").read_summary()["compiled"] is True
    a, c = (torch.load(tmp_path / n / "best.pt", weights_only=True)["model"] for n in ("a", "c"))
    assert all(torch.equal(a[k], c[k]) for k in a)
