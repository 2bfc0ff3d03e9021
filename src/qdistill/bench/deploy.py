"""Size and speed of the deployed students: ``qdistill bench --deploy``.

Two students (or one given), one machine, one run: per student, bytes of the ``.qdz``
file against torch's fp32 ``state_dict``; batch-1 latency (median of ``runs`` calls) and
batch-``batch`` throughput of (a) PyTorch fp32 eager on the fake-quantized model, (b) the
packed integer engine, (c) ONNX Runtime on the ONNX export (`qdistill.export.onnx`; n/a
with the reason where that export fails). Batch-1 calls run in blocks of 25 per runtime,
taking turns (torch, engine, ort, torch, ...), so load from elsewhere on the machine hits
all three alike; each block starts after 30 ms of untimed calls, so the last runtime's
spinning worker threads have stopped (`_warm`). All three use the same number of threads.

The default students are vgg7 (a chain) and resnet20 (a residual graph), W2A1 (dorefa),
randomly initialised (seed 0) with BatchNorm running statistics calibrated on 8 batches
of 64 uniform random images in train mode (cumulative average). The engine's cost does
not depend on the weight values and on the activations only through all-zero words,
which it skips; the calibrated statistics make the activations realistic (about a third
of the A1 levels are 1), neither all 0 nor all 1.
"""
from __future__ import annotations

import io
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from .. import deploy
from ..deploy import numba_kernels
from ..export.onnx import export_onnx
from ..export.packed import export_model
from ..nn.models import build
from .machine import cpu_name

STUDENTS = ("vgg7", "resnet20")
WARM_S = 0.03  # untimed calls before each runtime's batch-1 block (`_warm`)
DEFAULT_STUDENT = "{} W2A1 dorefa, random init (seed 0), BN stats calibrated on random images"


def default_student(arch: str = "vgg7") -> torch.nn.Module:
    """``arch`` W2A1 with calibrated BatchNorm statistics (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build(arch, weight_bits=2, act_bits=1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(8):
            model(torch.rand(64, 3, 32, 32, generator=gen))
    return model.eval()


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def run(model: torch.nn.Module | None = None, *, runs: int = 200, batch: int = 256) -> dict:
    """Measure the figures of the module docstring for the default students (or ``model``):
    the machine's description and, under ``models``, one flat dict per student."""
    threads = torch.get_num_threads()
    if numba_kernels.HAVE_NUMBA:
        numba_kernels.numba.set_num_threads(min(threads, numba_kernels.numba.config.NUMBA_NUM_THREADS))
    if model is None:
        students = [(DEFAULT_STUDENT.format(arch), default_student(arch)) for arch in STUDENTS]
    else:
        students = [(f"{type(model).__name__} (given)", model.eval())]
    return {"cpu": cpu_name(), "threads": threads, "batch": batch, "runs": runs,
            "torch_version": torch.__version__, "date": date.today().isoformat(),
            "models": [_measure(m, described, threads, runs, batch) for described, m in students]}


def _measure(model: torch.nn.Module, described: str, threads: int, runs: int, batch: int) -> dict:
    qdz_bytes, engine, session, ort_note = _exported(model, threads)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fp32_bytes = len(buf.getvalue())

    gen = torch.Generator().manual_seed(1)
    x1 = torch.rand(1, 3, 32, 32, generator=gen)
    xb = torch.rand(batch, 3, 32, 32, generator=gen)
    calls = _calls(model, engine, session, x1, xb)
    for one, many in calls.values():  # warm-up: JIT, allocator, thread pools
        for _ in range(10):
            one()
        many()
    ms = {k: _median_ms(v) for k, v in _batch1_seconds(calls, runs).items()}
    img_s = {k: batch / statistics.median(v) for k, v in _batch_seconds(calls, runs).items()}
    agreement = float((engine.classify(xb.numpy()) == _torch_forward(model, xb).argmax(1).numpy()).mean())
    return {
        "model": described,
        "qdz_bytes": qdz_bytes,
        "fp32_bytes": fp32_bytes,
        "size_ratio": fp32_bytes / qdz_bytes,
        "torch_ms_b1": ms["torch"],
        "engine_ms_b1": ms["engine"],
        "ort_ms_b1": ms.get("ort"),
        "torch_img_s_b256": img_s["torch"],
        "engine_img_s_b256": img_s["engine"],
        "ort_img_s_b256": img_s.get("ort"),
        "engine_vs_torch_b1": ms["torch"] / ms["engine"],
        "engine_vs_ort_b1": ms["ort"] / ms["engine"] if "ort" in ms else None,
        "engine_vs_ort_batch": img_s["engine"] / img_s["ort"] if "ort" in img_s else None,
        "ort_note": ort_note,
        "backend": engine.backend,
        "format_version": engine.manifest["format_version"],
        "label_agreement": agreement,
    }


