"""``qdistill bench``: training throughput against a reference-style pipeline, in one run.

Same data (`fake`, SVHN-sized: 73,257 train images, 32x32x3), same student (vgg7 W2A1),
same teacher (vgg7 fp32), same batch (256), same loss (Q3, ``hard+soft`` at T = 4), a
fixed number of timed steps after warm-up. It measures student images per second of:

(a) ``reference``: the way course code trains: a per-sample ``Dataset`` that turns a uint8
    HWC array into a float CHW tensor in ``__getitem__``, ``DataLoader(batch_size=256,
    shuffle=True, num_workers=2)``, the teacher's forward on every step, NCHW fp32, one
    student at a time;
(b) ``single``: qdistill's path for one student: the dataset as one uint8 tensor on the
    device, batches sliced from a permutation, the teacher's logits computed once
    (augmentation off; the one-off pass is timed and reported as ``teacher_cache_s``),
    the step compiled where ``train.compile = "auto"`` compiles a long run
    (`qdistill.training.compiled`; ``compile_s``, the first step's extra time);
    ``single_eager_img_s`` is the same step eager, in its own process;
(c) ``fused``: the same with K students trained as one `FusedStudents` network;
(d) ``fused_bf16``: (c) under bfloat16 autocast (``train.precision = "bf16"``). Not like
    for like: (a) is fp32, so (d) is reported beside the targets, not as one.

(b) and (c) run in the precision training uses by default on the device (``precision``:
`precision_of` of ``train.precision = "auto"``: fp32 on CPU, bf16 on a GPU of compute
capability 8.0 or higher, where (d) is then (c) and is left out); (a) stays fp32.

Each pipeline runs in a fresh process (``spawn``), so one's heap never slows or bloats
the next, and its peak memory is its own (`machine.peak_memory_mb`; ``memory`` says
which: ``gpu``, the GPU memory torch allocated on CUDA, else ``rss``, the host's
resident set); ``peak_rss_mb`` is that of (c), whichever it is.

``qdistill bench --scaling`` (`scaling`) asks the question behind (c): does fusing pay on
this machine? It reports the per-student rate of fused groups of K = 1, 2, 5, 10 students,
at least `MIN_SCALING_STEPS` timed steps each, in the default precision.

It also times one epoch of the data path alone (``data_epoch_s``) against the training
epoch it feeds (``train_epoch_s = n_train / single_img_s``). A benchmark, not a test: it
asserts nothing and reports the machine it ran on.
"""
from __future__ import annotations

import multiprocessing
import time

import torch

from ..data import fake
from ..data.batching import batches
from ..nn.losses import build_loss
from ..nn.models import build
from ..training.device import autocast_for, pick_device, precision_of, sync
from ..training.evaluate import predict
from .. import config as configlib
from ..training import compiled
from ..training.compiled import CompiledStep
from ..training.step import train_step
from . import step_rate
from .machine import device_name, matmul_tf32_like_convolutions, memory_kind, peak_memory_mb
from .step_rate import default_batch, students, timed

BATCH = 256
MIN_SCALING_STEPS = 5  # timed steps at every K of --scaling, however many students share one


class _PerSampleDataset(torch.utils.data.Dataset):
    """The course-style dataset: one image at a time, converted on every access."""

    def __init__(self, x_hwc, y):
        self.x, self.y = x_hwc, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]).permute(2, 0, 1).float() / 255.0, int(self.y[i])


def _forever(make):
    while True:
        yield from make()


