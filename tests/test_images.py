"""qdistill.data: the imagefolder dataset (class folders of image files) and CIFAR-10/100
from archives built here in the official format."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qdistill import cli
from qdistill.data import DATASETS, cifar, imagefolder, registry
from qdistill.data.images import resize_to_uint8
from qdistill.errors import DataError

CACHE = imagefolder.CACHE_NAME


# ---------------------------------------------------------------- image folders

def save_png(path: Path, chw: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(path)


def write_split(root: Path, split: str, x: torch.Tensor, y: torch.Tensor, names=None) -> None:
    """Image i of class c as ROOT/split/<names[c]>/<i:05d>.png (lossless)."""
    for i, (img, label) in enumerate(zip(x.numpy(), y.tolist())):
        save_png(root / split / (names[label] if names else str(label)) / f"{i:05d}.png", img)


def round_robin(y: torch.Tensor) -> torch.Tensor:
    """The order imagefolder loads files written by `write_split` in: rank within the
    class (files sorted by index), then class."""
    yn = y.numpy()
    rank = np.zeros(len(yn), np.int64)
    for c in np.unique(yn):
        rank[yn == c] = np.arange((yn == c).sum())
    return torch.from_numpy(np.lexsort((yn, rank)))


@pytest.fixture(scope="module")
def digits():
    return registry.load({"dataset": "digits"})


@pytest.fixture(scope="module")
def digits_folder(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_split(root, "train", digits.x_train, digits.y_train)
    write_split(root, "test", digits.x_test, digits.y_test)
    return root


def small_folder(root: Path, per_class=(3, 2), classes=("ant", "bee", "cat"), seed=0) -> Path:
    """Random 32x32 RGB PNGs: per_class[0] per class in train, per_class[1] in test."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for name in classes:
            for i in range(n):
                save_png(root / split / name / f"{i}.png", rng.integers(0, 256, (3, 32, 32), dtype=np.uint8))
    return root


def load_folder(root, **kw):
    return registry.load({"dataset": "imagefolder", "data_dir": str(root), **kw})


def test_digits_as_pngs_load_to_the_same_tensors_then_from_the_cache(digits, digits_folder, monkeypatch):
    ds = load_folder(digits_folder)
    assert ds.name == "imagefolder" and ds.class_names == [str(i) for i in range(10)] and ds.skipped == 0
    tr, te = round_robin(digits.y_train), round_robin(digits.y_test)
    assert torch.equal(ds.x_train, digits.x_train[tr]) and torch.equal(ds.y_train, digits.y_train[tr])
    assert torch.equal(ds.x_test, digits.x_test[te]) and torch.equal(ds.y_test, digits.y_test[te])
    assert ds.y_train[:10].tolist() == list(range(10))  # round-robin: max_train stays balanced
    assert (digits_folder / CACHE).is_file()

    def no_decode(path):
        raise AssertionError(f"decoded {path} although the cache is fresh")
    monkeypatch.setattr(imagefolder, "decode", no_decode)
    monkeypatch.setitem(sys.modules, "PIL", None)  # a cached load needs no Pillow
    again = load_folder(digits_folder)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    assert again.fingerprint == ds.fingerprint and again.class_names == ds.class_names


def counting_decode(monkeypatch) -> list[str]:
    calls, real = [], imagefolder.decode

    def decode(path):
        calls.append(Path(path).relative_to(Path(path).parents[2]).as_posix())
        return real(path)
    monkeypatch.setattr(imagefolder, "decode", decode)
    return calls


