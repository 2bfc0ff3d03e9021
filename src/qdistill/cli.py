"""The ``qdistill`` command: argument parsing, config layering and error messages.

Every command takes ``--config FILE.toml`` and ``--set section.key=value``; flags
override the file and ``--set`` overrides both. A `UserError` anywhere becomes one
line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from . import config as configlib
from .data import AUGMENTS, DATASETS
from .errors import ConfigError, RunError, UserError
from .nn import LOSSES, SCHEMES
from .resolve import flags_config, resolve
from .training import PRECISIONS, SCHEDULES


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        print(f"qdistill: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


# --- flags shared by the training commands -------------------------------------------------

def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config")
    g.add_argument("--config", help="TOML config file (see configs/)")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key (repeatable)")


def _add_common(p: argparse.ArgumentParser, *, model_help: str) -> None:
    _add_config_flags(p)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS)
    g.add_argument("--data-dir", help="folder of the SVHN .mat files (default ~/.cache/qdistill/svhn)")
    g.add_argument("--data-path", help="the .npz file of the npz dataset")
    g.add_argument("--extra", action="store_true", default=None, help="svhn: add extra_32x32.mat to train")
    g.add_argument("--no-verify", action="store_false", dest="verify", default=None,
                   help="svhn: accept files that are not the official ones (skip md5)")
    g.add_argument("--augment", choices=AUGMENTS)
    g.add_argument("--val-fraction", type=float)
    g.add_argument("--max-train", type=int, help="keep the first N training images")
    g.add_argument("--max-test", type=int, help="keep the first N test images")
    g = p.add_argument_group("training")
    g.add_argument("--model", help=model_help)
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, bf16")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_student_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("student")
    g.add_argument("--loss", choices=LOSSES)
    g.add_argument("--temperature", "-T", type=float)
    g.add_argument("--c", type=float, help="weight of the soft term (default T^2)")
    g.add_argument("--weight-bits", type=int)
    g.add_argument("--act-bits", type=int)
    g.add_argument("--grad-bits", type=int)
    g.add_argument("--scheme", choices=SCHEMES)
    g.add_argument("--quantize-first-last", action="store_true", default=None)


def _config(args, model_section: str | None = None, *, role: str | None = None, base: dict | None = None,
            base_origin: str = "", check: bool = True) -> dict:
    """The command's config: ``base`` < ``--config`` < its flags < ``--set`` (`resolve`)."""
    return resolve(getattr(args, "config", None), flags_config(args, model_section), getattr(args, "set", []),
                   base=base, base_origin=base_origin, role=role, check=check)


def _data_of_teacher(cfg: dict) -> dict | None:
    """A student's data defaults to its teacher's (``--teacher RUN``)."""
    from .training.rundir import read_config
    run = cfg["teacher"]["run"]
    if not run:
        return None
    return {"data": {k: v for k, v in read_config(run).get("data", {}).items() if k in configlib.DEFAULTS["data"]}}


def _require_out(args) -> None:
    if not args.out:
        raise ConfigError("--out RUN is required")


def _print_run(role: str, out, summary: dict) -> None:
    print(f"{role} {out}: val {summary['val_best_acc']:.4f} "
          f"test at best val {summary['test_acc_at_val_best']:.4f} ({summary['wall_s']:.0f} s)")


# --- commands -------------------------------------------------------------------------------

def cmd_teacher(args) -> int:
    from .data.registry import load
    from .training.loop import train
    cfg = _config(args, "teacher", role="teacher")
    _require_out(args)
    [summary] = train([(cfg, args.out)], load(cfg["data"]), resume=args.resume, force=args.force,
                      progress=not args.quiet)
    _print_run("teacher", args.out, summary)
    return 0


def cmd_student(args) -> int:
    from .data.registry import load
    from .training.loop import train
    from .training.targets import TeacherTargets
    first = _config(args, "student", check=False)
    cfg = _config(args, "student", role="student", base=_data_of_teacher(first),
                  base_origin=f"{first['teacher']['run']}/config.toml")
    _require_out(args)
    run = cfg["teacher"]["run"]
    if not run and cfg["student"]["loss"] != "hard":
        # hard+softgt trains without the teacher, but its run is compared with it
        # (agreement, KL) and takes its data from it, as every distillation question does.
        raise ConfigError(f"loss {cfg['student']['loss']} needs --teacher RUN (only --loss hard trains without one)")
    data = load(cfg["data"])
    targets = TeacherTargets.from_run(run, data) if run else None
    if targets:
        targets.check_useful(args.allow_weak_teacher)
    [summary] = train([(cfg, args.out)], data, targets, resume=args.resume, force=args.force,
                      progress=not args.quiet)
    _print_run("student", args.out, summary)
    return 0


