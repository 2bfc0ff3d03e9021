"""The torch-free side: the .qdz format and its checks, the kernels, the engine's API and
the predict helpers."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qdistill import deploy
from qdistill.deploy import kernels, qdz
from qdistill.errors import DataError, UserError
from qdistill.deploy.predict import load_image, predict_dataset, predict_image
from qdistill.export.packed import export_model

from bounds import U64, gamma, within
from bounds_resize import resize_reference
from qdz_students import CLASSES, eval_images, student

needs_numba = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("qdz") / "student.qdz"
    manifest = export_model(student("vgg7", 2, 1, "dorefa"), path, class_names=CLASSES,
                            meta={"note": "test"})
    return path, manifest


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _rezip(members: dict[str, bytes], path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())
    return path


def _refused(path, match):
    with pytest.raises(qdz.QdzError, match=match) as e:
        deploy.load(path)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


# ---------------------------------------------------------------- torch-free

@pytest.mark.slow
def test_deploy_runs_without_torch(exported):
    """A subprocess loads and runs the model through qdistill.deploy (and the predict
    helpers' module) and never imports torch."""
    path, _ = exported
    code = ("import sys, numpy as np, qdistill.deploy as d, qdistill.deploy.predict\n"
            f"e = d.load({str(path)!r})\n"
            "p = e.predict(np.full((2, 3, 32, 32), 0.5, np.float32))\n"
            "assert p.shape == (2, 10), p.shape\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print('ok', e.backend)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


@pytest.mark.slow
def test_numpy_fallback_without_numba(exported):
    """With numba absent the engine imports and runs on the numpy kernels."""
    path, _ = exported
    x = eval_images("vgg7")[:4]
    np.save(path.parent / "x.npy", x)
    code = ("import sys; sys.modules['numba'] = None\n"
            "import numpy as np, qdistill.deploy as d\n"
            "from qdistill.deploy import kernels\n"
            "assert kernels.BACKENDS == ('numpy',)\n"
            f"e = d.load({str(path)!r})\n"
            f"np.save({str(path.parent / 'y.npy')!r}, e.predict(np.load({str(path.parent / 'x.npy')!r})))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    want = deploy.load(path).predict(x)
    # exact: the backends' levels are equal integers (conv_float sums in one order in both,
    # see test_numba_and_numpy_kernels_agree) and every float stage is the same numpy code
    # on the same shapes
    np.testing.assert_array_equal(np.load(path.parent / "y.npy"), want)


# ---------------------------------------------------------------- the file and its checks

def test_round_trip_preserves_the_manifest(exported):
    path, manifest = exported
    engine = deploy.load(path)
    assert engine.manifest == manifest
    assert engine.class_names == CLASSES and manifest["meta"] == {"note": "test"}
    assert json.loads(_members(path)["manifest.json"]) == manifest


def test_flipped_byte_in_an_array_is_detected(exported, tmp_path):
    path, manifest = exported
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(manifest["arrays"]["l4.planes"]["file"])
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0x01
    bad = tmp_path / "flipped.qdz"
    bad.write_bytes(bytes(raw))
    _refused(bad, "corrupt|checksum")


def test_changed_array_with_valid_zip_fails_the_sha256(exported, tmp_path):
    path, manifest = exported
    members = _members(path)
    member = manifest["arrays"]["l4.thresholds"]["file"]
    data = bytearray(members[member])
    data[0] ^= 0x01
    members[member] = bytes(data)
    _refused(_rezip(members, tmp_path / "t.qdz"), "checksum mismatch in array 'l4.thresholds'")


def test_newer_format_is_refused(exported, tmp_path):
    path, manifest = exported
    members = _members(path)
    newer = dict(manifest, format_version=qdz.FORMAT_VERSION + 1)
    members["manifest.json"] = json.dumps(newer).encode()
    _refused(_rezip(members, tmp_path / "n.qdz"), "newer")


@pytest.mark.parametrize("damage,match", [
    ("garbage", "bad zip"),
    ("truncated", "bad zip|corrupt"),
    ("missing", "not found"),
    ("no-manifest", "missing member manifest.json"),
    ("foreign", "not a qdistill model"),
    ("shape", "holds .* bytes"),
    ("op", "unknown op"),
    ("key", "bad or missing 'padding'"),
    ("classes", "10 outputs for 9 class names"),
    ("layers", "malformed layer list"),
    ("in_step", "in_step must be a finite nonzero float"),
])
def test_damaged_files_are_refused(damage, match, exported, tmp_path):
    path, manifest = exported
    bad = tmp_path / "bad.qdz"
    members = _members(path)
    if damage == "garbage":
        bad.write_bytes(b"not a zip at all" * 10)
    elif damage == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "missing":
        bad = tmp_path / "absent.qdz"
    elif damage == "no-manifest":
        del members["manifest.json"]
        _rezip(members, bad)
    else:
        m = json.loads(members["manifest.json"])
        if damage == "foreign":
            m["format"] = "something-else"
        elif damage == "shape":
            m["arrays"]["l4.planes"]["shape"][1] += 1
        elif damage == "key":
            del m["layers"][2]["padding"]
        elif damage == "classes":
            m["class_names"] = m["class_names"][:9]
        elif damage == "layers":
            m["layers"][-1]["weight"] = ["not", "a", "name"]
        elif damage == "in_step":
            next(spec for spec in m["layers"] if spec["op"] == "avgpool")["in_step"] = "0.1"
        else:
            m["layers"][2]["op"] = "conv_magic"
        members["manifest.json"] = json.dumps(m).encode()
        _rezip(members, bad)
    _refused(bad, match)


def test_bad_input_shape_is_a_user_error(exported):
    engine = deploy.load(exported[0])
    with pytest.raises(qdz.QdzError, match="shape"):
        engine.predict(np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(qdz.QdzError, match="backend"):
        deploy.load(exported[0], backend="cuda")


# ---------------------------------------------------------------- kernels

@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="the notice is about numba compiling")
def test_a_slow_first_engine_call_says_it_compiles_once_and_on_a_terminal_only(exported, monkeypatch):
    """A process's first engine call (`deploy.load`'s empty batch) runs in `compiling_notice`:
    still running after NOTICE_AFTER seconds, it gets one line on a terminal's stderr."""
    import time
    from qdistill.deploy import numba_kernels as nb

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def first_call(stderr, seconds, after=0.01):
        monkeypatch.setattr(sys, "stderr", stderr)
        monkeypatch.setattr(nb, "_noticed", [])
        monkeypatch.setattr(nb, "NOTICE_AFTER", after)
        with nb.compiling_notice():
            end = time.monotonic() + seconds  # numba compiling: until told (at most `seconds`)
            while not stderr.getvalue() and time.monotonic() < end:
                time.sleep(0.01)
        with nb.compiling_notice():  # a later call: never told
            time.sleep(0.1)
        return stderr.getvalue()

    assert first_call(Terminal(), 30.0) == nb.NOTICE + "\n"
    assert first_call(io.StringIO(), 0.2) == ""  # not a terminal
    assert first_call(Terminal(), 0.0, after=30.0) == ""  # quick: the kernels were cached
    monkeypatch.setattr(nb, "_noticed", [])
    deploy.load(exported[0])
    assert nb._noticed  # the load's first call went through it


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(0)
    for c, bits in ((3, 1), (64, 2), (70, 3), (130, 4)):
        lv = rng.integers(0, 2**bits, (2, 5, 4, c), dtype=np.uint8)
        x = kernels.pack(lv, bits, 2)
        assert x.shape == (2, 9, 8, bits, kernels.words(c)) and not x[:, :2].any()
        np.testing.assert_array_equal(kernels.unpack(x, c, 2), lv)
        # bit c % 64 of word c // 64 of plane i is bit i of the level
        n, y, xx, ch, i = 1, 3, 2, c - 1, bits - 1
        word = int(x[n, y + 2, xx + 2, i, ch // 64])
        assert (word >> (ch % 64)) & 1 == (int(lv[n, y, xx, ch]) >> i) & 1
        codes = rng.integers(0, 2**bits, (5, c, 3, 3))
        np.testing.assert_array_equal(qdz.unpack_codes(qdz.pack_codes(codes, bits), c), codes)
        assert qdz.pack_codes(codes, bits).nbytes == bits * 5 * 9 * ((c + 7) // 8)


@needs_numba
@pytest.mark.parametrize("c,o,a,k,pad,pool,out_pad,ks,stride", [
    (16, 32, 1, 2, 1, 1, 1, 3, 1), (48, 64, 2, 1, 1, 2, None, 3, 1), (130, 20, 3, 4, 0, 1, 0, 3, 1),
    (64, 70, 1, 1, 1, 2, 1, 3, 1), (16, 32, 1, 2, 1, 1, 1, 3, 2), (48, 64, 2, 2, 0, 1, None, 1, 2),
    (70, 20, 1, 2, 0, 1, 0, 1, 1), (130, 20, 3, 4, 1, 1, None, 3, 2)])
def test_numba_and_numpy_kernels_agree(c, o, a, k, pad, pool, out_pad, ks, stride):
    rng = np.random.default_rng(c + o + ks + stride)
    lv = rng.integers(0, 2**a, (3, 8, 8, c), dtype=np.uint8)
    x = kernels.pack(lv, a, pad)
    wq = kernels.weight_rows(qdz.pack_codes(rng.integers(0, 2**k, (o, c, ks, ks)), k), c)
    n = 2**k - 1
    acc = kernels.accumulate(x, wq, n, ks, ks, c, "numpy", stride)
    np.testing.assert_array_equal(kernels.accumulate(x, wq, n, ks, ks, c, "numba", stride), acc)
    bits = 2
    thr = np.sort(rng.integers(-40, 40, (3, o)), axis=0).astype(np.int32)
    sign = rng.choice(np.array([-1, 1], np.int32), o)
    got = [kernels.conv_packed(x, wq, n, ks, ks, c, thr, sign, pool, bits, out_pad, b, stride)
           for b in ("numba", "numpy")]
    np.testing.assert_array_equal(got[0], got[1])
    levels = kernels.unpack(got[0], o, out_pad) if out_pad is not None else got[0]
    assert len(np.unique(levels)) >= 3  # thresholds chosen so the levels vary
    both = [kernels.conv_packed(x, wq, n, ks, ks, c, thr, sign, pool, bits, 1, b, stride, both=True)
            for b in ("numba", "numpy")]
    for pair in both:
        np.testing.assert_array_equal(pair[0], levels)
        np.testing.assert_array_equal(kernels.unpack(pair[1], o, 1), levels)
    img = rng.random((2, 3, 12, 12), dtype=np.float32)
    wt = rng.normal(size=(3, ks, ks, o)).astype(np.float32)
    bias = rng.normal(size=o).astype(np.float32)
    fthr = np.sort(rng.normal(size=(3, o)), axis=0)
    fsign = sign.astype(np.float64)
    got = [kernels.conv_float(img, wt, bias, 1, fthr, fsign, pool, bits, out_pad, b, stride=stride)
           for b in ("numba", "numpy")]
    np.testing.assert_array_equal(got[0], got[1])
    # the fused residual tail, on a float and on a levels shortcut
    mul, add = rng.normal(size=o) * 0.05, rng.normal(size=o)
    ho = acc.shape[1]
    table = np.arange(4) / 3
    for res in (rng.normal(size=(3, ho, ho, o)), rng.integers(0, 4, (3, ho, ho, o), dtype=np.uint8)):
        got = [kernels.conv_add_quant(x, wq, n, ks, ks, c, stride, mul, add, res, table, thr.astype(np.float64) / 40,
                                      sign, bits, out_pad, False, b) for b in ("numba", "numpy")]
        np.testing.assert_array_equal(got[0], got[1])
        levels = kernels.unpack(got[0], o, out_pad) if out_pad is not None else got[0]
        assert len(np.unique(levels)) >= 3
    # one threshold (1-bit output: the numba kernels' one-pass path), each kernel
    thr1 = rng.integers(-10, 10, (1, o)).astype(np.int32)
    res, fthr1 = rng.integers(0, 4, (3, ho, ho, o), dtype=np.uint8), rng.normal(size=(1, o))
    tie = ((acc[0, 0, 0] * mul + add) + table[res[0, 0, 0]]) * sign  # a threshold met exactly: >= is not >
    calls = [lambda b: kernels.conv_packed(x, wq, n, ks, ks, c, thr1, sign, pool, 1, out_pad, b, stride),
             lambda b: kernels.conv_float(img, wt, bias, 1, fthr1, fsign, pool, 1, out_pad, b, stride=stride),
             lambda b: kernels.conv_add_quant(x, wq, n, ks, ks, c, stride, mul, add, res, table, tie[None], sign, 1,
                                              out_pad, False, b)]
    for call in calls:
        got = [call(b) for b in ("numba", "numpy")]
        np.testing.assert_array_equal(got[0], got[1])
        levels = kernels.unpack(got[0], o, out_pad) if out_pad is not None else got[0]
        assert set(np.unique(levels)) == {0, 1}


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("ks,stride,pad", [(3, 2, 1), (1, 2, 0), (1, 1, 0), (3, 1, 1)])
def test_strided_and_1x1_convs_against_float64_torch(ks, stride, pad, backend):
    """The popcount accumulator of a ``ks x ks`` conv with ``stride`` on levels ``q`` equals
    the float64 conv of ``q`` with the integer weights ``2c - n`` exactly (small integers:
    exact in float64); the float first conv, strided, is within ``gamma_(n+1)(u32)
    (|x| |w| + |b|)`` of the float64 conv (``n = 3 ks^2`` products, the bias). Checked to
    fail with the stride ignored (a shape or value mismatch)."""
    rng = np.random.default_rng(ks * 10 + stride)
    c, o, a, k = 40, 24, 2, 2
    q = rng.integers(0, 2**a, (2, c, 9, 9))
    codes = rng.integers(0, 2**k, (o, c, ks, ks))
    n = 2**k - 1
    x = kernels.pack(nhwc_np(q).astype(np.uint8), a, pad)
    acc = kernels.accumulate(x, kernels.weight_rows(qdz.pack_codes(codes, k), c), n, ks, ks, c, backend, stride)
    want = F.conv2d(torch.from_numpy(q).double(), torch.from_numpy(2 * codes - n).double(), stride=stride,
                    padding=pad)
    np.testing.assert_array_equal(acc, nhwc_np(want.numpy()))
    img = rng.random((2, 3, 13, 13), dtype=np.float32)
    w = rng.normal(size=(o, 3, ks, ks)).astype(np.float32)
    b = rng.normal(size=o).astype(np.float32)
    xp = np.pad(img, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    got = kernels._conv_float_np(xp, np.ascontiguousarray(w.transpose(1, 2, 3, 0)), b, stride)
    t64 = lambda v: torch.from_numpy(v).double()
    want = F.conv2d(t64(img), t64(w), t64(b), stride=stride, padding=pad).numpy()
    mag = F.conv2d(t64(img).abs(), t64(w).abs(), t64(b).abs(), stride=stride, padding=pad).numpy()
    within(got, nhwc_np(want), gamma(3 * ks * ks + 1) * nhwc_np(mag), "strided float conv")


def nhwc_np(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("size", [40, 20, 33])
def test_resize_matches_torch_bilinear(size):
    """Within the derived float32 bound (`bounds.resize_reference`: rounding of the four
    weighted terms, plus the coordinate's rounding times the interpolant's slope) of
    torch's bilinear resize run in float64; float32 torch is not the reference, its
    kernel fuses multiply-adds depending on the CPU. Checked to fail with the source
    coordinate off by 1e-4 (bound ~1e-7 per output)."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(size))
    want, bound = resize_reference(x, size)
    got = kernels.resize_bilinear(x.numpy(), size)
    assert got.dtype == np.float32
    within(got, want, bound, f"resize {size}")
    within(F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False), want, bound,
           f"resize {size}: torch")


@needs_numba
@pytest.mark.parametrize("cfg", [("vgg7", 2, 1, "dorefa"), ("dorefa-svhn", 1, 2, "homework"), ("vgg7", 2, 2, "lsq")])
def test_numpy_backend_gives_the_same_model_output(cfg, tmp_path):
    path = tmp_path / "m.qdz"
    export_model(student(*cfg), path, class_names=CLASSES)
    x = eval_images(cfg[0])[:8]
    fast, slow = deploy.load(path, "numba"), deploy.load(path, "numpy")
    assert fast.backend == "numba" and slow.backend == "numpy"
    # Bit for bit, levels and floats: the backends differ only in the integer kernels (and
    # conv_float, which both sum in one order); resize, avgpool, float_clip and linear are
    # the same numpy code on the same inputs.
    for a, b in zip(fast.trace(x), slow.trace(x)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- predict helpers

def test_predict_image(exported, tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    png = tmp_path / "digit.png"
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(png)
    top, probs = predict_image(exported[0], png)
    x = load_image(png)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    logits = deploy.load(exported[0]).predict(x)[0]
    assert (top["index"], top["name"], top["probability"]) == (int(logits.argmax()), CLASSES[int(logits.argmax())],
                                                               probs.max())
    # float64 sum of the normalised probabilities: the normaliser carries 9 roundings, each
    # quotient 1, their sum 9 more: |sum - 1| <= gamma_20(u64)
    assert probs.shape == (10,) and abs(probs.sum() - 1) <= gamma(20, U64)
    # log softmax differences are the logit differences, compared in float64. Bound: p_i is
    # exp(z_i) / sum exp(z), z = l - max l; allowing numpy's SIMD exp and log 4 ulp (8 u)
    # each, log p_i is within (|z_i| + 8 + 12 + 8 |log p_i|) u64 of exact, the difference
    # adds u64 |result|: gamma_64(u64) * (|z_i| + |z_0| + |log p_i| + |log p_0| + |l_i - l_0| + 40)
    l64 = logits.astype(np.float64)
    z = l64 - l64.max()
    lp = np.log(probs)
    bound = gamma(64, U64) * (np.abs(z) + abs(z[0]) + np.abs(lp) + abs(lp[0]) + np.abs(l64 - l64[0]) + 40)
    within(lp - lp[0], l64 - l64[0], bound, "log softmax")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(DataError, match="cannot read image"):
        predict_image(exported[0], tmp_path / "text.png")
    with pytest.raises(DataError, match="not found"):
        predict_image(exported[0], tmp_path / "absent.png")


@pytest.mark.parametrize("cfg", [("vgg7", 2, 1, "dorefa"), ("vgg7", 2, 2, "lsq")])
def test_predict_dataset_matches_torch(cfg, exported, tmp_path):
    from qdistill.data.registry import load
    path = exported[0] if cfg == ("vgg7", 2, 1, "dorefa") else tmp_path / "m.qdz"
    if cfg[3] == "lsq":
        export_model(student(*cfg), path, class_names=CLASSES)
    out = predict_dataset(path, {"dataset": "digits", "max_test": 120})
    ds = load({"dataset": "digits", "max_test": 120})
    with torch.no_grad():
        labels = student(*cfg)(ds.x_test.float() / 255).argmax(1)
    want = int((labels == ds.y_test).sum())
    assert out["total"] == 120 and abs(out["correct"] - want) <= 1  # one near-threshold image at most
    assert out["accuracy"] == out["correct"] / 120 and out["dataset"] == "digits"