def test_cache_invalidated_by_any_file_change(tmp_path, monkeypatch):
    root = small_folder(tmp_path)
    calls = counting_decode(monkeypatch)
    first = load_folder(root)
    assert len(calls) == 15 and first.x_train.shape == (9, 3, 32, 32) and first.x_test.shape == (6, 3, 32, 32)
    assert first.y_train.tolist() == [0, 1, 2] * 3 and first.class_names == ["ant", "bee", "cat"]
    (root / "train" / "bee" / "notes.txt").write_text("not an image\n")  # ignored, key unchanged
    (root / "test" / ".DS_Store").write_bytes(b"\0")
    assert load_folder(root).fingerprint == first.fingerprint and len(calls) == 15

    # a rewritten file (new bytes, later mtime) changes the key and the tensors
    new = np.full((3, 32, 32), 7, np.uint8)
    img = root / "train" / "bee" / "1.png"
    st = img.stat()
    save_png(img, new)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    calls.clear()
    changed = load_folder(root)
    assert len(calls) == 15 and changed.fingerprint != first.fingerprint
    assert torch.equal(changed.x_train[4], torch.from_numpy(new))  # rank 1 of class 1
    # a touch alone, an added file and a removed file each invalidate too
    for change in (lambda: os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 4_000_000_000)),
                   lambda: save_png(root / "test" / "cat" / "9.png", new),
                   lambda: (root / "test" / "cat" / "9.png").unlink()):
        change()
        calls.clear()
        load_folder(root)
        assert len(calls) > 0
    calls.clear()
    assert load_folder(root).fingerprint == changed.fingerprint and calls == []


def test_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    root = small_folder(tmp_path)
    first = load_folder(root)
    cache = root / CACHE
    cache.write_bytes(cache.read_bytes()[:-200])
    calls = counting_decode(monkeypatch)
    assert torch.equal(load_folder(root).x_train, first.x_train) and len(calls) == 15
    calls.clear()
    load_folder(root)
    assert calls == []


def test_formats_modes_and_sizes(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "b" / "nested").mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "train" / "a" / "0.BMP")
    Image.fromarray(big).save(tmp_path / "train" / "a" / "1.png")
    Image.fromarray(grey).save(tmp_path / "train" / "b" / "0.png")
    Image.fromarray(rgba).save(tmp_path / "train" / "b" / "nested" / "1.webp", lossless=True)
    smooth = np.stack([*np.meshgrid(np.arange(32) * 8, np.arange(32) * 4, indexing="ij"), np.full((32, 32), 99)],
                      -1).astype(np.uint8)  # JPEG keeps gradients, not noise
    Image.fromarray(smooth).save(tmp_path / "test" / "a" / "0.jpg", quality=95)
    Image.fromarray(grey).save(tmp_path / "test" / "b" / "0.jpeg")
    ds = load_folder(tmp_path)
    chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # noqa: E731
    assert ds.y_train.tolist() == [0, 1, 0, 1]
    assert torch.equal(ds.x_train[0], chw(rgb))                     # BMP, lossless, unchanged
    assert torch.equal(ds.x_train[1], torch.from_numpy(np.repeat(grey[None], 3, 0)))  # grey -> RGB
    assert torch.equal(ds.x_train[3], chw(rgba[..., :3]))           # alpha dropped, subfolder found
    assert torch.equal(ds.x_train[2], resize_to_uint8(chw(big)[None].float())[0])  # 64x48 -> 32x32 bilinear
    decoded = np.asarray(Image.open(tmp_path / "test" / "a" / "0.jpg").convert("RGB"))
    assert torch.equal(ds.x_test[0], chw(decoded))                  # JPEG: whatever Pillow decodes
    assert (ds.x_test[0].int() - chw(smooth).int()).abs().float().mean() < 3


