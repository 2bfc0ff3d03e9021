"""qdistill.data: loaders (svhn, digits, npz, fake), downloads, split, batches, augmentation."""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

from qdistill.data import DATASETS, augment, batching, digits, download, fake, registry, svhn
from qdistill.data.dataset import tensor_digest
from qdistill.data.images import resize_to_uint8
from qdistill.errors import DataError


# ---------------------------------------------------------------- svhn .mat files

def svhn_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's layout: X uint8 (32, 32, 3, N), y uint8 (N, 1) in 1..10, some 10s (digit 0)."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[::7] = 10
    return X, y


def write_svhn(folder, n_train=50, n_test=20, seed=0):
    Xtr, ytr = svhn_arrays(n_train, seed)
    Xte, yte = svhn_arrays(n_test, seed + 1)
    scipy.io.savemat(folder / "train_32x32.mat", {"X": Xtr, "y": ytr})
    scipy.io.savemat(folder / "test_32x32.mat", {"X": Xte, "y": yte})
    return Xtr, ytr, Xte, yte


def md5_of(path) -> str:
    return hashlib.md5((path).read_bytes()).hexdigest()


def cache_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".mat"))


def test_svhn_loader_layout_and_labels(tmp_path):
    Xtr, ytr, Xte, yte = write_svhn(tmp_path)
    ds = registry.load({"dataset": "svhn", "data_dir": str(tmp_path), "verify": False})
    assert ds.name == "svhn" and ds.num_classes == 10 and ds.class_names == [str(i) for i in range(10)]
    assert ds.x_train.shape == (50, 3, 32, 32) and ds.x_test.shape == (20, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.x_train.is_contiguous() and ds.x_test.is_contiguous()
    # pixel [h, w, c] of image i is x[i, c, h, w]
    assert ds.x_train[3, 2, 5, 17] == Xtr[5, 17, 2, 3] and ds.x_test[19, 0, 31, 0] == Xte[31, 0, 0, 19]
    assert torch.equal(ds.x_train, torch.from_numpy(Xtr).permute(3, 2, 0, 1))
    assert torch.equal(ds.x_test, torch.from_numpy(Xte).permute(3, 2, 0, 1))
    # label 10 means digit 0; the others keep their value
    expect = ytr[:, 0].astype(np.int64) % 10
    assert torch.equal(ds.y_train, torch.from_numpy(expect))
    assert (ds.y_train[::7] == 0).all() and int(ds.y_train.max()) <= 9
    assert torch.equal(ds.y_test, torch.from_numpy(yte[:, 0].astype(np.int64) % 10))


def test_svhn_md5_failure_names_file_and_flag(tmp_path):
    write_svhn(tmp_path)
    with pytest.raises(DataError) as e:
        registry.load({"dataset": "svhn", "data_dir": str(tmp_path), "verify": True})
    msg = str(e.value)
    assert "md5" in msg and "train_32x32.mat" in msg and "--no-verify" in msg
    assert svhn.MD5["train_32x32.mat"] in msg and md5_of(tmp_path / "train_32x32.mat") in msg
    assert "\n" not in msg
    assert cache_files(tmp_path) == []


def test_svhn_md5_checked_once_per_file_version(tmp_path, monkeypatch):
    write_svhn(tmp_path)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        monkeypatch.setitem(svhn.MD5, name, md5_of(tmp_path / name))
    first = svhn.load(tmp_path, verify=True)

    def no_md5(path):
        raise AssertionError("md5 recomputed for an unchanged, verified file")
    monkeypatch.setattr(svhn, "md5_file", no_md5)
    again = svhn.load(tmp_path, verify=True)
    assert again.fingerprint == first.fingerprint


def test_svhn_truncated_mat_is_a_data_error(tmp_path):
    write_svhn(tmp_path)
    mat = tmp_path / "train_32x32.mat"
    mat.write_bytes(mat.read_bytes()[:5000])
    with pytest.raises(DataError, match="train_32x32.mat"):
        svhn.load(tmp_path, verify=False)
    assert cache_files(tmp_path) == []  # nothing half-written


@pytest.mark.parametrize("arrays, match", [
    ({"X": np.zeros((32, 32, 3, 4), np.uint8), "labels": np.ones((4, 1))}, "lacks the variable"),
    ({"X": np.zeros((28, 28, 3, 4), np.uint8), "y": np.ones((4, 1))}, r"\(32, 32, 3, N\)"),
    ({"X": np.zeros((32, 32, 3, 4), np.float64), "y": np.ones((4, 1))}, "uint8"),
    ({"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((3, 1))}, "4 numeric labels"),
    ({"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.full((4, 1), 11)}, "outside"),
])
def test_svhn_wrong_layout(tmp_path, arrays, match):
    write_svhn(tmp_path)
    scipy.io.savemat(tmp_path / "train_32x32.mat", arrays)
    with pytest.raises(DataError, match=match):
        svhn.load(tmp_path, verify=False)
    assert not any(n.startswith("train") for n in cache_files(tmp_path))


def test_svhn_cache_created_reused_and_invalidated(tmp_path, monkeypatch):
    write_svhn(tmp_path)
    first = svhn.load(tmp_path, verify=False)
    assert {"train_32x32.x.npy", "train_32x32.y.npy", "train_32x32.cache.json",
            "test_32x32.x.npy", "test_32x32.y.npy", "test_32x32.cache.json"} == set(cache_files(tmp_path))
    assert np.array_equal(np.load(tmp_path / "train_32x32.x.npy"), first.x_train.numpy())

    real_loadmat, reads = scipy.io.loadmat, []

    def counting_loadmat(path, *a, **k):
        reads.append(os.path.basename(path))
        return real_loadmat(path, *a, **k)
    monkeypatch.setattr(scipy.io, "loadmat", counting_loadmat)
    cached = svhn.load(tmp_path, verify=False)
    assert reads == []  # served from the .npy cache
    assert torch.equal(cached.x_train, first.x_train) and torch.equal(cached.y_train, first.y_train)
    assert cached.fingerprint == first.fingerprint

    # a changed .mat (new content, later mtime) is converted again, the other file is not
    X2, y2 = svhn_arrays(50, seed=7)
    mat = tmp_path / "train_32x32.mat"
    st = mat.stat()
    scipy.io.savemat(mat, {"X": X2, "y": y2})
    os.utime(mat, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    changed = svhn.load(tmp_path, verify=False)
    assert reads == ["train_32x32.mat"]
    assert torch.equal(changed.x_train, torch.from_numpy(X2).permute(3, 2, 0, 1))
    assert changed.fingerprint != first.fingerprint
    assert torch.equal(changed.x_test, first.x_test)
    assert svhn.load(tmp_path, verify=False).fingerprint == changed.fingerprint and len(reads) == 1


def test_svhn_damaged_cache_is_rebuilt(tmp_path):
    write_svhn(tmp_path)
    first = svhn.load(tmp_path, verify=False)
    xp = tmp_path / "train_32x32.x.npy"
    xp.write_bytes(xp.read_bytes()[:1000])
    again = svhn.load(tmp_path, verify=False)
    assert torch.equal(again.x_train, first.x_train)
    assert np.array_equal(np.load(xp), first.x_train.numpy())


def test_svhn_extra_appends_to_train(tmp_path):
    Xtr, _, _, _ = write_svhn(tmp_path)
    Xex, yex = svhn_arrays(30, seed=5)
    scipy.io.savemat(tmp_path / "extra_32x32.mat", {"X": Xex, "y": yex})
    base = svhn.load(tmp_path, verify=False)
    ds = svhn.load(tmp_path, extra=True, verify=False)
    assert ds.x_train.shape[0] == 80 and torch.equal(ds.x_train[:50], base.x_train)
    assert torch.equal(ds.x_train[50:], torch.from_numpy(Xex).permute(3, 2, 0, 1))
    assert torch.equal(ds.y_train[50:], torch.from_numpy(yex[:, 0].astype(np.int64) % 10))
    assert ds.fingerprint != base.fingerprint


# ---------------------------------------------------------------- downloads

@pytest.fixture
def server(monkeypatch):
    """A local HTTP server on 127.0.0.1 with Range support, a request log and a switch to
    cut a response short."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    st = types.SimpleNamespace(files={}, log=[], sent=[], honour_range=True, cut=None)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = st.files.get(self.path.lstrip("/"))
            rng = self.headers.get("Range")
            st.log.append(rng)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if rng and st.honour_range:
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            chunk = body[start:] if st.cut is None else body[start:start + st.cut]
            st.sent.append(len(chunk))  # before writing: the client may finish as the bytes land
            self.wfile.write(chunk)
            self.close_connection = True

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    st.url = f"http://127.0.0.1:{srv.server_address[1]}/"
    yield st
    srv.shutdown()
    srv.server_close()


PAYLOAD = np.random.default_rng(3).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


def test_fetch_resumes_an_interrupted_download(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    dest = tmp_path / "sub" / "f.bin"
    server.cut = 70_000
    with pytest.raises(DataError, match="resume"):
        download.fetch(server.url + "f.bin", dest, PAYLOAD_MD5)
    part = tmp_path / "sub" / "f.bin.part"
    assert not dest.exists() and part.read_bytes() == PAYLOAD[:70_000]
    server.cut = None
    download.fetch(server.url + "f.bin", dest, PAYLOAD_MD5)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert server.log == [None, "bytes=70000-"] and server.sent == [70_000, len(PAYLOAD) - 70_000]


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    server.honour_range = False
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)
    download.fetch(server.url + "f.bin", dest, PAYLOAD_MD5)
    assert dest.read_bytes() == PAYLOAD and server.sent == [len(PAYLOAD)]


def test_fetch_stale_part_starts_over(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # not the file's first bytes
    download.fetch(server.url + "f.bin", dest, PAYLOAD_MD5)
    assert dest.read_bytes() == PAYLOAD
    assert server.log == ["bytes=1000-", None]


def test_fetch_wrong_md5_leaves_nothing(server, tmp_path):
    server.files["f.bin"] = PAYLOAD
    dest = tmp_path / "f.bin"
    with pytest.raises(DataError, match=f"md5 {PAYLOAD_MD5}, expected 0+"):
        download.fetch(server.url + "f.bin", dest, "0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_fetch_http_error_and_unreachable(server, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download.fetch(server.url + "missing.bin", tmp_path / "missing.bin", PAYLOAD_MD5)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "train_32x32.mat"
    with pytest.raises(DataError) as e:
        download.fetch(f"http://127.0.0.1:{port}/train_32x32.mat", dest, PAYLOAD_MD5, timeout=5)
    assert f"place it at {dest}" in str(e.value)


def test_svhn_downloads_missing_files(server, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    Xtr, ytr, _, _ = write_svhn(src)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        server.files[name] = (src / name).read_bytes()
        monkeypatch.setitem(svhn.MD5, name, md5_of(src / name))
    dest = tmp_path / "svhn"
    ds = svhn.load(dest, verify=True, base_url=server.url)
    assert (dest / "train_32x32.mat").read_bytes() == server.files["train_32x32.mat"]
    assert torch.equal(ds.x_train, torch.from_numpy(Xtr).permute(3, 2, 0, 1))
    info = registry.describe(dest)[0]
    assert info["data_dir"] == str(dest)
    assert info["files"] == {"train_32x32.mat": True, "test_32x32.mat": True, "extra_32x32.mat": False}
    assert info["cached"]["train_32x32.mat"] and not info["cached"]["extra_32x32.mat"]


# ---------------------------------------------------------------- npz

def write_npz(path, **over):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "y_train": np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]),
        "x_test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "y_test": np.array([6, 0, 1, 2, 3]),
    }
    arrays.update(over)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_grey_28_is_resized_and_repeated(tmp_path):
    path = tmp_path / "d.npz"
    a = write_npz(path, x_train=np.full((12, 28, 28), 77, np.uint8))
    ds = registry.load({"dataset": "npz", "data_path": str(path)})
    assert ds.x_train.shape == (12, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    assert (ds.x_train == 77).all()  # a constant image stays constant through bilinear resizing
    assert torch.equal(ds.x_test[:, 0], ds.x_test[:, 1]) and torch.equal(ds.x_test[:, 0], ds.x_test[:, 2])
    # the resize of the test images follows torch's bilinear interpolation
    ref = F.interpolate(torch.from_numpy(a["x_test"])[:, None].float(), size=(32, 32), mode="bilinear",
                        align_corners=False).round().to(torch.uint8)
    assert torch.equal(ds.x_test[:, :1], ref)
    assert ds.num_classes == 7  # max label 6 is in test only
    assert torch.equal(ds.y_test, torch.tensor([6, 0, 1, 2, 3]))


def test_npz_rgb_32_passes_through_with_names(tmp_path):
    path = tmp_path / "d.npz"
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_npz(path, x_train=x, y_train=np.array([0, 1, 1, 0], np.uint8), x_test=x[:2],
              y_test=np.array([[1], [0]]), class_names=np.array(["cat", "dog"]))
    ds = npz_load(path)
    assert torch.equal(ds.x_train, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert ds.class_names == ["cat", "dog"] and ds.y_test.tolist() == [1, 0]


def npz_load(path):
    return registry.load({"dataset": "npz", "data_path": str(path)})


@pytest.mark.parametrize("over, match", [
    ({"y_test": None}, "lacks the array.*y_test"),
    ({"x_train": None, "y_train": None}, "x_train, y_train"),
    ({"y_train": np.zeros(11, np.int64)}, "12 images but y_train has 11"),
    ({"y_train": np.zeros(12, np.float32)}, "integer labels"),
    ({"y_test": np.array([0, 1, -1, 2, 3])}, "negative"),
    ({"x_train": np.zeros((12, 28, 28), np.float32)}, "uint8"),
    ({"x_train": np.zeros((12, 28, 28, 5), np.uint8)}, "C 1 or 3"),
    ({"x_train": np.zeros((12, 3, 28, 28), np.uint8)}, "channel-first"),
    ({"x_test": np.zeros((0, 28, 28), np.uint8), "y_test": np.zeros(0, np.int64)}, "empty"),
    ({"y_train": np.zeros(12, np.int64), "y_test": np.zeros(5, np.int64)}, "at least 2"),
    ({"class_names": np.array(["a", "b"])}, "class_names must be 7"),
])
def test_npz_errors(tmp_path, over, match):
    path = tmp_path / "d.npz"
    write_npz(path, **over)
    with pytest.raises(DataError, match=match):
        npz_load(path)


def test_npz_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        npz_load(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_text("not an archive\n")
    with pytest.raises(DataError, match=r"not a valid .npz file \(not a zip archive of .npy arrays\)$"):
        npz_load(bad)  # numpy's own message would speak of pickles and allow_pickle
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        npz_load(single)
    with pytest.raises(DataError, match="data_path"):
        registry.load({"dataset": "npz", "data_path": ""})


# ---------------------------------------------------------------- digits, fake, load()

def test_resize_matches_hand_computed_bilinear():
    # 2 -> 8 pixels: output o samples input at clamp((o + 0.5) / 4 - 0.5, 0, 1)
    x = torch.tensor([[0.0, 160.0], [0.0, 160.0]])[None, None]
    row = [0, 0, 20, 60, 100, 140, 160, 160]
    out = resize_to_uint8(x, size=8)
    assert out[0, 0].tolist() == [row] * 8
    assert resize_to_uint8(x.transpose(2, 3), size=8)[0, 0].T.tolist() == [row] * 8


def test_digits_split_and_images():
    from sklearn.datasets import load_digits

    ds = registry.load({"dataset": "digits"})
    assert ds.x_train.shape == (1438, 3, 32, 32) and ds.x_test.shape == (359, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64 and ds.num_classes == 10
    assert torch.equal(ds.x_train[:, 0], ds.x_train[:, 2])
    src = load_digits()
    tr, te = digits.split_indices(torch.from_numpy(src.target))
    assert len(set(tr.tolist()) | set(te.tolist())) == 1797 and not set(tr.tolist()) & set(te.tolist())
    assert torch.equal(ds.y_train, torch.from_numpy(src.target)[tr])
    counts = torch.bincount(torch.from_numpy(src.target), minlength=10)
    assert ((torch.bincount(ds.y_test, minlength=10) - 0.2 * counts).abs() <= 0.5).all()  # stratified
    # the images are the sources scaled 0..16 -> 0..255 and upsampled (resize_to_uint8 is
    # checked against hand-computed values above), in the split's order
    orig = torch.from_numpy(src.images).float() * 255 / 16
    assert torch.equal(ds.x_test[:, :1], resize_to_uint8(orig[te, None]))
    assert torch.equal(ds.x_train[:, :1], resize_to_uint8(orig[tr, None]))
    # and not transposed: 4x4 block means track the source far better than its transpose
    pooled = F.avg_pool2d(ds.x_test[:, :1].float(), 4)[:, 0]
    err = (pooled - orig[te]).abs().mean()
    assert err < 0.5 * (pooled - orig[te].transpose(1, 2)).abs().mean()
    assert int(ds.x_train.max()) == 255 and int(ds.x_train.min()) == 0
    assert registry.load({"dataset": "digits"}).fingerprint == ds.fingerprint


def test_digits_decoded_once_per_process_give_each_load_its_own_tensors():
    """The kept digests are those of the tensors handed out, and a caller that writes into
    its copy changes no later load."""
    first = digits.load()
    assert first.digests == {k: tensor_digest(getattr(first, k)) for k in ("x_train", "y_train", "x_test", "y_test")}
    first.x_train[0] += 1
    first.y_test[0] = 9 - first.y_test[0]
    again = digits.load()
    assert not torch.equal(again.x_train[0], first.x_train[0]) and again.y_test[0] != first.y_test[0]
    assert again.digests == {k: tensor_digest(getattr(again, k)) for k in ("x_train", "y_train", "x_test", "y_test")}


def test_load_limits_and_unknown():
    full = registry.load({"dataset": "digits"})
    small = registry.load({"dataset": "digits", "max_train": 100, "max_test": 30})
    assert torch.equal(small.x_train, full.x_train[:100]) and torch.equal(small.y_test, full.y_test[:30])
    assert small.fingerprint != full.fingerprint
    only_test = registry.load({"dataset": "digits", "max_test": 30})
    assert only_test.fingerprint not in (full.fingerprint, small.fingerprint)
    assert registry.load({"dataset": "digits", "max_train": 10**6}).fingerprint == full.fingerprint
    with pytest.raises(DataError, match="unknown dataset"):
        registry.load({"dataset": "mnist"})


def test_every_dataset_has_one_record_whose_sizes_are_the_datas():
    """One record per dataset, in the order of `DATASETS`; its sizes and classes are what
    `train_size`, `num_classes` and `describe` say, and digits loads to them (issue 30, item 6)."""
    assert tuple(registry.RECORDS) == DATASETS
    described = {d["name"]: d for d in registry.describe(None)}
    for name, rec in registry.RECORDS.items():
        own = name in ("npz", "imagefolder")  # the user's data: no fixed sizes, a key it needs
        assert rec.description and (rec.sizes is None) == (rec.classes is None) == (rec.needs is not None) == own
        assert registry.num_classes({"dataset": name}) == rec.classes
        assert registry.train_size({"dataset": name}) == (None if own else rec.sizes["train"])
        fixed = rec.sizes or {"train": None, "test": None}
        assert {k: described[name].get(k) for k in fixed} == fixed
    ds = registry.load({"dataset": "digits"})
    assert {"train": len(ds.y_train), "test": len(ds.y_test)} == registry.RECORDS["digits"].sizes
    assert registry.train_size({"dataset": "svhn", "extra": True}) == svhn.SIZES["train"] + svhn.SIZES["extra"]


def test_an_unknown_dataset_is_refused_in_one_line(tmp_path, capsys):
    from qdistill import cli
    with pytest.raises(DataError) as refused:
        registry.load({"dataset": "mnist"})
    assert str(refused.value) == f"unknown dataset 'mnist'; known: {', '.join(DATASETS)}"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ndataset = "mnist"\n')
    assert cli.main(["datasets", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mnist" in err[0] and err[0].startswith("qdistill: error: ")


def test_no_folder_given_is_none_and_means_the_datasets_own_folder(monkeypatch):
    """``data_dir`` absent, empty or the schema's unset value: the registry passes the
    record's own folder (CIFAR-10's, not SVHN's); imagefolder, which has none, refuses."""
    seen, small = [], fake.load(20, 10)
    monkeypatch.setattr(registry.cifar, "load", lambda name, folder, verify=True: seen.append(folder) or small)
    for given in ({}, {"data_dir": None}, {"data_dir": ""}, {"data_dir": registry.UNSET_DIR}, {"data_dir": "/c10"}):
        registry.load({"dataset": "cifar10", **given})
    assert seen == ["~/.cache/qdistill/cifar10"] * 4 + ["/c10"]
    for given in ({}, {"data_dir": None}, {"data_dir": ""}):
        with pytest.raises(DataError, match=r"^dataset imagefolder needs data_dir \(--data-dir ROOT"):
            registry.load({"dataset": "imagefolder", **given})


def test_fake_deterministic_and_sized():
    a, b = fake.load(40, 10), fake.load(40, 10)
    assert torch.equal(a.x_train, b.x_train) and a.fingerprint == b.fingerprint
    assert a.x_train.shape == (40, 3, 32, 32) and a.x_test.shape == (10, 3, 32, 32)
    assert a.x_train.is_contiguous() and a.x_test.is_contiguous()
    assert fake.load(40, 10, seed=1).fingerprint != a.fingerprint
    assert (fake.N_TRAIN, fake.N_TEST) == (svhn.SIZES["train"], svhn.SIZES["test"])
    assert len(torch.unique(a.x_train)) > 200  # bytes spread over 0..255


def test_describe_lists_every_dataset(tmp_path):
    (tmp_path / "test_32x32.mat").write_bytes(b"")
    info = {d["name"]: d for d in registry.describe(tmp_path)}
    assert set(info) == set(DATASETS)
    assert info["svhn"]["files"]["test_32x32.mat"] and not info["svhn"]["files"]["train_32x32.mat"]
    assert all(d["description"] for d in info.values())


# ---------------------------------------------------------------- split, batches, augmentation

def test_split_val():
    tr, va = batching.split_val(1000, 0.05, seed=3)
    assert len(va) == 50 and len(tr) == 950 and tr.dtype == va.dtype == torch.int64
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(1000))
    tr2, va2 = batching.split_val(1000, 0.05, seed=3)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(batching.split_val(1000, 0.05, seed=4)[1], va)
    assert not torch.equal(va, torch.arange(50))  # random, not the first images
    assert len(batching.split_val(100, 0.001, seed=0)[1]) == 1
    assert len(batching.split_val(100, 0.0, seed=0)[1]) == 0
    with pytest.raises(DataError):
        batching.split_val(1, 0.5, seed=0)


def small_set(n=10):
    x = (torch.arange(n, dtype=torch.uint8) * 25).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    x[:, 1] += 1  # channels differ, so a channel mix-up shows
    return x, torch.arange(n) + 100


def test_batches_cover_every_index_once():
    x, y = small_set()
    g = torch.Generator().manual_seed(0)
    out = list(batching.batches(x, y, 4, generator=g))
    assert [len(b[2]) for b in out] == [4, 4, 2]
    idx = torch.cat([b[2] for b in out])
    assert sorted(idx.tolist()) == list(range(10)) and idx.tolist() != list(range(10))
    for xb, yb, i in out:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert torch.equal(xb, x[i].float() / 255) and torch.equal(yb, y[i])
    again = torch.cat([b[2] for b in batching.batches(x, y, 4, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(idx, again)
    other = torch.cat([b[2] for b in batching.batches(x, y, 4, generator=torch.Generator().manual_seed(1))])
    assert not torch.equal(idx, other)
    # the generator advances, so the next epoch has another order
    assert not torch.equal(idx, torch.cat([b[2] for b in batching.batches(x, y, 4, generator=g)]))
    seq = list(batching.batches(x, y, 3, shuffle=False, device="cpu"))
    assert torch.equal(torch.cat([b[2] for b in seq]), torch.arange(10)) and len(seq[-1][2]) == 1


def test_batches_with_augmentation():
    x, y = small_set(20)
    out = list(batching.batches(x, y, 8, generator=torch.Generator().manual_seed(0), augment="light",
                            aug_generator=torch.Generator().manual_seed(0)))
    for xb, yb, i in out:
        assert xb.shape == (len(i), 3, 32, 32) and 0 <= xb.min() and xb.max() <= 1
        assert torch.equal(yb, y[i])
    assert not torch.equal(out[0][0], x[out[0][2]].float() / 255)
    with pytest.raises(ValueError):
        next(batching.batches(x, y, 8, augment="heavy"))


def test_to_float():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
    assert torch.equal(batching.to_float(x), torch.tensor([0, 1, 128, 255], dtype=torch.float32) / 255)


def test_augment_light_deterministic_in_range_and_changes():
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    a = augment.augment_light(x, torch.Generator().manual_seed(1))
    b = augment.augment_light(x, torch.Generator().manual_seed(1))
    c = augment.augment_light(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    assert ((a - x).abs().amax(dim=(1, 2, 3)) > 0.01).all()  # every image changed


def test_augment_light_moves_its_random_draws_with_to_device(monkeypatch):
    """The draws go through `augment.to_device` (pinned, non-blocking on CUDA): the shifts,
    then the brightness and contrast factors, each to the batch's device."""
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    expected = augment.augment_light(x, torch.Generator().manual_seed(1))
    calls, real = [], augment.to_device
    monkeypatch.setattr(augment, "to_device", lambda t, device: calls.append((t.dtype, tuple(t.shape), device))
                        or real(t, device))
    assert torch.equal(augment.augment_light(x, torch.Generator().manual_seed(1)), expected)
    assert calls == [(torch.int64, (2, 8), x.device), (torch.float32, (2, 8), x.device)]


def test_augment_crop_is_a_shifted_window():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augment.augment_light(x, torch.Generator().manual_seed(0), brightness=0, contrast=0)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    offsets = set()
    for i in range(64):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.allclose(out[i], padded[i, :, dy:dy + 32, dx:dx + 32], atol=1e-6)]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) >= 15  # 25 offsets, 64 draws


def test_augment_brightness_and_contrast_factors():
    x = 0.1 + 0.4 * torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # no clamping
    bright = augment.augment_light(x, torch.Generator().manual_seed(0), pad=0, contrast=0)
    ratio = bright / x
    per_image = ratio.mean(dim=(1, 2, 3))
    assert torch.allclose(ratio, per_image.view(-1, 1, 1, 1), atol=1e-5)  # one factor per image
    assert per_image.min() >= 0.8 and per_image.max() <= 1.2 and per_image.std() > 0.05
    con = augment.augment_light(x, torch.Generator().manual_seed(0), pad=0, brightness=0)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(con.mean(dim=(1, 2, 3), keepdim=True), m, atol=1e-5)  # mean kept
    factor = ((con - m) / (x - m)).median(dim=3).values.median(dim=2).values.median(dim=1).values
    assert torch.allclose(con, (x - m) * factor.view(-1, 1, 1, 1) + m, atol=1e-5)
    assert factor.min() >= 0.8 and factor.max() <= 1.2 and factor.std() > 0.05


def test_svhn_loads_when_its_cache_cannot_be_written(tmp_path, monkeypatch):
    """A read-only or full data folder: the .mat files still load, with a warning, and no
    temp file is left."""
    import errno
    from qdistill import atomic

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    Xtr, _, _, _ = write_svhn(tmp_path)
    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.warns(UserWarning, match="cannot write the SVHN cache"):
        ds = registry.load({"dataset": "svhn", "data_dir": str(tmp_path), "verify": False})
    assert torch.equal(ds.x_train, torch.from_numpy(Xtr).permute(3, 2, 0, 1))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_digits_are_read_as_load_digits_gives_them_with_or_without_importing_sklearn(monkeypatch):
    """The CSV read straight from scikit-learn's data folder gives load_digits' exact
    images and labels; without the file in its place, load_digits itself is used."""
    import numpy as np
    from sklearn.datasets import load_digits

    from qdistill.data import digits
    want = load_digits()
    images, labels = digits._bundled()
    assert np.array_equal(images, want.images) and np.array_equal(labels, want.target)
    monkeypatch.setattr(digits.importlib.util, "find_spec", lambda name: None)
    images, labels = digits._bundled()
    assert np.array_equal(images, want.images) and np.array_equal(labels, want.target)
