"""``qdistill predict MODEL FOLDER [--out predictions.csv]``: every image under a folder,
recursively, in a stable order, each row what `predict_image` says of that image alone;
torch-free; a bad input stops it with one line and writes nothing."""
import csv
import io
import subprocess
import sys

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image")

from qdistill import cli, deploy  # noqa: E402
from qdistill.data.registry import load  # noqa: E402
from qdistill.deploy.predict import load_image, predict_image  # noqa: E402
from qdistill.export.packed import export_model  # noqa: E402

from bounds import U64, gamma, within  # noqa: E402
from qdz_students import CLASSES, student  # noqa: E402

# 20 digits test images: image i is saved as NAMES[i], in nested folders and every format
# the folder reader takes (JPEG and WebP lossy: the comparison reads the same file back).
FOLDERS = ["", "a-b/", "a/deep/", "a/", "a/deep/more/"] * 4
SUFFIXES = ["png"] * 14 + ["PNG", "jpg", "jpeg", "bmp", "webp", "png"]
NAMES = [f"{d}img{19 - i:02d}.{ext}" for i, (d, ext) in enumerate(zip(FOLDERS, SUFFIXES))]
EXPECTED = sorted(NAMES, key=lambda n: n.split("/"))  # by components: a/ whole, then a-b/


@pytest.fixture(scope="module")
def qdz(tmp_path_factory):
    path = tmp_path_factory.mktemp("qdz") / "student.qdz"
    export_model(student("vgg7", 2, 1, "dorefa"), path, class_names=CLASSES)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images") / "in"
    x = load({"dataset": "digits", "max_test": 20}).x_test.numpy()  # uint8 (20, 3, 32, 32)
    for name, image in zip(NAMES, x):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(root / name)
    # skipped: other files, hidden files and folders (none of them an image)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_text("not an image")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_text("not an image")
    return root


def read_csv(text: str) -> list[dict]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["path", "index", "name", "probability"]  # the keys of predict --json
    return [{"path": p, "index": int(k), "name": c, "probability": float(q)} for p, k, c, q in rows[1:]]


def softmax64(logits):
    z = logits.astype(np.float64) - logits.astype(np.float64).max()
    p = np.exp(z)
    return p / p.sum()


def test_every_image_once_in_sorted_order_as_predict_image_says(qdz, folder, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(qdz), str(folder), "--out", str(out)]) == 0
    assert "20 predictions" in capsys.readouterr().out
    rows = read_csv(out.read_text())
    assert [r["path"] for r in rows] == EXPECTED
    engine = deploy.load(qdz)
    images = np.concatenate([load_image(folder / r["path"]) for r in rows])
    batch = engine.predict(images)  # what the command computed: its rows are these, exactly
    for row, logits in zip(rows, batch):
        p = softmax64(logits)
        assert (row["index"], row["name"], row["probability"]) == (int(p.argmax()), CLASSES[int(p.argmax())],
                                                                   p.max())
    # Against each image alone: the engine's stages are batch-independent but the last
    # linear layer (float32 BLAS), whose sums of F products and a bias may be rounded in
    # another order: each logit within gamma_(F+1)(u32) (sum |x_i w_i| + |b|) of exact, so
    # the two within D = twice that (`bounds`). Then the class agrees unless the top two
    # logits are within 2 D, and, p_k = 1 / sum_j exp(l_j - l_k) with each exponent moved by
    # at most 2 max D, the confidences within expm1(2 max D) plus twice the float64
    # roundings of a softmax (20 + 2 max |z| roundings of u64: exp 8, sum 9, the division,
    # the subtraction and its propagation through exp).
    linear = engine.stages[-1]
    excused = 0
    for row, x in zip(rows, images):
        top, probs = predict_image(qdz, folder / row["path"])
        features = engine.trace(x[None])[-2][0].astype(np.float64)
        alone = engine.predict(x[None])[0].astype(np.float64)
        d = 2 * gamma(linear.w.shape[1] + 1) * (np.abs(linear.w) @ np.abs(features) + np.abs(linear.b))
        top2 = np.sort(alone)[-2:]
        if top2[1] - top2[0] <= 2 * d.max():
            excused += 1
        else:
            assert (row["name"], row["index"]) == (top["name"], int(probs.argmax()))
            r64 = gamma(20 + 2 * np.abs(alone - alone.max()).max(), U64)
            within(row["probability"], probs.max(), np.expm1(2 * d.max()) + 2 * r64, row["path"])
    assert excused <= 2


def test_without_out_the_csv_goes_to_stdout(qdz, folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert cli.main(["predict", str(qdz), str(folder), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["predict", str(qdz), str(folder)]) == 0
    assert capsys.readouterr().out == out.read_text()


@pytest.mark.slow
def test_the_folder_path_imports_no_torch(qdz, folder, tmp_path):
    out = tmp_path / "p.csv"
    code = ("import sys\nfrom qdistill import cli\n"
            f"assert cli.main(['predict', {str(qdz)!r}, {str(folder)!r}, '--out', {str(out)!r}]) == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [row["path"] for row in read_csv(out.read_text())] == EXPECTED


def refused(argv, capsys, *words):
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err, err


def test_bad_inputs_one_line_exit_2_nothing_written(qdz, folder, tmp_path, capsys):
    out = tmp_path / "p.csv"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    refused(["predict", qdz, empty, "--out", out], capsys, "no images", str(empty))
    refused(["predict", qdz, empty], capsys, "no images")
    assert not out.exists()

    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    (bad / "a.png").write_bytes((folder / NAMES[0]).read_bytes())
    (bad / "x" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out.write_text("previous\n")
    refused(["predict", qdz, bad, "--out", out], capsys, "cannot read image", "broken.png")
    assert out.read_text() == "previous\n"  # the failed command left the old file
    assert not list(tmp_path.glob(".p.csv.*"))  # and no temp file
    out.unlink()

    refused(["predict", qdz, folder / NAMES[0], "--out", out], capsys, "--out", "not a folder")
    refused(["predict", qdz, tmp_path / "absent", "--out", out], capsys, "no such image file or folder")
    refused(["predict", qdz, "--dataset", "digits", "--out", out], capsys, "--out", "FOLDER")
    refused(["predict", qdz, folder, "--json"], capsys, "--json")
    refused(["predict", qdz, folder, "--dataset", "digits"], capsys, "not both")
    refused(["predict", tmp_path / "absent.qdz", folder, "--out", out], capsys, "absent.qdz")
    assert not out.exists()


def test_one_image_and_the_dataset_still_work(qdz, folder, capsys):
    assert cli.main(["predict", str(qdz), str(folder / NAMES[0]), "--json"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    assert cli.main(["predict", str(qdz), "--dataset", "digits", "--max-test", "20"]) == 0
    assert "accuracy" in capsys.readouterr().out