def bad_layouts():
    def no_test(root):
        import shutil
        shutil.rmtree(root / "test")
        return "test/"

    def no_train(root):
        import shutil
        shutil.rmtree(root / "train")
        return "train/"

    def empty_class(root):
        for f in (root / "test" / "bee").iterdir():
            f.unlink()
        (root / "test" / "bee" / "readme.txt").write_text("x")  # not an image
        return str(root / "test" / "bee")

    def extra_class(root):
        save_png(root / "train" / "dog" / "0.png", np.zeros((3, 32, 32), np.uint8))
        return "only in train: dog"

    def no_classes(root):
        import shutil
        for split in ("train", "test"):
            shutil.rmtree(root / split)
            (root / split).mkdir()
        (root / "train" / "stray.png").write_bytes(b"")  # not in a class folder: ignored
        return "no class folders"

    def one_class(root):
        import shutil
        for split in ("train", "test"):
            for name in ("bee", "cat"):
                shutil.rmtree(root / split / name)
        return "single class folder (ant)"

    def corrupt(root):
        (root / "train" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        return str(root / "train" / "cat" / "1.png")

    def truncated(root):
        p = root / "test" / "ant" / "0.png"
        p.write_bytes(p.read_bytes()[:60])
        return str(p)

    return [no_test, no_train, empty_class, extra_class, no_classes, one_class, corrupt, truncated]


@pytest.mark.parametrize("breaks", bad_layouts(), ids=lambda f: f.__name__)
def test_bad_folders_are_one_line_data_errors_and_leave_no_cache(tmp_path, breaks):
    root = small_folder(tmp_path / "root")
    words = breaks(root)
    with pytest.raises(DataError) as e:
        load_folder(root)
    msg = str(e.value)
    assert words in msg and "\n" not in msg
    assert not (root / CACHE).exists() and not list(root.glob(f".{CACHE}*"))
    if breaks.__name__ in ("corrupt", "truncated"):
        assert "skip_bad_images" in msg


def test_missing_root_and_data_dir(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_folder(tmp_path / "nope")
    for data in ({"dataset": "imagefolder"}, {"dataset": "imagefolder", "data_dir": registry.UNSET_DIR}):
        with pytest.raises(DataError, match="--data-dir ROOT"):
            registry.load(data)


def test_skip_bad_images_skips_and_counts(tmp_path):
    root = small_folder(tmp_path)
    (root / "train" / "bee" / "0.png").write_bytes(b"not an image")
    (root / "test" / "cat" / "1.png").write_bytes(b"")
    ds = load_folder(root, skip_bad_images=True)  # silently: the command says it in one line
    assert ds.skipped == 2 and ds.x_train.shape[0] == 8 and ds.x_test.shape[0] == 5
    listed = imagefolder.skipped_list(root).read_text().splitlines()
    assert [line.split(":")[0] for line in listed] == ["train/bee/0.png", "test/cat/1.png"]
    assert ds.y_train.tolist() == [0, 2, 0, 1, 2, 0, 1, 2]  # bee's first image is gone
    small = registry.load({"dataset": "imagefolder", "data_dir": str(root), "skip_bad_images": True,
                           "max_train": 3})
    assert small.skipped == 2 and small.y_train.tolist() == [0, 2, 0]  # limit() keeps the count
    # the cache remembers the bad files, so without skipping the error comes back from it
    with pytest.raises(DataError, match=r"bee/0\.png"):
        load_folder(root)
    # a class whose every image of a split is unreadable is an error even when skipping
    for f in (root / "test" / "ant").iterdir():
        f.write_bytes(b"x")
    with pytest.raises(DataError, match=r"test/ant: none of its images"):
        load_folder(root, skip_bad_images=True)


def test_without_pillow_one_line_says_what_to_install(tmp_path, monkeypatch):
    root = small_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(DataError, match=r"pip install 'qdistill\[deploy\]'"):
        load_folder(root)
    assert not (root / CACHE).exists()


def test_cli_trains_on_a_folder_and_refuses_a_bad_one(digits, tmp_path, capsys):
    root = tmp_path / "imgs"
    write_split(root, "train", digits.x_train[:150], digits.y_train[:150])
    write_split(root, "test", digits.x_test[:40], digits.y_test[:40])
    (root / "train" / "3" / "bad.png").write_bytes(b"broken")
    out = tmp_path / "teacher"
    args = ["teacher", "--dataset", "imagefolder", "--data-dir", str(root), "--epochs", "1", "--batch-size", "64",
            "--quiet", "--set", "data.skip_bad_images=true", "--out", str(out)]
    capsys.readouterr()
    assert cli.main(args) == 0
    listed = root / imagefolder.SKIPPED_NAME
    err = capsys.readouterr().err.splitlines()  # (then a warning: a 1-epoch teacher ends at chance)
    assert err[0] == f"qdistill: skipped 1 unreadable image(s) (data.skip_bad_images); their list: {listed}"
    assert listed.read_text().startswith("train/3/bad.png: ")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["epochs"] == 1
    assert 'dataset = "imagefolder"' in (out / "config.toml").read_text()

    capsys.readouterr()
    bad = small_folder(tmp_path / "bad")
    (bad / "test" / "cat" / "0.png").unlink()
    (bad / "test" / "cat" / "1.png").unlink()
    never = tmp_path / "never"
    assert cli.main(["teacher", "--dataset", "imagefolder", "--data-dir", str(bad), "--epochs", "1", "--quiet",
                     "--out", str(never)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad / "test" / "cat") in err[0]
    assert not never.exists() and not (bad / CACHE).exists()


# ---------------------------------------------------------------- CIFAR archives

class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle (protocol 2) wrote for the official batches: every
    str and bytes as a byte string, numpy's arrays under ``numpy.core.multiarray``."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_string(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(b)]) if len(b) < 256 else pickle.BINSTRING + struct.pack("<i", len(b))
        self.write(head + b)
        self.memoize(obj)
    dispatch[str] = save_string
    dispatch[bytes] = save_string


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_cifar(folder: Path, name: str, n=4, seed=0) -> dict:
    """A small archive in the official layout: ``n`` images per batch file."""
    spec = cifar.SPECS[name]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    members, arrays = {}, {"x": [], "y": []}
    for m in (*spec.train, spec.test):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, spec.classes, n).tolist()
        batch = {"batch_label": f"batch {m}", "data": data, "filenames": [f"img_{i}.png" for i in range(n)]}
        if name == "cifar10":
            batch["labels"] = labels
        else:
            batch.update(fine_labels=labels, coarse_labels=[(v + 1) % 20 for v in labels])
        members[f"{spec.folder}/{m}"] = py2_pickle(batch)
        arrays["x"].append(data)
        arrays["y"].append(labels)
    names = [f"class{i}" for i in range(spec.classes)]
    meta = ({"num_cases_per_batch": n, "label_names": names, "num_vis": 3072} if name == "cifar10"
            else {"fine_label_names": names, "coarse_label_names": [f"super{i}" for i in range(20)]})
    members[f"{spec.folder}/{spec.meta}"] = py2_pickle(meta)
    members[f"{spec.folder}/readme.html"] = b"<html></html>"
    cifar_tar(folder / spec.archive, members)
    k = len(spec.train)
    return {"x_train": np.concatenate(arrays["x"][:k]), "y_train": sum(arrays["y"][:k], []),
            "x_test": arrays["x"][k], "y_test": arrays["y"][k], "names": names}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_images_labels_and_names(tmp_path, name, monkeypatch):
    a = write_cifar(tmp_path, name)
    archive = tmp_path / cifar.SPECS[name].archive
    monkeypatch.setitem(cifar.MD5, archive.name, hashlib.md5(archive.read_bytes()).hexdigest())
    ds = registry.load({"dataset": name, "data_dir": str(tmp_path), "verify": True})
    n_train = 20 if name == "cifar10" else 4
    assert ds.name == name and ds.x_train.shape == (n_train, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.class_names == a["names"] and ds.num_classes == cifar.SPECS[name].classes
    # row r of `data` is image r in CHW order: 1024 red, 1024 green, 1024 blue, each row-major
    assert ds.x_train[3, 1, 2, 3] == a["x_train"][3, 1024 + 2 * 32 + 3]
    assert torch.equal(ds.x_train, torch.from_numpy(a["x_train"]).view(-1, 3, 32, 32))
    assert torch.equal(ds.x_test, torch.from_numpy(a["x_test"]).view(-1, 3, 32, 32))
    assert ds.y_train.tolist() == a["y_train"] and ds.y_test.tolist() == a["y_test"]  # fine labels for 100


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_md5_refused_with_verify(tmp_path, name):
    write_cifar(tmp_path, name)
    archive = tmp_path / cifar.SPECS[name].archive
    with pytest.raises(DataError) as e:
        cifar.load(name, tmp_path, verify=True)
    msg = str(e.value)
    assert archive.name in msg and cifar.MD5[archive.name] in msg and "--no-verify" in msg and "\n" not in msg
    assert cifar.load(name, tmp_path, verify=False).x_test.shape == (4, 3, 32, 32)


def test_cifar_official_md5s():
    # the archives' published checksums (also torchvision's tgz_md5)
    assert cifar.MD5 == {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
                         "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}


def corrupt_archives(tmp_path: Path):
    spec = cifar.SPECS["cifar10"]
    good = (tmp_path / "good")
    write_cifar(good, "cifar10")
    raw = (good / spec.archive).read_bytes()
    yield "truncated", raw[: len(raw) // 2], "not a readable tar.gz"
    yield "garbage", b"this is no archive" * 100, "not a readable tar.gz"
    with tarfile.open(good / spec.archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    less = {k: v for k, v in members.items() if not k.endswith("data_batch_3")}
    buf = tmp_path / "less.tar.gz"
    cifar_tar(buf, less)
    yield "missing batch", buf.read_bytes(), "lacks cifar-10-batches-py/data_batch_3"
    evil = dict(members)
    marker = tmp_path / "pwned"
    evil[f"{spec.folder}/test_batch"] = pickle.dumps(functools.partial(os.system, f"touch {marker}"), protocol=2)
    evil_path = tmp_path / "evil.tar.gz"
    cifar_tar(evil_path, evil)
    yield "code in a pickle", evil_path.read_bytes(), "refusing to load"
    bad_labels = dict(members)
    bad_labels[f"{spec.folder}/test_batch"] = py2_pickle({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})
    path = tmp_path / "labels.tar.gz"
    cifar_tar(path, bad_labels)
    yield "label 10", path.read_bytes(), "outside 0..9"


def test_corrupt_cifar_archives_are_data_errors(tmp_path):
    for what, data, words in corrupt_archives(tmp_path):
        folder = tmp_path / what.replace(" ", "_")
        folder.mkdir()
        (folder / cifar.SPECS["cifar10"].archive).write_bytes(data)
        with pytest.raises(DataError) as e:
            cifar.load("cifar10", folder, verify=False)
        assert words in str(e.value) and cifar.SPECS["cifar10"].archive in str(e.value), what
        assert "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_cifar_downloads_when_missing_into_its_default_folder(tmp_path, monkeypatch):
    src = tmp_path / "server"
    a = write_cifar(src, "cifar10")
    archive = src / cifar.SPECS["cifar10"].archive
    monkeypatch.setitem(cifar.MD5, archive.name, hashlib.md5(archive.read_bytes()).hexdigest())
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(src)))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    try:
        # no data_dir given: CIFAR's own default folder
        ds = cifar.load("cifar10", registry.RECORDS["cifar10"].default_dir, verify=True, base_url=url)
    finally:
        srv.shutdown()
        srv.server_close()
    dest = home / ".cache" / "qdistill" / "cifar10" / archive.name
    assert dest.read_bytes() == archive.read_bytes() and ds.y_test.tolist() == a["y_test"]
    info = {d["name"]: d for d in registry.describe(None)}
    assert set(info) == set(DATASETS)
    assert info["cifar10"]["data_dir"] == str(dest.parent) and info["cifar10"]["files"] == {archive.name: True}
    assert info["cifar100"]["files"] == {"cifar-100-python.tar.gz": False}
    # through the registry, with the default data_dir, the same folder is used (no download now)
    assert registry.load({"dataset": "cifar10", "data_dir": registry.UNSET_DIR}).fingerprint == ds.fingerprint


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
