"""A user's own network: `qdistill.quantize`, models from code (``FILE.py:FUNCTION``,
``package.module:FUNCTION``), ``resnet20``, and a residual network from a file through
teacher, student, resume, eval, study and ONNX export."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qdistill
from qdistill import cli
from qdistill.nn import reference
from qdistill.nn.layers import QuantAct, QuantConv2d, QuantLinear
from qdistill.nn.models import build
from qdistill.nn.quantize import quantize

from conftest import SMALL, interrupted_in_epoch_2

OWN = ["--dataset", "digits", "--max-test", "80", "--quiet"]

NET = '''
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


def tiny_resnet(num_classes=10, width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         Block(width), nn.MaxPool2d(2), Block(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


def fixed_ten(width=4):
    return tiny_resnet(10, width)


def raises():
    raise ValueError("no such width")


def wrong_shape(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes + 1))


def not_a_module():
    return 3


def frozen(num_classes=10):
    return wrong_shape(num_classes - 1).requires_grad_(False)
'''


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("own") / "mynet.py"
    path.write_text(NET)
    return path


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()

    def forward(self, x):
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


def small_resnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(8), Block(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


# ---------------------------------------------------------------- quantize

def test_quantize_swaps_layers_keeps_weights_and_leaves_the_argument():
    model = small_resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize(model, weight_bits=2, act_bits=1)
    assert all(type(m) is not QuantConv2d for m in model.modules())  # the argument is unchanged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert q.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # the float weights kept
    convs = [m for m in q.modules() if isinstance(m, QuantConv2d)]
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    acts = [m for m in q.modules() if isinstance(m, QuantAct)]
    assert [c.weight_bits for c in convs] == [32, 2, 2, 2, 2] and linears[0].weight_bits == 32
    assert [c.grad_bits for c in convs] == [32] * 5
    assert len(acts) == 5 and all(a.bits == 1 and a.scheme == "dorefa" for a in acts)
    assert not any(type(m) is nn.ReLU for m in q.modules())
    # the residual add is full precision: the block's output is the level of bn2(...) + x
    block, x = q[3], torch.rand(2, 8, 6, 6).round()
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.relu1(block.bn1(block.conv1(x)))))
        assert torch.equal(block(x), torch.clamp(branch + x, 0, 1).round())


def test_quantize_first_last_grad_bits_and_lsq():
    q = quantize(small_resnet(), scheme="lsq", weight_bits=3, act_bits=2, grad_bits=4, quantize_first_last=True)
    convs = [m for m in q.modules() if isinstance(m, QuantConv2d)]
    assert [c.weight_bits for c in convs] == [3] * 5 and [c.grad_bits for c in convs] == [32, 4, 4, 4, 4]
    assert next(m for m in q.modules() if isinstance(m, QuantLinear)).weight_bits == 3
    assert all(m.step is not None for m in convs)  # LSQ's learned steps, from the kept weights
    assert all(a.scheme == "lsq" for a in q.modules() if isinstance(a, QuantAct))


def test_quantize_draws_no_random_numbers():
    model = small_resnet()
    torch.manual_seed(3)
    quantize(model, scheme="lsq", weight_bits=2, act_bits=2)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(3))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
        self.relu, self.fc = nn.ReLU(), nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.b(self.relu(self.a(x))))
        return self.fc(self.c(x).mean((2, 3)))


class Untraceable(Functional):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: torch.fx cannot follow it
            x = x * 1
        return super().forward(x)


def test_a_layer_with_unquantized_input_is_named_in_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize(Functional())
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0] and "of c (fed by relu)" in messages[0]
    assert isinstance(q.relu, QuantAct) and q(torch.rand(1, 3, 12, 12)).shape == (1, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = quantize(Untraceable())
    assert any("cannot be traced" in str(w.message) for w in caught) and isinstance(q.relu, QuantAct)


def test_a_gelu_is_named_as_what_feeds_a_layer_and_a_net_with_no_quantized_weight_is_told():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 28 * 28, 10))
    with pytest.warns(UserWarning, match=r"input of 2 \(fed by GELU\): it sees full-precision activations"):
        quantize(net)
    edges_only = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10))
    with pytest.warns(UserWarning, match="Sequential has no layer but its first convolution and last linear"):
        q = quantize(edges_only)
    assert [m.weight_bits for m in (q[0], q[3])] == [32, 32]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quantizing the edges too: nothing to say
        assert quantize(edges_only, quantize_first_last=True)[3].weight_bits == 2


class SharedRelu(nn.Module):
    """torchvision's BasicBlock pattern: one ``self.relu`` before and after the add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.conv2(self.relu(self.conv1(x)))
        out += x
        return self.relu(out)