def cmd_eval(args) -> int:
    from .data.registry import load
    from .training.checkpoint import load_model
    from .training.evaluate import evaluate
    from .training.rundir import read_config
    # --config/--set/--data-dir may point the run at its data elsewhere (a moved SVHN folder).
    cfg = _config(args, base=read_config(args.run), base_origin=str(args.run))
    model, meta = load_model(args.run, args.checkpoint)
    data = load(cfg["data"])
    if meta["build"]["num_classes"] != data.num_classes:
        raise RunError(f"run {args.run} has {meta['build']['num_classes']} classes, its data {data.num_classes}")
    result = {"run": str(args.run), "checkpoint": args.checkpoint, **evaluate(model, data)}
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "n"}))
        return 0
    names = data.class_names
    print(f"{args.run} ({args.checkpoint}.pt): test accuracy {result['test_acc']:.4f} on {result['n']} images")
    print("per-class accuracy: " + "  ".join(f"{c}:{a:.3f}" for c, a in result["per_class_acc"].items()))
    width = max(5, *(len(c) for c in names))
    print("confusion (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{c:>{width}}" for c in names))
    for name, row in zip(names, result["confusion"]):
        print(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return 0


def cmd_datasets(args) -> int:
    from .data.registry import describe
    for d in describe(_config(args)["data"]["data_dir"]):
        sizes = f"{d['train']} train / {d['test']} test" if d.get("train") else "sizes from the file"
        print(f"{d['name']:7s} {sizes}: {d['description']}")
        if "files" in d:
            for name, present in d["files"].items():
                state = ("converted" if d["cached"].get(name) else "present") if present else "missing"
                print(f"        {Path(d['data_dir']) / name}: {state}")
    return 0


def cmd_study(args) -> int:
    from .report.report import write_report
    from .study.run import run_study
    if args.config_file and args.config:
        raise ConfigError("give the study config either as CONFIG.toml or --config, not both")
    args.config = args.config_file or args.config
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    result = run_study(_config(args, "student"), args.out, force=args.force, workers=args.workers,
                       fused=False if args.no_fused else None, progress=not args.quiet,
                       allow_weak_teacher=args.allow_weak_teacher)
    ok = len(result["rows"]) - len(result["failed"])
    print(f"study {args.out}: {ok}/{len(result['rows'])} runs finished")
    for name in result["failed"]:
        print(f"  not finished: {name} (see {Path(args.out) / 'runs' / name / 'error.txt'})")
    print(f"report: {write_report(args.out)['html']}")
    return 1 if result["failed"] else 0


def cmd_report(args) -> int:
    from .report.report import write_report
    if not (Path(args.study) / "results.csv").is_file():
        raise RunError(f"{args.study} is not a study (no results.csv)")
    paths = write_report(args.study)
    print(f"report: {paths['html']}")
    return 0


def cmd_export(args) -> int:
    from .export.packed import export_run
    from .training.rundir import read_summary
    export_run(args.run, args.out, checkpoint=args.checkpoint, fmt=args.format)
    size = Path(args.out).stat().st_size
    print(f"exported {args.run} ({args.checkpoint}.pt) to {args.out} ({args.format}, {size:,} bytes)")
    fp32 = (read_summary(args.run) or {}).get("fp32_bytes")
    if args.format == "qdz" and fp32:
        print(f"its fp32 weights: {fp32:,} bytes ({fp32 / size:.1f}x the packed file)")
    return 0


def cmd_predict(args) -> int:
    from .deploy.predict import predict_dataset, predict_image
    if args.image:
        if args.dataset or args.data_path or args.config or args.set:
            raise ConfigError("give either an image file or dataset options, not both")
        label, probs = predict_image(args.model, args.image)
        print(json.dumps({"image": args.image, "label": label, "probability": float(probs.max())})
              if args.json else f"{args.image}: {label} (p = {probs.max():.3f})")
        return 0
    if not args.dataset and not args.config and not args.set:
        raise ConfigError("give an image file or --dataset (and its options) to predict on")
    result = predict_dataset(args.model, _config(args)["data"])
    print(json.dumps(result) if args.json else
          f"{args.model} on {result['dataset']} test: accuracy {result['accuracy']:.4f} "
          f"({result['correct']}/{result['total']}, {result['backend']} engine)")
    return 0


def cmd_bench(args) -> int:
    if args.deploy and args.scaling:
        raise ConfigError("choose one of --deploy and --scaling")
    if args.deploy:
        from .bench import deploy as bench_deploy
        result = bench_deploy.run()
        print(json.dumps(result) if args.json else bench_deploy.format_table(result))
        return 0
    from .bench import training as bench
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.scaling:
        if args.batch < 1:
            raise ConfigError("--batch must be >= 1")
        result = bench.scaling(batch=args.batch, device=args.device, channels_last=not args.no_channels_last,
                               log=log)
        print(json.dumps(result) if args.json else bench.format_scaling(result))
        return 0
    if args.k < 2 or args.steps < 1:
        raise ConfigError("--k must be >= 2 and --steps >= 1")
    result = bench.run(k=args.k, steps=args.steps, device=args.device,
                       channels_last=not args.no_channels_last, log=log)
    print(json.dumps(result) if args.json else bench.format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qdistill", description="Distil full-precision teachers into DoReFa low-bit students.")
    p.add_argument("--version", action="version", version=f"qdistill {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("teacher", help="train a full-precision teacher")
    _add_common(t, model_help="teacher architecture (default vgg7)")
    t.add_argument("--out", help="run directory to write")
    t.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    t.add_argument("--force", action="store_true", help="overwrite an existing run")
    t.set_defaults(func=cmd_teacher)

    s = sub.add_parser("student", help="train a quantized student (Q1-Q4 losses)")
    _add_common(s, model_help="student architecture (default vgg7)")
    _add_student_flags(s)
    s.add_argument("--teacher", help="teacher run directory (required except for --loss hard)")
    s.add_argument("--allow-weak-teacher", action="store_true",
                   help="use a teacher whose validation accuracy is within 5 points of chance")
    s.add_argument("--out", help="run directory to write")
    s.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    s.add_argument("--force", action="store_true", help="overwrite an existing run")
    s.set_defaults(func=cmd_student)

    e = sub.add_parser("eval", help="test accuracy, per-class accuracy and confusion matrix of a run")
    e.add_argument("run")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(e)
    e.add_argument("--data-dir", help="where the run's SVHN files are now")
    e.add_argument("--data-path", help="where the run's .npz file is now")
    e.set_defaults(func=cmd_eval)

    st = sub.add_parser("study", help="the Q1-Q4 temperature study, then its report")
    st.add_argument("config_file", nargs="?", metavar="CONFIG.toml", help="study config (see configs/)")
    _add_common(st, model_help="student architecture (default vgg7)")
    _add_student_flags(st)
    st.add_argument("--teacher", help="reuse this teacher run instead of training one")
    st.add_argument("--allow-weak-teacher", action="store_true",
                    help="use a teacher whose validation accuracy is within 5 points of chance")
    st.add_argument("--out", required=True, help="study directory")
    st.add_argument("--workers", type=int, help="runs at once in separate processes (when not fused)")
    st.add_argument("--no-fused", action="store_true", help="never fuse (study.fused = \"auto\" fuses on CUDA only)")
    st.add_argument("--force", action="store_true", help="accept a changed config (stale runs are redone)")
    st.set_defaults(func=cmd_study)

    r = sub.add_parser("report", help="(re)write the report of a study")
    r.add_argument("study")
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="write a trained student as a packed .qdz (or ONNX)")
    x.add_argument("run")
    x.add_argument("--out", required=True, help="output file (student.qdz or student.onnx)")
    x.add_argument("--checkpoint", choices=("best", "last"), default="best")
    x.add_argument("--format", choices=("qdz", "onnx"), default="qdz")
    x.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="classify with an exported .qdz (integer engine, no torch)")
    pr.add_argument("model", metavar="MODEL.qdz")
    pr.add_argument("image", nargs="?", help="an image file (PNG, JPEG); else the test split of --dataset")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(pr)
    pr.add_argument("--dataset", choices=DATASETS)
    pr.add_argument("--data-dir")
    pr.add_argument("--data-path")
    pr.add_argument("--no-verify", action="store_false", dest="verify", default=None)
    pr.add_argument("--max-test", type=int)
    pr.set_defaults(func=cmd_predict)

    b = sub.add_parser("bench", help="training throughput vs a reference-style pipeline (a benchmark)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--k", type=int, default=10, help="fused students (default 10)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per pipeline (default 10)")
    b.add_argument("--device", default="auto")
    b.add_argument("--no-channels-last", action="store_true", help="NCHW for qdistill's students too")
    b.add_argument("--deploy", action="store_true", help="size and speed of the packed export instead")
    b.add_argument("--scaling", action="store_true",
                   help="per-student rate of fused groups of K = 1, 2, 5, 10: does fusing pay here?")
    b.add_argument("--batch", type=int, default=256, help="batch size for --scaling (default 256)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("datasets", help="list datasets and whether the SVHN files are present")
    _add_config_flags(d)
    d.add_argument("--data-dir", help="folder of the SVHN .mat files (default ~/.cache/qdistill/svhn)")
    d.set_defaults(func=cmd_datasets)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by SLURM, Kubernetes, ``timeout``): stop as Ctrl-C does."""


def _terminate(signum, frame):
    raise Terminated


def _how_to_continue(args) -> str:
    if args.command == "study":
        return "rerun the same command to continue"
    if args.command in ("teacher", "student"):
        return "rerun with --resume to continue"
    return "nothing was left half-written"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args)
    except UserError as e:
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"qdistill: stopped by SIGTERM; the last finished epoch is saved: {_how_to_continue(args)}",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"qdistill: interrupted; the last finished epoch is saved: {_how_to_continue(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qdistill eval RUN | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