def bench_reference(ds, teacher, device, warmup: int, steps: int, workers: int = 2) -> float:
    x_hwc = ds.x_train.permute(0, 2, 3, 1).contiguous().numpy()
    loader = torch.utils.data.DataLoader(_PerSampleDataset(x_hwc, ds.y_train.numpy()), batch_size=BATCH,
                                         shuffle=True, num_workers=workers)
    torch.manual_seed(0)
    student = build("vgg7", weight_bits=2, act_bits=1).to(device)
    opt = torch.optim.Adam(student.parameters(), lr=0.01)
    loss_fn = build_loss("hard+soft", 4.0)

    def step(batch):
        xb, yb = batch[0].to(device), batch[1].to(device)
        with torch.no_grad():
            tl = teacher(xb)
        loss = loss_fn(student(xb), tl, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = timed(step, _forever(lambda: iter(loader)), warmup, steps, device)
    return BATCH * steps / seconds


def bench_qdistill(ds, cached_logits, k: int, device, warmup: int, steps: int, channels_last: bool,
                   mode: str = "fp32") -> tuple[float, float]:
    """``(student images per second, compile seconds)`` of the training loop's own step
    on the `qdistill.nn.fused.group` of ``k`` students, on batches sliced from the
    on-device uint8 set, with the cached teacher logits of each batch's indices. ``mode``:
    ``fp32`` or ``bf16`` (autocast) `train_step`, or ``compiled`` (fp32) or
    ``compiled-bf16`` `CompiledStep`, whose compile time is the first step's time less a
    timed step's."""
    if mode not in ("fp32", "bf16", "compiled", "compiled-bf16"):
        raise ValueError(f"mode must be fp32, bf16, compiled or compiled-bf16, got {mode!r}")
    compiled_step = mode.startswith("compiled")
    precision = "bf16" if mode.endswith("bf16") else "fp32"
    x, y, logits = ds.x_train.to(device), ds.y_train.to(device), cached_logits.to(device)
    net = students(k, device, channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    losses = [build_loss("hard+soft", 4.0) for _ in range(k)]
    autocast = autocast_for(device, precision)
    gen = torch.Generator().manual_seed(1)
    fn = CompiledStep() if compiled_step else train_step

    def step(batch):
        xb, yb, idx = batch
        fn(net, opt, xb, yb, logits[idx], losses, autocast)

    items = _forever(lambda: batches(x, y, BATCH, generator=gen, device=device))
    first = timed(step, items, 0, 1, device)
    seconds = timed(step, items, max(0, warmup - 1), steps, device)
    return k * BATCH * steps / seconds, (first - seconds / steps) if compiled_step else 0.0


def _phase(name: str, args: tuple, threads: int, queue) -> None:
    """One pipeline in this (fresh) process: put ``(img/s, peak memory MB, compile s)`` on
    ``queue`` (`peak_memory_mb`: GPU memory on CUDA, else the host's RSS)."""
    try:
        torch.set_num_threads(threads)
        device, warmup, steps, k, channels_last, precision, cached, compiled_step = args
        dev = torch.device(device)
        ds = fake.load()
        if name == "reference":
            torch.manual_seed(0)
            teacher = build("vgg7").to(dev).eval()
            rate, compile_s = bench_reference(ds, teacher, dev, warmup, steps), 0.0
        else:
            mode = ("compiled" if precision == "fp32" else "compiled-bf16") if compiled_step else precision
            rate, compile_s = bench_qdistill(ds, cached, k, dev, warmup, steps, channels_last, mode)
        queue.put((rate, peak_memory_mb(dev), compile_s))
    except BaseException as e:  # the parent re-raises it with the phase's name
        queue.put(e)
        raise


def _in_fresh_process(name: str, args: tuple) -> tuple[float, float, float]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_phase, args=(name, args, torch.get_num_threads(), queue))
    proc.start()
    try:
        out = queue.get()
    finally:
        proc.join()
    if isinstance(out, BaseException):
        raise RuntimeError(f"bench phase {name!r} failed: {out!r}") from out
    return out


def time_data_epoch(ds, device, augment: str = "none") -> float:
    """Seconds to produce one epoch of float batches (the data path alone)."""
    x, y = ds.x_train.to(device), ds.y_train.to(device)
    gen, aug = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    sync(device)
    t0 = time.perf_counter()
    for xb, _, _ in batches(x, y, BATCH, generator=gen, augment=augment, aug_generator=aug, device=device):
        pass
    sync(device)
    return time.perf_counter() - t0


def run(*, k: int = 10, steps: int = 10, warmup: int = 2, device: str = "auto", channels_last: bool | None = None,
        log=print, bf16: bool | None = None) -> dict:
    """Run the benchmark; ``bf16=None`` adds phase (d) where bfloat16 autocast is
    available (CPU, or a CUDA device that supports it) and (c) is not bf16 already."""
    dev = pick_device(device)
    precision = precision_of(dev, configlib.DEFAULTS["train"]["precision"])  # what training uses here
    if channels_last is None:
        channels_last = True  # faster for the grouped convolutions on CPU and GPU alike (README)
    ds = fake.load()
    torch.manual_seed(0)
    teacher = build("vgg7").to(dev).eval()

    log(f"data path: one epoch of {len(ds.x_train)} images ...")
    data_epoch_s = time_data_epoch(ds, dev)
    data_epoch_aug_s = time_data_epoch(ds, dev, "light")
    log("teacher logits, once ...")
    t0 = time.perf_counter()
    cached = predict(teacher, ds.x_train.to(dev), dev)
    teacher_cache_s = time.perf_counter() - t0

    if bf16 is None:  # (d), unless (c) is bf16 already
        bf16 = precision != "bf16" and (dev.type == "cpu" or (dev.type == "cuda" and torch.cuda.is_bf16_supported()))
    cached = cached.cpu()

    def phase(name, kk, precision=precision, compiled_step=False):
        return _in_fresh_process(name, (str(dev), warmup, steps, kk, channels_last, precision, cached,
                                        compiled_step))

    log(f"(a) reference-style, {steps} steps ...")
    ref, ref_rss, _ = phase("reference", 1)
    compiles = compiled.wanted({"train": {"compile": "auto"}}, compiled.AUTO_IMAGES, dev)
    log(f"(b) qdistill, one student, {steps} steps{', compiled' if compiles else ''} ...")
    single, single_rss, compile_s = phase("qdistill", 1, compiled_step=compiles)
    single_eager = single
    if compiles:
        log(f"(b) qdistill, one student, {steps} steps, eager ...")
        single_eager = phase("qdistill", 1)[0]
    default = default_batch(dev, compiles, log)
    log(f"(c) qdistill fused, K={k}, {steps} steps ...")
    fused, fused_rss, _ = phase("qdistill", k)
    fused_bf16 = fused_bf16_rss = None
    if bf16:
        log(f"(d) qdistill fused, K={k}, bf16 autocast, {steps} steps ...")
        fused_bf16, fused_bf16_rss, _ = phase("qdistill", k, "bf16")

    train_epoch_s = len(ds.x_train) / single
    return {
        "reference_img_s": ref, "single_img_s": single, "fused_img_s": fused, "k": k,
        "single_compiled": compiles, "single_eager_img_s": single_eager, "compile_s": compile_s,
        "compiled_vs_eager": single / single_eager, **default,
        "fused_vs_reference": fused / ref, "single_vs_reference": single / ref,
        "peak_rss_mb": fused_rss, "reference_peak_rss_mb": ref_rss, "single_peak_rss_mb": single_rss,
        "precision": precision, "memory": memory_kind(dev),
        "fused_bf16_img_s": fused_bf16, "fused_bf16_vs_reference": fused_bf16 / ref if bf16 else None,
        "fused_bf16_peak_rss_mb": fused_bf16_rss, "device": device_name(dev),
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "steps": steps, "batch": BATCH, "channels_last": channels_last,
        "teacher_cache_s": teacher_cache_s, "data_epoch_s": data_epoch_s, "data_epoch_augment_s": data_epoch_aug_s,
        "train_epoch_s": train_epoch_s, "data_vs_train_epoch": data_epoch_s / train_epoch_s,
    }


def format_table(r: dict) -> str:
    rows = [("(a) reference-style, 1 student", r["reference_img_s"], 1.0),
            ("(b) qdistill, 1 student" + (", compiled" if r["single_compiled"] else ""), r["single_img_s"],
             r["single_vs_reference"]),
            (f"(c) qdistill fused, K={r['k']}", r["fused_img_s"], r["fused_vs_reference"])]
    lines = [f"device: {r['device']}, torch {r['torch_version']}, {r['threads']} threads, "
             f"batch {r['batch']}, {r['steps']} timed steps",
             f"{'pipeline':34s} {'student img/s':>14s} {'vs (a)':>8s}"]
    rss = [r["reference_peak_rss_mb"], r["single_peak_rss_mb"], r["peak_rss_mb"]]
    if r.get("fused_bf16_img_s"):
        rows.append((f"(d) fused, K={r['k']}, bf16 autocast", r["fused_bf16_img_s"], r["fused_bf16_vs_reference"]))
        rss.append(r["fused_bf16_peak_rss_mb"])
    lines[-1] += f" {'peak GPU MB' if r.get('memory') == 'gpu' else 'peak RSS MB':>12s}"
    lines += [f"{name:34s} {rate:14.0f} {ratio:7.2f}x {mb:12.0f}" for (name, rate, ratio), mb in zip(rows, rss)]
    if r.get("precision") == "bf16":
        lines.append("(a) is fp32; (b) and (c) bf16 autocast, as training defaults to on this device")
    else:
        lines.append("(a)-(c) are fp32; (d) is not like for like with (a) (bf16 vs fp32)" if len(rows) > 3
                     else "all pipelines fp32")
    if r["single_compiled"]:
        lines.append(f"(b) eager: {r['single_eager_img_s']:.0f} img/s; compiled {r['compiled_vs_eager']:.2f}x eager "
                     f"after a {r['compile_s']:.0f} s compile; at batch {r['default_batch']} (the default "
                     f"recipe's) {r['default_img_s']:.0f} against {r['default_eager_img_s']:.0f} img/s eager, "
                     f"{r['default_compiled_vs_eager']:.2f}x")
    lines.append(f"each pipeline in a fresh process; teacher logits once: {r['teacher_cache_s']:.1f} s")
    lines.append(f"data path: one epoch {r['data_epoch_s']:.2f} s ({r['data_epoch_augment_s']:.2f} s with "
                 f"augment light) vs a training epoch of one student {r['train_epoch_s']:.0f} s "
                 f"= {100 * r['data_vs_train_epoch']:.2f}%")
    return "\n".join(lines)


def _student_convs(batch: int, device, fmt) -> list[tuple]:
    """``(input, weight, padding, flop)`` of every convolution of a vgg7 student, taken
    from one forward pass of a batch of random images."""
    model = build("vgg7").to(device).to(memory_format=fmt)
    seen = []

    def record(m, inputs, out):
        seen.append((inputs[0], m.weight.detach(), m.padding, 2 * out.numel() * m.weight[0].numel()))

    hooks = [m.register_forward_hook(record) for m in model if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt))
    for h in hooks:
        h.remove()
    return seen