def _exported(model: torch.nn.Module, threads: int):
    """``(bytes of the .qdz file, the engine loaded from it, an ONNX Runtime session or None,
    why there is none)``."""
    num_classes = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    with tempfile.TemporaryDirectory() as tmp:
        qdz_path = Path(tmp) / "student.qdz"
        export_model(model, qdz_path, class_names=[str(i) for i in range(num_classes)])
        qdz_bytes = qdz_path.stat().st_size
        engine = deploy.load(qdz_path)
        return (qdz_bytes, engine, *_ort_session(model, Path(tmp) / "student.onnx", threads))


def _torch_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _calls(model, engine, session, x1: torch.Tensor, xb: torch.Tensor) -> dict:
    """Per runtime, ``(batch-1 call, batch call)`` on the same images."""
    x1n, xbn = x1.numpy(), xb.numpy()
    calls = {"torch": (lambda: _torch_forward(model, x1), lambda: _torch_forward(model, xb)),
             "engine": (lambda: engine.predict(x1n), lambda: engine.predict(xbn))}
    if session is not None:
        calls["ort"] = (lambda: session.run(None, {"images": x1n}), lambda: session.run(None, {"images": xbn}))
    return calls


def _seconds(call) -> float:
    t = time.perf_counter()
    call()
    return time.perf_counter() - t


def _batch1_seconds(calls: dict, runs: int, block: int = 25) -> dict[str, list[float]]:
    """``runs`` timed batch-1 calls per runtime, in blocks of ``block``, the runtimes taking
    turns (see the module docstring)."""
    seconds = {k: [] for k in calls}
    for start in range(0, runs, block):
        for k, (one, _) in calls.items():
            _warm(one)
            seconds[k] += [_seconds(one) for _ in range(min(block, runs - start))]
    return seconds


def _warm(call, seconds: float = WARM_S) -> None:
    """Untimed calls for ``seconds``, so that a block is timed after the last runtime's
    thread pool has stopped spinning: OpenMP and ONNX Runtime workers spin for milliseconds
    after their last task, and measured here (AMD EPYC, 2 cores) after one untimed call ONNX
    Runtime's next 7 calls after the engine's block ran 1.2-2x slower than its last ones."""
    end = time.perf_counter() + seconds
    call()
    while time.perf_counter() < end:
        call()


def _batch_seconds(calls: dict, runs: int) -> dict[str, list[float]]:
    """Timed batch calls per runtime, each after an untimed one, the runtimes taking turns."""
    seconds = {k: [] for k in calls}
    for _ in range(max(3, min(10, runs // 20))):
        for k, (_, many) in calls.items():
            many()
            seconds[k].append(_seconds(many))
    return seconds


def _ort_session(model, path: Path, threads: int):
    """``(session, None)``, or ``(None, why not)``: ONNX Runtime absent, or the ONNX export
    of this student failing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime not installed"
    try:
        export_onnx(model, path)
    except Exception as e:  # the ONNX exporter's coverage is its own; the engine's figures stand
        return None, f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"]), None


def format_table(result: dict) -> str:
    """The figures of `run` as plain-text tables, one per student."""
    lines = [f"cpu: {result['cpu']}; threads: {result['threads']}; torch {result['torch_version']}; "
             f"{result['date']}; batch-1 median of {result['runs']} calls, batch {result['batch']} for throughput"]
    for r in result["models"]:
        lines += [""] + _model_table(r, result["batch"])
    return "\n".join(lines)


def _model_table(r: dict, batch: int) -> list[str]:
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    rows = [("", "batch-1 ms", f"batch-{batch} img/s"),
            ("PyTorch fp32 eager", f(r["torch_ms_b1"], ".3f"), f(r["torch_img_s_b256"], ".0f")),
            (f"qdistill engine ({r['backend']})", f(r["engine_ms_b1"], ".3f"), f(r["engine_img_s_b256"], ".0f")),
            ("ONNX Runtime", f(r["ort_ms_b1"], ".3f"), f(r["ort_img_s_b256"], ".0f"))]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"model: {r['model']} (.qdz format {r['format_version']})",
             f"size: .qdz {r['qdz_bytes']} B vs fp32 state_dict {r['fp32_bytes']} B (x{r['size_ratio']:.1f} smaller)"]
    for row in rows:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    lines.append(f"engine vs torch at batch 1: x{r['engine_vs_torch_b1']:.2f}; engine vs ONNX Runtime: "
                 f"x{f(r['engine_vs_ort_b1'], '.2f')} at batch 1, x{f(r['engine_vs_ort_batch'], '.2f')} at "
                 f"batch {batch}; engine/torch label agreement: {r['label_agreement']:.4f}")
    if r["ort_note"]:
        lines.append(f"ONNX Runtime: {r['ort_note']}")
    return lines