def test_one_relu_at_two_places_is_named_where_it_would_share_a_learned_step():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), SharedRelu(), nn.Conv2d(4, 4, 3), nn.Flatten(),
                        nn.Linear(4 * 26 * 26, 10))
    with pytest.warns(UserWarning, match=r"^2\.relu \(2 places\): one nn.ReLU called at several places becomes one "
                                         r"lsq quantizer, with one learned step"):
        q = quantize(net, scheme="lsq", weight_bits=2, act_bits=2)
    assert isinstance(q[2].relu, QuantAct) and q(torch.rand(1, 3, 30, 30)).shape == (1, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DoReFa's quantizer holds no state: sharing it changes nothing
        quantize(net, weight_bits=2, act_bits=1)


def test_the_api_is_importable_from_the_package():
    assert qdistill.quantize is quantize
    for name in qdistill.__all__:
        assert getattr(qdistill, name) is not None
    with pytest.raises(AttributeError):
        qdistill.nope


# ---------------------------------------------------------------- resnet20

def test_resnet20_is_he_et_al_cifar_resnet():
    torch.manual_seed(0)
    model = build("resnet20", weight_bits=2, act_bits=1)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv2d)]
    assert len(convs) == 21  # 19 3x3 (stem and 18 in blocks) + 2 1x1 shortcuts
    assert sum(m.kernel_size == (1, 1) for _, m in convs) == 2
    assert sum(p.numel() for p in model.parameters()) == 272474
    assert [m.out_channels for n, m in convs if n.endswith("conv1")][::3] == [16, 32, 64]
    assert convs[0][1].weight_bits == 32 and all(m.weight_bits == 2 for _, m in convs[1:])
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------- models from code

def test_a_file_model_builds_with_its_arguments_and_classes(net_file):
    model = build(f"{net_file}:tiny_resnet", weight_bits=2, act_bits=1, num_classes=7, model_args={"width": 4})
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert next(model.modules())[0].out_channels == 4


def test_a_module_model_builds(monkeypatch, net_file):
    monkeypatch.syspath_prepend(str(net_file.parent))
    model = build("mynet:fixed_ten", weight_bits=2, act_bits=1)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("ref, line", [
    ("nope", "teacher.model: unknown model 'nope'; registered: dorefa-svhn, resnet20, vgg7, vgg7-wide"),
    ("{dir}/absent.py:f", "teacher.model: model file not found: {dir}/absent.py"),
    ("{dir}/mynet.py:absent", "model {dir}/mynet.py:absent: {dir}/mynet.py has no function absent"),
    ("{dir}/broken.py:f", "cannot import model file {dir}/broken.py: SyntaxError"),
    ("{dir}/mynet.py:raises", "model factory {dir}/mynet.py:raises raised ValueError: no such width"),
    ("{dir}/mynet.py:wrong_shape", "gives (2, 11) for a (2, 3, 32, 32) batch; qdistill needs (2, 10) logits"),
    ("{dir}/mynet.py:not_a_module", "returned int, not a torch.nn.Module"),
    ("{dir}/mynet.py:frozen", "model {dir}/mynet.py:frozen has no trainable parameter: nothing to train"),
    ("no_such_package_here.net:f", "cannot find model module no_such_package_here.net"),
    ("sys:exit", "model module sys has no source file (origin: built-in)"),
], ids=["name", "file", "function", "import", "raises", "shape", "type", "frozen", "module", "no-file"])
def test_a_bad_model_is_one_line_exit_2_and_nothing_written(ref, line, net_file, tmp_path, capsys):
    (net_file.parent / "broken.py").write_text("def f(:\n")
    ref = ref.format(dir=net_file.parent)
    out = tmp_path / "t"
    assert cli.main(["teacher", *SMALL, "--epochs", "1", "--model", ref, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and line.format(dir=net_file.parent) in err
    assert not out.exists() or not any(out.iterdir())


def test_a_changed_file_is_named_when_rebuilt(net_file, tmp_path):
    path = tmp_path / "net.py"
    path.write_text(NET)
    text, digest = reference.read(f"{path}:tiny_resnet")
    assert reference.source(f"{path}:tiny_resnet", digest) == text
    reference._SOURCES.pop(digest)
    path.write_text(NET + "\n# changed\n")
    with pytest.raises(reference.ModelError, match="changed since the config recorded it"):
        reference.source(f"{path}:tiny_resnet", digest)


# ---------------------------------------------------------------- through the commands

def _metrics(run):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "wall_s")} for r in rows]


