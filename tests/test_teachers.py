"""Teachers that are not qdistill runs: TorchScript, torch.export, ONNX and a logits file,
against the run-directory teacher they were made from.

The run teacher here (the session's `small_teacher`) trains 2 epochs on 240 images, so
it is at or near chance and the weak-teacher check may refuse it: the tests of the
machinery pass --allow-weak-teacher on purpose (`test_weak_teachers_of_every_kind_are_refused` tests the refusal itself)."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn

from qdistill import cli
from qdistill.data.batching import to_float
from qdistill.data.registry import load
from qdistill.export.onnx import export_onnx
from qdistill.nn.layers import QuantAct
from qdistill.resolve import resolve
from qdistill.training import checkpoint
from qdistill.training.teacher import Teacher
from qdistill.training.teacher_files import file_sha256

from bounds import Chunked, gamma, within

DATA = {"dataset": "digits", "max_train": 200, "max_test": 60}
FLAGS = ["--dataset", "digits", "--max-train", "200", "--max-test", "60", "--batch-size", "64", "--quiet"]
STUDENT = ["--loss", "hard+soft", "--temperature", "4", "--epochs", "2", "--allow-weak-teacher"]
TIMING = ("img_per_s", "wall_s")


def _onnx():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def made(tmp_path_factory, small_teacher):
    """The run-directory teacher and every file made from its eval-mode model."""
    root = tmp_path_factory.mktemp("teachers")
    model, _ = checkpoint.load_model(small_teacher, "best")
    model.eval()
    example = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, example), str(root / "t.pt"))
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("n")},))
    torch.export.save(program, str(root / "t.pt2"))
    paths = {"run": small_teacher, "torchscript": root / "t.pt", "export": root / "t.pt2", "root": root}
    try:
        import onnx  # noqa: F401
        export_onnx(model, root / "t.onnx")
        paths["onnx"] = root / "t.onnx"
    except ImportError:
        pass
    data = load(DATA)
    run = Teacher.open(small_teacher, data).evaluate()
    np.savez(root / "t.npz", train_logits=run.train_logits().numpy(), test_logits=run.test_logits().numpy(),
             data_fingerprint=data.fingerprint)
    paths["logits"] = root / "t.npz"
    return paths, model, data, run


def test_a_run_teacher_names_its_model_as_the_runs_meta_does(made):
    """teacher.json's "model": the name in the run's checkpoint meta (issue 30, item 4);
    a teacher file names none."""
    paths, _, data, run = made
    assert run.arch == "vgg7" and Teacher.open(paths["torchscript"], data).arch == ""


def _student(teacher, out, *extra):
    assert cli.main(["student", *FLAGS, "--teacher", str(teacher), *STUDENT, *extra, "--out", str(out)]) == 0
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, torch.load(out / "best.pt", weights_only=True)["model"], json.loads((out / "summary.json")
                                                                                        .read_text())


@pytest.fixture(scope="module")
def run_student(made):
    paths, *_ = made
    return _student(paths["run"], paths["root"] / "S-run")


def _same_student(a, b):
    assert a[0] == b[0]  # every metric of every epoch, timing aside
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_torchscript_and_export_teachers_are_the_run_teacher_bit_for_bit(made, run_student, tmp_path):
    """TorchScript (traced) and torch.export run the same aten kernels as the eager model, on
    the same float32 batches (`evaluate.predict`'s): the same computation, so the logits
    are compared exactly, and so is the student they teach."""
    paths, _, data, run = made
    for kind in ("torchscript", "export"):
        t = Teacher.open(paths[kind], data).evaluate()
        assert t.kind == kind and t.sha256 == file_sha256(paths[kind])
        assert torch.equal(t.train_logits(), run.train_logits()) and torch.equal(t.test_logits(), run.test_logits())
        assert t.fingerprint == {**run.fingerprint, "teacher": t.sha256, "kind": kind}
    student = _student(paths["torchscript"], tmp_path / "S")
    _same_student(student, run_student)
    s = student[2]
    assert (s["teacher_kind"], s["teacher_file"], s["teacher_sha256"]) == (
        "torchscript", str(paths["torchscript"]), file_sha256(paths["torchscript"]))
    assert s["teacher_test_acc"] == run_student[2]["teacher_test_acc"] == run.describe()["test_acc"]
    assert run_student[2]["teacher_kind"] == "run"
    assert run_student[2]["teacher_sha256"] == file_sha256(paths["run"] / "best.pt")


def test_augmented_batches_run_the_teacher_file_live(made, tmp_path):
    """With augmentation the teacher runs on each augmented float batch: TorchScript runs the
    eager model's kernels on the same batches, so its student is the run teacher's bit for
    bit; an ONNX teacher runs there too (on the CPU)."""
    paths = made[0]
    live = ["--augment", "light", "--epochs", "1"]
    _same_student(_student(paths["torchscript"], tmp_path / "ts", *live),
                  _student(paths["run"], tmp_path / "run", *live))
    if "onnx" in paths:
        assert _student(paths["onnx"], tmp_path / "onnx", *live)[2]["teacher_kind"] == "onnx"


def test_logits_file_teacher_gives_exactly_the_run_teachers_student(made, run_student, tmp_path):
    paths, *_ = made
    student = _student(paths["logits"], tmp_path / "S")
    _same_student(student, run_student)
    assert student[2]["teacher_kind"] == "logits" and student[2]["teacher_sha256"] == file_sha256(paths["logits"])
    assert student[2]["teacher_test_acc"] == run_student[2]["teacher_test_acc"]
    assert not (tmp_path / "S" / "teacher_logits.pt").exists()


def _boundaries(model):
    """The modules after which the computation is no longer affine (ReLU, max-pool)."""
    return [i for i, m in enumerate(model) if isinstance(m, (QuantAct, nn.MaxPool2d))]


def test_onnx_teacher_is_the_run_teacher_within_the_derived_bound(made, run_student, tmp_path):
    """ONNX Runtime folds BatchNorm into the convolutions and sums in its own order, so its
    logits are not PyTorch's bits. Both are float32 implementations of the teacher, compared
    segment by segment between the nonlinear steps (`bounds.Ref`, any float32
    implementation): PyTorch's output of a segment is within ``b_pt`` of the float64 run of
    the segment on PyTorch's input to it, ONNX Runtime's within ``b_ort`` of it, where
    ``b_ort`` also carries the measured difference of the two inputs through the segment.
    So at the logits ``|onnx - run| <= b_pt + b_ort``, by induction over the segments. The
    loader's logits are the runtimes' own (same input, same batch: asserted bit for bit)."""
    ort = _onnx()
    import onnx
    paths, model, data, run = made
    t = Teacher.open(paths["onnx"], data).evaluate()
    x = to_float(torch.cat([data.x_train, data.x_test]))
    # PyTorch, hooked at the boundaries
    cut = _boundaries(model)
    seen = {}
    hooks = [model[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i in cut]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    assert torch.equal(logits, torch.cat([run.train_logits(), run.test_logits()]))
    # ONNX Runtime, the same graph with the boundaries' tensors as extra outputs
    graph = onnx.load(str(paths["onnx"]))
    names = [n.output[0] for n in graph.graph.node if n.op_type in ("Relu", "MaxPool")]
    assert len(names) == len(cut)
    for name in names:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    outs = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})
    assert np.array_equal(outs[0], torch.cat([t.train_logits(), t.test_logits()]).numpy())
    start, a, b = -1, x, x
    for i, ha, hb in [*zip(cut, [seen[i] for i in cut], outs[1:]), (len(model) - 1, logits, outs[0])]:
        seg = model[start + 1:i + 1]
        ref, b_pt = Chunked(a).run(seg).value("f32")
        _, b_ort = Chunked(a, e_in=(torch.as_tensor(b) - a).abs().double()).run(seg).value("f32")
        within(ha, ref, b_pt, "onnx teacher: pytorch")
        within(hb, ref, b_ort, "onnx teacher: onnxruntime")
        start, a, b = i, ha, torch.as_tensor(hb)
    # where no top-2 margin is within the bound, both teachers pick the same class
    bound = (b_pt + b_ort).amax(1)
    top2 = logits.double().topk(2, 1).values
    clear = (top2[:, 0] - top2[:, 1] > 2 * bound).numpy()
    assert np.array_equal(outs[0].argmax(1)[clear], logits.argmax(1).numpy()[clear])
    # The student: its metrics are compared with the run teacher's student only through
    # the teacher (logits bounded above); its pairing (same seed, init, split, batch order)
    # and the teacher's fields are compared exactly.
    student = _student(paths["onnx"], tmp_path / "S")[2]
    for key in ("init_sha256", "val_split_sha256", "batch_order_sha256"):
        assert student[key] == run_student[2][key]
    assert student["teacher_kind"] == "onnx" and student["teacher_sha256"] == file_sha256(paths["onnx"])
    if clear[len(data.x_train):].all():
        assert student["teacher_test_acc"] == run_student[2]["teacher_test_acc"]


class _Core(nn.Sequential):
    """A tiny classifier of 32 x 32 NCHW images in [0, 1]."""

    def __init__(self, pool: int = 16):
        torch.manual_seed(3)
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(pool), nn.Flatten(),
                         nn.Linear(8, 10))
        self.eval()


MEAN, STD = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]


def _nhwc_onnx(path):
    """`_Core` behind the input a Keras-style model takes: NHWC, 0-255 pixels normalised
    with MEAN and STD, undone inside the graph (``x * std + mean``, ``/ 255``, transpose)."""
    import onnx
    from onnx import helper, numpy_helper
    core = _Core()
    export_onnx(core, path)
    m = onnx.load(str(path))
    g = m.graph
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)
    g.initializer.extend([f32("std", STD), f32("mean", MEAN), f32("k255", 255.0)])
    pre = [helper.make_node("Mul", ["x", "std"], ["p1"]), helper.make_node("Add", ["p1", "mean"], ["p2"]),
           helper.make_node("Div", ["p2", "k255"], ["p3"]),
           helper.make_node("Transpose", ["p3"], ["images"], perm=[0, 3, 1, 2])]
    nodes = pre + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32, 32, 3]))
    onnx.checker.check_model(m)
    path.write_bytes(m.SerializeToString())
    return core


def _section(*sets):
    return resolve(None, None, list(sets))["teacher"]


def test_nhwc_0_255_normalised_onnx_teacher(tmp_path, capfd):
    """Declared as it is, the teacher computes `_Core` on the data: our ``(255 a - mean) /
    std`` (3 float32 roundings) and the graph's ``(n * std + mean) / 255`` (3, or 4 if the
    runtime divides by a rounded reciprocal) give the core the input ``a'`` with

        |a' - a| <= gamma_7 * (2 a + |mean| / 255)

    (the cancellation of ``* std`` against ``/ std`` and ``+ mean`` against ``- mean`` is
    exact in real arithmetic, so only the roundings remain; every value is at most
    ``255 a + |mean|``), carried through the core by `bounds.Ref`'s ``e_in``."""
    _onnx()
    path = tmp_path / "keras.onnx"
    core = _nhwc_onnx(path)
    data = load(DATA)
    declared = _section("teacher.layout=NHWC", "teacher.input_range=0-255", f"teacher.mean={MEAN}",
                        f"teacher.std={STD}")
    t = Teacher.open(path, data, declared).evaluate()
    a = to_float(data.x_train).double()
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1).float().double()
    e_in = float(gamma(7)) * (2 * a + mean.abs() / 255)
    ref, bound = Chunked(to_float(data.x_train), e_in=e_in).run(core).value("f32")
    within(t.train_logits(), ref, bound, "nhwc onnx teacher")
    assert t.fingerprint["preprocess"] == {"input_range": "0-255", "mean": MEAN, "std": STD, "layout": "NHWC",
                                           "input_size": 32}
    # the check bites: the same teacher declared without its normalisation is far off
    wrong = Teacher.open(path, data, _section("teacher.layout=NHWC")).evaluate()
    assert ((wrong.train_logits().double() - ref).abs() > bound).any()
    # not declared at all: the runtime rejects the NCHW batch, said in one line
    code = cli.main(["student", *FLAGS, "--teacher", str(path), *STUDENT, "--out", str(tmp_path / "S")])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "(60, 3, 32, 32)" in err and "(N, 32, 32, 3)" in err
    assert not (tmp_path / "S").exists()
    # declared on the command line, a student trains and its config records the declaration
    args = ["--set", "teacher.layout=NHWC", "--set", "teacher.input_range=0-255", "--set",
            f"teacher.mean={MEAN}", "--set", f"teacher.std={STD}", "--epochs", "1"]
    assert cli.main(["student", *FLAGS, "--teacher", str(path), *STUDENT, *args, "--out", str(tmp_path / "S")]) == 0
    assert 'layout = "NHWC"' in (tmp_path / "S" / "config.toml").read_text()