def _giga_per_s(fn, amount: float, device, repeats: int = 10) -> float:
    """``amount`` (flop or bytes) per call of ``fn`` over seconds per call, in units of 1e9."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return amount * repeats / (time.perf_counter() - t0) / 1e9


def scaling(*, ks=(1, 2, 5, 10), batch: int = BATCH, steps: int | None = None, repeats: int = 3,
            device: str = "auto", channels_last: bool = True, log=print) -> dict:
    """Does fusing pay on this machine? Per-student training rate of a fused group of K
    vgg7 W2A1 students (`step_rate.measure_step_rate`: forward, backward, Adam on random data; no
    teacher, no data path; in the precision training defaults to here, `precision_of`;
    ``steps`` defaults to 5120 images at K = 1, K times fewer steps at K, never fewer than
    `MIN_SCALING_STEPS`) for each K, the median of ``repeats``, against K = 1, next to
    the machine's fp32 matmul rate (with TF32 exactly where the convolutions use it:
    `matmul_tf32_like_convolutions`), the rate of one student's convolutions (forward), and
    the bandwidth of one elementwise pass over the first layer's activation of K students.

    Fusion can only pay where one student leaves the device idle: if a lone student's
    convolutions already run near the matmul rate, K of them in one network cannot run
    faster per student, and bigger activations fall out of cache (README, Performance)."""
    dev = pick_device(device)
    precision = precision_of(dev, configlib.DEFAULTS["train"]["precision"])
    steps = steps or max(20, 5120 // batch)  # K=1 times at least 5120 images; K times steps / K
    rates = {}
    for k in ks:
        log(f"K={k} ...")
        runs = [step_rate.measure_step_rate(k=k, batch=batch, steps=max(MIN_SCALING_STEPS, steps // k), warmup=2,
                                            device=dev, channels_last=channels_last, precision=precision)
                for _ in range(repeats)]
        rates[k] = sorted(runs)[len(runs) // 2]
    a, b = torch.randn(2048, 2048, device=dev), torch.randn(2048, 2048, device=dev)
    with matmul_tf32_like_convolutions() as tf32:
        gemm = _giga_per_s(lambda: a @ b, 2 * 2048**3, dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    convs = _student_convs(batch, dev, fmt)
    with torch.no_grad():
        conv = _giga_per_s(lambda: [torch.nn.functional.conv2d(x, w, padding=p) for x, w, p, _ in convs],
                           sum(c[3] for c in convs), dev)
    clamp_gb_s = {}  # one elementwise pass over the first layer's activation of K students
    for k in ks:
        x = torch.randn(batch, 16 * k, 32, 32, device=dev).contiguous(memory_format=fmt)
        clamp_gb_s[str(k)] = _giga_per_s(lambda: x.clamp(0.0, 1.0), 2 * x.numel() * x.element_size(), dev)
    single = rates[ks[0]]
    return {"per_student_img_s": {str(k): r for k, r in rates.items()},
            "first_activation_clamp_gb_s": clamp_gb_s,
            "vs_k1": {str(k): r / single for k, r in rates.items()},
            "fp32_matmul_gflop_s": gemm, "student_conv_forward_gflop_s": conv,
            "conv_vs_matmul": conv / gemm, "batch": batch, "repeats": repeats,
            "channels_last": channels_last, "precision": precision, "tf32": dev.type == "cuda" and tf32,
            "device": device_name(dev),
            "torch_version": torch.__version__, "threads": torch.get_num_threads()}


def format_scaling(r: dict) -> str:
    lines = [f"device: {r['device']}, torch {r['torch_version']}, {r['threads']} threads, batch {r['batch']}, "
             f"median of {r['repeats']}, {r.get('precision', 'fp32')}",
             f"{'students fused (K)':>18s} {'img/s per student':>18s} {'vs K=1':>7s}"]
    lines += [f"{k:>18s} {v:18.0f} {r['vs_k1'][k]:6.2f}x" for k, v in r["per_student_img_s"].items()]
    lines.append("clamp over the first layer's activation (bytes read + written): " + ", ".join(
        f"K={k} {v:.1f} GB/s" for k, v in r["first_activation_clamp_gb_s"].items()))
    lines.append(f"fp32 matmul{' (TF32, as the convolutions)' if r.get('tf32') else ''} "
                 f"{r['fp32_matmul_gflop_s']:.0f} GFLOP/s; one student's convolutions (forward) "
                 f"{r['student_conv_forward_gflop_s']:.0f} GFLOP/s = {100 * r['conv_vs_matmul']:.0f}% of it")
    return "\n".join(lines)