@pytest.fixture(scope="module")
def own_runs(net_file, tmp_path_factory):
    """A teacher and a Q3 student of the user's residual network (``width = 6``), on all
    of digits' training images (the 240 of `SMALL` leave it at chance)."""
    root = tmp_path_factory.mktemp("own-runs")
    model = ["--model", f"{net_file}:tiny_resnet", "--set", "student.model_args={width = 6}",
             "--set", "teacher.model_args={width = 6}"]
    assert cli.main(["teacher", *OWN, "--epochs", "3", *model, "--out", str(root / "t")]) == 0
    args = ["student", *OWN, "--teacher", str(root / "t"), "--loss", "hard+soft", "--epochs", "2", *model]
    assert cli.main([*args, "--out", str(root / "s")]) == 0
    return root, args


@pytest.mark.slow  # trains a teacher and a student of the user's network, or a study
def test_config_and_checkpoints_record_the_model(own_runs, net_file):
    root, _ = own_runs
    cfg = (root / "s" / "config.toml").read_text()
    digest = reference.sha256(NET)
    assert f'model = "{net_file}:tiny_resnet"' in cfg and f'model_sha256 = "{digest}"' in cfg
    assert "model_args = {width = 6}" in cfg
    for name in ("best.pt", "checkpoint.pt"):
        ckpt = torch.load(root / "s" / name, weights_only=True)
        meta = ckpt["meta"] if "meta" in ckpt else ckpt["members"][0]["meta"]
        assert meta["source"] == NET and meta["build"]["sha256"] == digest
        assert meta["build"]["model_args"] == {"width": 6}


@pytest.mark.slow  # trains a teacher and a student of the user's network, or a study
def test_resume_of_a_file_model_matches(own_runs, tmp_path, monkeypatch):
    root, args = own_runs
    assert interrupted_in_epoch_2(monkeypatch, [*args, "--out", str(tmp_path / "c")]) == 130
    assert cli.main([*args, "--resume", "--out", str(tmp_path / "c")]) == 0
    assert _metrics(tmp_path / "c") == _metrics(root / "s")