def test_input_size_resizes_before_the_teacher(tmp_path, capfd):
    """A TorchScript teacher of 40 x 40 images gets the data resized bilinearly
    (align_corners=False): the same torch computation as here, so exact."""
    core = _Core(pool=20)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(core, torch.rand(2, 3, 40, 40)), str(tmp_path / "t40.pt"))
    data = load(DATA)
    t = Teacher.open(tmp_path / "t40.pt", data, _section("teacher.input_size=40")).evaluate()
    x = torch.nn.functional.interpolate(to_float(data.x_test), size=(40, 40), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.equal(t.test_logits(), core(x))
    code = cli.main(["student", *FLAGS, "--teacher", str(tmp_path / "t40.pt"), *STUDENT, "--out",
                     str(tmp_path / "S")])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "(60, 3, 32, 32)" in err and "rejects" in err
    assert not (tmp_path / "S").exists()


class _Scaled(nn.Module):
    def __init__(self, classes=10, scale=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.scale = nn.Linear(3 * 32 * 32, classes), scale

    def forward(self, x):
        return self.lin(x.flatten(1)) * self.scale


def _bad_inputs(tmp, made):
    """{case: (path, extra flags, what the line must say)}."""
    paths = made[0]
    n_train, n_test = 200, 60

    def ts(name, module):
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(module, torch.rand(2, 3, 32, 32)), str(tmp / name))
        return tmp / name

    def npz(name, **arrays):
        np.savez(tmp / name, **arrays)
        return tmp / name

    def cut(name, src, keep=0.5):
        raw = src.read_bytes()
        (tmp / name).write_bytes(raw[:int(len(raw) * keep)])
        return tmp / name

    z = np.zeros
    (tmp / "notes.txt").write_text("not a teacher\n")
    torch.save(_Scaled().state_dict(), tmp / "weights.pt")
    torch.save(_Scaled().state_dict(), tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    flipped = bytearray(paths["torchscript"].read_bytes())
    with zipfile.ZipFile(paths["torchscript"]) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)  # the largest weight tensor
    head = flipped[info.header_offset:info.header_offset + 30]  # the local header: its own name and extra lengths
    at = info.header_offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little") \
        + info.file_size // 2
    flipped[at:at + 16] = bytes(16)
    (tmp / "flipped.pt").write_bytes(bytes(flipped))
    with zipfile.ZipFile(tmp / "hollow.pt2", "w") as zf:  # an export archive's name, not its records
        zf.writestr("t/archive_format", "pt2")
    inf = z((n_train, 10), np.float32)
    inf[3, 4] = np.inf
    cases = {
        "text file": (tmp / "notes.txt", [], "is none of"),
        "torch.save pickle": (tmp / "weights.pt", [], "torch.save pickle"),
        "legacy pickle": (tmp / "legacy.pt", [], "pickle"),
        "missing": (tmp / "absent.onnx", [], "not found"),
        "truncated torchscript": (cut("short.pt", paths["torchscript"]), [], "corrupt or truncated"),
        "flipped torchscript": (tmp / "flipped.pt", [], "CRC"),
        "truncated export": (cut("short.pt2", paths["export"]), [], "corrupt or truncated"),
        "hollow export": (tmp / "hollow.pt2", [], "not a readable torch.export program"),
        "truncated npz": (cut("short.npz", paths["logits"], 0.7), [], "corrupt or truncated"),
        "pickled npz": (npz("obj.npz", train_logits=np.array([None], dtype=object),
                            test_logits=z((n_test, 10))), [], "allow_pickle=False"),
        "classes (torchscript)": (ts("k7.pt", _Scaled(classes=7)), [], "7 classes, but the data has 10"),
        "classes (npz)": (npz("k7.npz", train_logits=z((n_train, 7)), test_logits=z((n_test, 7))), [],
                          "7 classes, but the data has 10"),
        "non-finite (torchscript)": (ts("nan.pt", _Scaled(scale=float("nan"))), [], "non-finite logits"),
        "non-finite (npz)": (npz("inf.npz", train_logits=inf, test_logits=z((n_test, 10))), [],
                             "non-finite logits (NaN or inf) for 1 of 200 train images"),
        "lengths (npz)": (npz("len.npz", train_logits=z((n_train - 1, 10)), test_logits=z((n_test, 10))), [],
                          "shape (199, 10), expected (200, 10)"),
        "data fingerprint (npz)": (npz("fp.npz", train_logits=z((n_train, 10)), test_logits=z((n_test, 10)),
                                       data_fingerprint="0" * 64), [], "logits of other data"),
        "augmented (npz)": (paths["logits"], ["--augment", "light"], "augmentation is on"),
        "rejected input (torchscript)": (paths["torchscript"], ["--set", "teacher.layout=NHWC"],
                                         "rejects its input of shape (60, 32, 32, 3)"),
        "preprocessing of a run": (paths["run"], ["--set", "teacher.input_range=0-255"], "is a qdistill run"),
    }
    if "onnx" in paths:
        cases["truncated onnx"] = (cut("short.onnx", paths["onnx"]), [], "not a readable ONNX model")
        cases["rejected input (onnx)"] = (paths["onnx"], ["--set", "teacher.layout=NHWC"],
                                          "rejects its input of shape (60, 32, 32, 3)")
    return cases


def test_every_bad_teacher_is_one_line_and_leaves_nothing(made, tmp_path, capfd):
    """capfd: the line counted is everything on file descriptor 2, torch's log handlers and
    ONNX Runtime's C++ logging included."""
    cases = _bad_inputs(tmp_path, made)
    before = sorted(tmp_path.rglob("*"))
    for case, (path, extra, says) in cases.items():
        code = cli.main(["student", *FLAGS, "--teacher", str(path), *STUDENT, *extra,
                         "--out", str(tmp_path / "S")])
        err = capfd.readouterr().err
        assert code == 2, (case, err)
        assert err.count("\n") == 1 and err.startswith("qdistill: error: teacher"), (case, err)
        assert says in err, (case, err)
        assert sorted(tmp_path.rglob("*")) == before, case  # no run directory, no cache, nothing


@pytest.mark.parametrize("kind", ["torchscript", "onnx", "logits"])
def test_weak_teachers_of_every_kind_are_refused(kind, tmp_path, capfd):
    """A teacher file has no validation accuracy: its training-split accuracy decides. Each
    teacher here says class 0 for every image (all logits 0): ~10% on balanced digits."""
    data = load(DATA)
    path = tmp_path / {"torchscript": "zero.pt", "onnx": "zero.onnx", "logits": "zero.npz"}[kind]
    if kind == "torchscript":
        with torch.no_grad():
            torch.jit.save(torch.jit.trace(_Scaled(scale=0.0), torch.rand(2, 3, 32, 32)), str(path))
    elif kind == "onnx":
        _onnx()
        core = _Core()
        with torch.no_grad():
            core[-1].weight.zero_()
            core[-1].bias.zero_()
        export_onnx(core, path)
    else:
        np.savez(path, train_logits=np.zeros((200, 10), np.float32), test_logits=np.zeros((60, 10), np.float32))
    assert Teacher.open(path, data).val_acc is None
    code = cli.main(["student", *FLAGS, "--teacher", str(path), "--loss", "soft", "--epochs", "1",
                     "--out", str(tmp_path / "S")])
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "training-split accuracy" in err
    assert not (tmp_path / "S").exists()


STUDY = """
[data]
dataset = "digits"
max_train = 200
max_test = 60
[teacher]
run = "{run}"
[train]
epochs = 1
batch_size = 64
[study]
temperatures = [4.0]
seeds = [0]
questions = ["q1", "q2"]
# the teacher trained 2 epochs on 200 images, at chance: accepted on purpose
allow_weak_teacher = true
"""


def test_study_with_an_onnx_teacher(made, tmp_path, capfd):
    _onnx()
    paths, _, data, _ = made
    cfg = tmp_path / "study.toml"
    cfg.write_text(STUDY.format(run=paths["onnx"]))
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S"), "--quiet"]) == 0
    s = tmp_path / "S"
    sha = file_sha256(paths["onnx"])
    teacher = json.loads((s / "teacher.json").read_text())
    assert (teacher["kind"], teacher["file"], teacher["sha256"]) == ("onnx", str(paths["onnx"]), sha)
    assert teacher["test_acc"] == Teacher.open(paths["onnx"], data).describe()["test_acc"]
    stored = torch.load(s / "teacher_logits.pt", weights_only=True)["fingerprint"]
    assert stored["kind"] == "onnx" and stored["teacher"] == sha and stored["data"] == data.fingerprint
    summary = json.loads((s / "runs" / "q2-soft-T4-s0" / "summary.json").read_text())
    assert summary["teacher_kind"] == "onnx" and summary["teacher_sha256"] == sha
    report = (s / "report.md").read_text()
    assert "| onnx |" in report and sha in report
    # a bad teacher stops a study before its folder exists
    cfg.write_text(STUDY.format(run=tmp_path / "notes.txt"))
    (tmp_path / "notes.txt").write_text("no\n")
    capfd.readouterr()
    assert cli.main(["study", str(cfg), "--out", str(tmp_path / "S2"), "--quiet"]) == 2
    assert capfd.readouterr().err.count("\n") == 1 and not (tmp_path / "S2").exists()
