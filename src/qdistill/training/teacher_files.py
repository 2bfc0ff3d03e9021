"""Teachers that are not qdistill runs: what a teacher path is, and how each kind runs.

`detect` tells the kinds apart by what the path is (the zip members, not only the name):

* a directory: a qdistill run (``training/teacher.py: Teacher.open``);
* a zip with ``code/`` and ``constants.pkl``: TorchScript (`torch.jit.save`), loaded with
  ``torch.jit.load(map_location="cpu")``;
* a zip with ``archive_format``: a `torch.export` program (``.pt2``, `torch.export.save`);
* a zip of ``.npy`` members: a logits file (``.npz``: ``train_logits`` N_train x K,
  ``test_logits`` N_test x K in the dataset's order, optional ``data_fingerprint``), read
  with ``allow_pickle=False``;
* a ``.onnx`` file: an ONNX model, run by ONNX Runtime on its CPU provider.

A zip with only ``data.pkl`` is a `torch.save` pickle: refused, never unpickled (that can
run code). A runnable teacher (`Runner`) takes the float batch every model gets (N x 3 x
32 x 32 in [0, 1]), applies the input its file declares (`Preprocess`) and returns
float32 logits. Every problem is a `TeacherError` of one line.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import config as configlib
from ..data.batching import to_float
from ..errors import TeacherError
from .evaluate import EVAL_BATCH

PREPROCESS_KEYS = ("input_range", "mean", "std", "layout", "input_size")
IMAGE_SIZE = 32  # what the data gives every model


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _line(e: BaseException) -> str:
    """An exception's message as one short line: TorchScript's end in the line that says
    what failed, after its traceback."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = (lines[-1] if "TorchScript" in str(e) else " ".join(lines)) if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class Preprocess:
    """The input a teacher file declares in ``[teacher]``: from the float batch ``x`` in
    [0, 1], NCHW, 32 x 32,

        x -> bilinear resize to input_size x input_size (align_corners=False; 0 means 32, none)
          -> x * 255 for input_range "0-255"
          -> (x - mean) / std per channel (each list empty: none; one value: every channel)
          -> NHWC for layout "NHWC".

    The defaults are what a qdistill model takes; then `__call__` returns ``x`` itself."""

    def __init__(self, section: dict | None = None):
        s = {**{k: configlib.DEFAULTS["teacher"][k] for k in PREPROCESS_KEYS}, **(section or {})}
        self.input_range, self.layout = s["input_range"], s["layout"]
        self.mean, self.std = [float(v) for v in s["mean"]], [float(v) for v in s["std"]]
        self.size = int(s["input_size"]) or IMAGE_SIZE

    def key(self) -> dict:
        """What the teacher's logits depend on, for the cache's fingerprint."""
        return {"input_range": self.input_range, "mean": self.mean, "std": self.std, "layout": self.layout,
                "input_size": self.size}

    @property
    def is_default(self) -> bool:
        return self.key() == Preprocess().key()

    def shape(self, n: int) -> tuple:
        return (n, self.size, self.size, 3) if self.layout == "NHWC" else (n, 3, self.size, self.size)

    def _channels(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``mean`` or ``std`` as a (1, C, 1, 1) tensor on ``x``'s device and dtype, made once
        per device and dtype, not per batch (a host-to-device copy each time)."""
        key = (name, x.device, x.dtype)
        cache = self.__dict__.setdefault("_tensors", {})
        if key not in cache:
            cache[key] = torch.tensor(getattr(self, name), dtype=x.dtype).view(1, -1, 1, 1).to(x.device)
        return cache[key]

    def describe(self) -> str:
        return (f"{self.layout} {self.size}x{self.size}, range {self.input_range}"
                + (f", mean {self.mean}" if self.mean else "") + (f", std {self.std}" if self.std else ""))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.size != x.shape[-1]:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.input_range == "0-255":
            x = x * 255.0
        if self.mean:
            x = x - self._channels("mean", x)
        if self.std:
            x = x / self._channels("std", x)
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1).contiguous()
        return x


def detect(path: str | Path) -> str:
    """The kind of teacher at ``path`` (one of `qdistill.training.TEACHER_KINDS`)."""
    p = Path(path)
    if p.is_dir():
        return "run"
    if not p.is_file():
        raise TeacherError(f"teacher not found: {p}")
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
                # every member's CRC: torch does not check the weights it reads
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error):
            raise TeacherError(f"teacher {p} is a corrupt or truncated zip archive") from None
        if bad is not None:
            raise TeacherError(f"teacher {p} is corrupt: its member {bad} fails its CRC check")
        inner = {n.split("/", 1)[1] if "/" in n else n for n in names}
        if names and all(n.endswith(".npy") for n in names):
            return "logits"
        if "constants.pkl" in inner and any(n.startswith("code/") for n in inner):
            return "torchscript"
        if "archive_format" in inner or "serialized_exported_program.json" in inner:  # torch >= 2.7, older
            return "export"
        if "data.pkl" in inner:
            raise TeacherError(f"teacher {p} is a torch.save pickle, which qdistill does not unpickle (it can run "
                               f"code): save the eval-mode model with torch.jit.save(torch.jit.trace(model, x)) or "
                               f"torch.export.save")
    elif head[:1] == b"\x80":
        raise TeacherError(f"teacher {p} is a pickle, which qdistill does not load (it can run code): save the "
                           f"model with torch.jit.save or torch.export.save, or export it to ONNX")
    elif p.suffix.lower() == ".onnx":
        return "onnx"
    raise TeacherError(f"teacher {p} is none of: a qdistill run directory, a TorchScript file (torch.jit.save), "
                       f"a torch.export program (.pt2), an ONNX model (.onnx), a logits file (.npz)")


def check_logits(logits: torch.Tensor, n: int, data, source: str, split: str) -> torch.Tensor:
    """``logits`` as the ``(n, K)`` float32 logits of ``data``'s ``split``, or a `TeacherError`."""
    if logits.ndim != 2 or logits.shape[0] != n:
        raise TeacherError(f"teacher {source} gives {split} outputs of shape {tuple(logits.shape)}, expected "
                           f"({n}, {data.num_classes}): one row of logits per {split} image, in the dataset's order")
    if logits.shape[1] != data.num_classes:
        raise TeacherError(f"teacher {source} gives {logits.shape[1]} classes, but the data has {data.num_classes}")
    bad = int((~torch.isfinite(logits)).any(1).sum())
    if bad:
        raise TeacherError(f"teacher {source} gives non-finite logits (NaN or inf) for {bad} of {n} {split} images")
    return logits.float()


class Runner:
    """A runnable teacher file: ``runner(xb)`` is its float32 logits for the float batch
    ``xb`` (N x 3 x 32 x 32 in [0, 1], on any device; logits on the same device)."""

    def __init__(self, source: str, forward, prep: Preprocess, module: torch.nn.Module | None = None,
                 cpu_only: bool = False, declares: str = ""):
        self.source, self._forward, self.prep = source, forward, prep
        self._module, self._cpu_only = module, cpu_only
        self.declares = declares  # the input shape the file declares, when it does

    def to(self, device) -> "Runner":
        if self._module is not None and device is not None:
            try:
                self._module.to(device)
            except Exception as e:
                raise TeacherError(f"teacher {self.source} cannot move to {device}: {_line(e)}") from None
        return self

    @torch.no_grad()
    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        x = self.prep(xb)
        try:
            out = self._forward(x.cpu() if self._cpu_only else x)
        except TeacherError:
            raise
        except Exception as e:  # the teacher's own code rejects the input: shape, layout, dtype
            declares = f", its file declares {self.declares}" if self.declares else ""
            raise TeacherError(f"teacher {self.source} rejects its input of shape {tuple(x.shape)} "
                               f"({self.prep.describe()}{declares}; declare what it expects with [teacher] "
                               f"layout, input_size, input_range, mean, std): {_line(e)}") from None
        if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
            out = out[0]
        if not torch.is_tensor(out):
            raise TeacherError(f"teacher {self.source} returns {type(out).__name__}, not a tensor of logits")
        return out.to(xb.device).float()

    def predict(self, x_u8: torch.Tensor, device=None) -> torch.Tensor:
        """Logits (float32, CPU) on uint8 images, in order, batch by batch as `evaluate.predict`."""
        self.to(device)
        out = [self(to_float(x_u8[i:i + EVAL_BATCH].to(device, non_blocking=True))).cpu()
               for i in range(0, len(x_u8), EVAL_BATCH)]
        return torch.cat(out, dim=0) if out else torch.zeros(0, 0)


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__()
        self.errors: list[BaseException] = []

    def emit(self, record):
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


@contextlib.contextmanager
def _quiet(name: str):
    """Keep the logger ``name``'s records from stderr meanwhile (a failed load must stay
    one line); yields the exceptions they carried."""
    logger, kept = logging.getLogger(name), _Kept()
    saved = logger.handlers, logger.propagate, logger.level
    logger.handlers, logger.propagate, logger.level = [kept], False, logging.WARNING
    try:
        yield kept.errors
    finally:
        logger.handlers, logger.propagate, logger.level = saved


def _torchscript(path: Path, prep: Preprocess) -> Runner:
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript, which still runs
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise TeacherError(f"teacher {path} is not a readable TorchScript file (corrupt or truncated?): "
                           f"{_line(e)}") from None
    return Runner(str(path), module, prep, module=module.eval())


def _exported(path: Path, prep: Preprocess) -> Runner:
    logged: list[BaseException] = []
    try:
        with _quiet("torch.export") as logged:
            program = torch.export.load(io.BytesIO(path.read_bytes()))
        module = program.module()  # its train/eval mode is the one it was exported in
    except Exception as e:  # torch.export.load says "see the warnings above": say what they said
        raise TeacherError(f"teacher {path} is not a readable torch.export program (corrupt or truncated?): "
                           f"{_line(logged[0] if logged else e)}") from None
    return Runner(str(path), module, prep, module=module)


def _onnx(path: Path, prep: Preprocess) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError:
        raise TeacherError(f"teacher {path} is an ONNX model, which needs ONNX Runtime: "
                           f"pip install 'qdistill[export]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors come back as exceptions, not log lines
    try:
        session = ort.InferenceSession(path.read_bytes(), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise TeacherError(f"teacher {path} is not a readable ONNX model (corrupt or truncated?): {_line(e)}") \
            from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise TeacherError(f"teacher {path} has {len(inputs)} inputs; an image classifier with one input is needed")
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
    if inputs[0].type not in dtypes:
        raise TeacherError(f"teacher {path} takes {inputs[0].type}; a float input is needed")
    name, dtype, batch = inputs[0].name, dtypes[inputs[0].type], inputs[0].shape[0] if inputs[0].shape else None
    fixed = batch if isinstance(batch, int) and batch > 0 else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().numpy(), dtype=dtype)
        if fixed is None or len(arr) == fixed:
            return torch.from_numpy(np.asarray(session.run(None, {name: arr})[0], dtype=np.float32))
        out = []  # a graph exported for a fixed batch: run it batch by batch, the last one padded
        for i in range(0, len(arr), fixed):
            part = arr[i:i + fixed]
            padded = np.concatenate([part, np.zeros((fixed - len(part), *part.shape[1:]), dtype)]) \
                if len(part) < fixed else part
            out.append(np.asarray(session.run(None, {name: padded})[0], dtype=np.float32)[:len(part)])
        return torch.from_numpy(np.concatenate(out))
    shape = "(" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in inputs[0].shape) + ")"
    return Runner(str(path), forward, prep, cpu_only=True, declares=shape)


def _logits_file(path: Path, data) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("train_logits", "test_logits") if k not in z.files]
            if missing:
                raise TeacherError(f"teacher {path} is a logits file without {' and '.join(missing)} "
                                   f"(it holds {', '.join(z.files) or 'nothing'})")
            train, test = np.asarray(z["train_logits"]), np.asarray(z["test_logits"])
            stamp = z["data_fingerprint"] if "data_fingerprint" in z.files else None
    except TeacherError:
        raise
    except Exception as e:  # zlib, zipfile, a pickled object array, a short read
        raise TeacherError(f"teacher {path} is not a readable logits file (corrupt or truncated?): {_line(e)}") \
            from None
    if stamp is not None:
        if stamp.ndim != 0 or stamp.dtype.kind not in "US":
            raise TeacherError(f"teacher {path}: data_fingerprint must be one string, got {stamp.dtype} "
                               f"{stamp.shape}")
        stamp = str(stamp[()].decode() if stamp.dtype.kind == "S" else stamp[()])
        if stamp != data.fingerprint:
            raise TeacherError(f"teacher {path} holds logits of other data (data_fingerprint {stamp[:12]}..., "
                               f"this data's {data.fingerprint[:12]}...)")
    out = []
    for split, arr, n in (("train", train, len(data.y_train)), ("test", test, len(data.y_test))):
        if arr.dtype.kind != "f":
            raise TeacherError(f"teacher {path}: {split}_logits must be floats, got {arr.dtype}")
        out.append(check_logits(torch.from_numpy(arr.astype(np.float32)), n, data, str(path), split))
    return out[0], out[1]


def open_file(path: str | Path, kind: str, data, prep: Preprocess) -> tuple[Runner | None, tuple | None, str]:
    """A teacher file of ``kind``: ``(runner, None, sha256)`` for a model,
    ``(None, (train_logits, test_logits), sha256)`` for a logits file."""
    path = Path(path)
    sha = file_sha256(path)
    if kind == "logits":
        return None, _logits_file(path, data), sha
    loaders = {"torchscript": _torchscript, "export": _exported, "onnx": _onnx}
    return loaders[kind](path, prep), None, sha