@pytest.mark.slow  # trains a teacher and a student of the user's network, or a study
def test_eval_onnx_and_qdz_without_the_file(own_runs, net_file, tmp_path, capsys, monkeypatch):
    """eval and export rebuild the model from the checkpoint's copy of the file; ONNX
    Runtime's and the packed engine's labels on the whole test split equal torch's (a
    level can flip only where a pre-activation lies within rounding of a boundary:
    `tests/test_graph_export.py` bounds that; none did here), so `predict` reports
    torch's accuracy."""
    ort = pytest.importorskip("onnxruntime")
    root, _ = own_runs
    moved = net_file.with_suffix(".away")
    net_file.rename(moved)
    monkeypatch.setattr(reference, "_SOURCES", {})
    try:
        assert cli.main(["eval", str(root / "s"), "--json"]) == 0
        acc = json.loads(capsys.readouterr().out)["test_acc"]
        assert cli.main(["export", str(root / "s"), "--out", str(tmp_path / "s.onnx")]) == 0
        assert cli.main(["export", str(root / "s"), "--out", str(tmp_path / "s.qdz")]) == 0
    finally:
        moved.rename(net_file)
    from qdistill.data.registry import load
    from qdistill.resolve import resolve
    from qdistill.training.checkpoint import load_model
    data = load(resolve(flags={"data": {"dataset": "digits", "max_test": 80}}))
    x = (data.x_test.float() / 255).numpy()
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"images": x})[0].argmax(1)
    with torch.no_grad():
        want = load_model(root / "s")[0](torch.from_numpy(x)).argmax(1).numpy()
    y = data.y_test.numpy()
    assert len(np.unique(want)) > 2 and 0 <= acc <= 1  # labels that vary: the comparison below means something
    assert np.array_equal(labels, want)  # so ONNX Runtime's accuracy is torch's
    from qdistill import deploy
    engine = deploy.load(tmp_path / "s.qdz")
    assert engine.manifest["format_version"] == 3  # a graph: the blocks' residual adds
    assert np.array_equal(engine.classify(x), want)  # and so is the integer engine's
    capsys.readouterr()
    assert cli.main(["predict", str(tmp_path / "s.qdz"), "--dataset", "digits"]) == 0
    assert f"({int((want == y).sum())}/{len(y)}," in capsys.readouterr().out


@pytest.mark.slow  # trains a teacher and a student of the user's network, or a study
def test_a_study_of_a_file_model(net_file, tmp_path, capsys):
    """Q1 and Q3 of the user's network, one run at a time (``fused = "auto"`` on a CPU and
    for a residual network); ``fused = true`` is refused with one line."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'''[data]
dataset = "digits"
max_train = 240
max_test = 80
[teacher]
model = "{net_file}:tiny_resnet"
[student]
model = "{net_file}:tiny_resnet"
[train]
epochs = 1
[study]
questions = ["q1", "q3"]
temperatures = [4.0]
seeds = [0]
allow_weak_teacher = true
''')
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "st"), "--quiet"]) == 0
    rows = (tmp_path / "st" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",ok," in r for r in rows[1:])
    capsys.readouterr()
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "st2"), "--set", "study.fused=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fused groups hold flat networks only" in err


def test_the_readme_python_example_runs(capsys):
    """README's "In Python" example, as written there."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("### In Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    student = scope["student"]
    assert isinstance(student[3].conv, QuantConv2d) and student[3].conv.weight_bits == 2
    assert isinstance(student[3].relu, QuantAct) and torch.isfinite(scope["loss"])
    assert "QuantConv2d(16, 16" in capsys.readouterr().out


def test_the_command_names_an_unquantized_input_in_one_warning_line(tmp_path, capsys):
    """A file model with a functional F.relu: training goes on, the warning is one line."""
    net = tmp_path / "fnet.py"
    net.write_text("import torch.nn as nn\nimport torch.nn.functional as F\n\n\n"
                   "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
                   "        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)\n"
                   "        self.fc = nn.Linear(4, 10)\n\n    def forward(self, x):\n"
                   "        return self.fc(self.b(F.relu(self.a(x))).mean((2, 3)))\n")
    with pytest.warns(UserWarning, match="nothing quantizes the input of b ") as caught:
        assert cli.main(["student", *SMALL, "--epochs", "1", "--model", f"{net}:Net",
                         "--out", str(tmp_path / "s")]) == 0
    from qdistill.cli.main import _warning_line
    w = next(w for w in caught if "nothing quantizes" in str(w.message))
    line = _warning_line(w.message, w.category, w.filename, w.lineno)
    assert line == f"qdistill: warning: {w.message}\n" and line.count("\n") == 1
