"""The commands: each resolves its config (`qdistill.resolve`), calls the layer that does
the work, and prints the outcome."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import config as configlib
from ..errors import ConfigError, DataError, RunError
from ..resolve import flags_config, resolve
from ..study.studydir import RESULTS, StudyDir
from ..training import CHANCE_MARGIN, near_chance
from ..training.rundir import CONFIG, ERROR, RunDir


def _config(args, *, role: str | None = None, base: dict | None = None, base_origin: str = "",
            check: bool = True) -> dict:
    """The command's config: ``base`` < ``--config`` < its flags < ``--set`` (`resolve`)."""
    return resolve(getattr(args, "config", None), flags_config(args), getattr(args, "set", []),
                   base=base, base_origin=base_origin, role=role, check=check)


def _data_of_teacher(cfg: dict) -> dict | None:
    """A student's data defaults to its teacher's (``--teacher RUN``); a teacher file
    does not say which data it learned from."""
    run = cfg["teacher"]["run"]
    if not run or not Path(run).is_dir():
        return None
    return {"data": {k: v for k, v in RunDir(run).read_config().get("data", {}).items()
                     if k in configlib.DEFAULTS["data"]}}


def _require_out(args, what: str = "RUN", unless: str = "") -> None:
    if not args.out:
        raise ConfigError(f"--out {what} is required{unless}")


def _check_tensorboard(cfg: dict) -> None:
    """``train.tensorboard`` needs its package: say so before any data loads or run trains
    (a study would otherwise record the error in every run's error.txt)."""
    if cfg["train"]["tensorboard"]:
        from ..training.scalars import summary_writer
        summary_writer()


def _say_packing(cfg: dict) -> None:
    """A warning line, as a student starts to train, where `export` could not pack it."""
    from ..nn import packing_note
    note = packing_note(cfg["student"]["weight_bits"], cfg["student"]["act_bits"])
    if note:
        print(f"qdistill: warning: {note}", file=sys.stderr, flush=True)


def _print_run(role: str, out, summary: dict) -> None:
    print(f"{role} {out}: val {summary['val_best_acc']:.4f} "
          f"test at best val {summary['test_acc_at_val_best']:.4f} ({summary['wall_s']:.0f} s)")
    k, acc = len(summary["test_per_class_acc"]), summary["test_acc_at_val_best"]
    if near_chance(acc, k):  # the run finished (exit 0), but learned nothing usable
        print(f"qdistill: warning: {role} {out} ends at {100 * acc:.1f}% test accuracy, within "
              f"{100 * CHANCE_MARGIN:g} points of chance ({100 / k:.1f}% for {k} classes): train it longer, "
              f"on more data, or with another learning rate", file=sys.stderr)


def _load(cfg: dict):
    """The dataset of ``cfg``, saying in one line what ``data.skip_bad_images`` left out."""
    from ..data.imagefolder import skipped_list
    from ..data.registry import load
    data = load(cfg["data"])
    if getattr(data, "skipped", 0):
        print(f"qdistill: skipped {data.skipped} unreadable image(s) (data.skip_bad_images); their list: "
              f"{skipped_list(cfg['data']['data_dir'])}", file=sys.stderr)
    return data


# --- commands -------------------------------------------------------------------------------

def _existing(args) -> str:
    """What to do with a run already in ``--out`` (`RunDir.prepare`): --force starts it
    over, which contradicts continuing it."""
    if args.force and (args.resume or args.extend):
        raise ConfigError(f"--force starts the run over and --{'resume' if args.resume else 'extend'} continues it: "
                          f"give one of them")
    return "force" if args.force else "extend" if args.extend else "resume" if args.resume else "new"


def _stored(args) -> dict | None:
    """The config of the run being resumed or extended: the base its flags change."""
    if _existing(args) in ("resume", "extend") and args.out and (RunDir(args.out) / CONFIG).is_file():
        return RunDir(args.out).read_config()
    return None


def cmd_teacher(args) -> int:
    from ..training.loop import train
    _require_out(args)
    stored = _stored(args)
    cfg = _config(args, role="teacher", base=stored, base_origin=str(RunDir(args.out) / CONFIG))
    _check_tensorboard(cfg)
    [summary] = train([(cfg, args.out)], _load(cfg), existing=_existing(args), progress=not args.quiet)
    _print_run("teacher", args.out, summary)
    return 0


def cmd_student(args) -> int:
    from ..training.loop import train
    from ..training.teacher import open_teacher
    _require_out(args)
    stored = _stored(args)
    if stored is not None:
        cfg = _config(args, role="student", base=stored, base_origin=str(RunDir(args.out) / CONFIG))
    else:
        first = _config(args, check=False)
        cfg = _config(args, role="student", base=_data_of_teacher(first),
                      base_origin=str(RunDir(first["teacher"]["run"]) / CONFIG))
    _check_tensorboard(cfg)
    _say_packing(cfg)
    if not cfg["teacher"]["run"] and cfg["student"]["loss"] != "hard":
        # hard+softgt trains without the teacher, but its run is compared with it
        # (agreement, KL) and takes its data from it, as every distillation question does.
        raise ConfigError(f"loss {cfg['student']['loss']} needs --teacher RUN (only --loss hard trains without one)")
    data = _load(cfg)
    teacher = open_teacher(cfg, data)  # every problem with it shows here, before the run directory exists
    [summary] = train([(cfg, args.out)], data, teacher, existing=_existing(args), progress=not args.quiet)
    _print_run("student", args.out, summary)
    return 0


def cmd_eval(args) -> int:
    from ..training.checkpoint import load_model
    from ..training.evaluate import evaluate
    # --config/--set/--data-dir may point the run at its data elsewhere (a moved SVHN folder).
    cfg = _config(args, base=RunDir(args.run).read_config(), base_origin=str(args.run))
    model, meta = load_model(args.run, args.checkpoint)
    data = _load(cfg)
    if meta["class_names"] != list(data.class_names):
        raise DataError(f"run {args.run} was trained on the classes {meta['class_names']}, but the data has "
                        f"{list(data.class_names)}: give the data the run was trained on")
    from ..training.device import threads
    with threads(cfg["train"]["threads"]):
        result = {"run": str(args.run), "checkpoint": args.checkpoint, **evaluate(model, data)}
        probe = _probe(cfg, args, model, data)
    if args.json:
        print(json.dumps({**{k: v for k, v in result.items() if k != "n"}, "test_images": result["n"], **probe}))
        return 0
    names = data.class_names
    print(f"{args.run} ({args.checkpoint}.pt): test accuracy {result['test_acc']:.4f} on {result['n']} images")
    if probe:
        print(_probe_line(probe))
    print("per-class accuracy: " + "  ".join(f"{c}:{a:.3f}" for c, a in result["per_class_acc"].items()))
    width = max(5, *(len(c) for c in names)) + 1  # a space between columns, however long a name
    print("confusion (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{c:>{width}}" for c in names))
    for name, row in zip(names, result["confusion"]):
        print(f"{name:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return 0


def _probe(cfg: dict, args, model, data) -> dict:
    """The unseen-class probe of a run trained without class K (``student.omit_class``):
    K's accuracy and mean rank on its test images; for the best checkpoint, also the
    accuracy after the shift of K's logit its training chose on the training images
    (``omitted_class_bias`` in summary.json, which holds no shift for the last checkpoint)."""
    import numpy as np
    from ..training.evaluate import predict
    from ..training.probes import omitted, omitted_class
    k = omitted(cfg)
    if k is None:
        return {}
    logits = predict(model, data.x_test)
    out = omitted_class(logits, data, k)
    bias = (RunDir(args.run).read_summary() or {}).get("omitted_class_bias")
    if args.checkpoint == "best" and bias is not None:
        z = logits.numpy()[(data.y_test == k).numpy()]
        shifted = z + bias * np.eye(z.shape[1])[k]  # as `probes.omitted_class` shifts it
        out.update(omitted_class_bias=bias, omitted_class_acc_bias_corrected=float((shifted.argmax(1) == k).mean())
                   if len(z) else float("nan"))
    return out


def _probe_line(probe: dict) -> str:
    line = (f"unseen class {probe['omitted_class']} (left out of training): accuracy {probe['omitted_class_acc']:.4f}, "
            f"mean rank {probe['omitted_class_rank']:.2f}")
    if "omitted_class_acc_bias_corrected" in probe:
        line += (f"; bias-corrected accuracy {probe['omitted_class_acc_bias_corrected']:.4f} "
                 f"(bias {probe['omitted_class_bias']:+.3f})")
    return line


def cmd_datasets(args) -> int:
    from ..data.registry import describe
    records = describe(_config(args)["data"]["data_dir"])
    width = max(len(d["name"]) for d in records)
    for d in records:
        sizes = f"{d['train']} train / {d['test']} test" if d.get("train") else "sizes from your data"
        print(f"{d['name']:{width}s} {sizes}: {d['description']}")
        if "files" in d:
            for name, present in d["files"].items():
                state = ("converted" if d["cached"].get(name) else "present") if present else "missing"
                print(f"{'':{width}s} {Path(d['data_dir']) / name}: {state}")
    return 0


def cmd_study(args) -> int:
    from ..report.report import write_report
    from ..study.plan import announces, measured_estimate, plan_lines, race_lines
    from ..study.run import check_plan, pilot_values, run_study
    if args.config_file and args.config:
        raise ConfigError("give the study config either as CONFIG.toml or --config, not both")
    args.config = args.config_file or args.config
    if not args.plan:
        _require_out(args, "STUDY", " (only --plan runs without one)")
    cfg = _config(args)
    _check_tensorboard(cfg)
    _say_packing(cfg)
    if args.plan:  # what the study would refuse, refused here too
        left = check_plan(cfg, args.out, args.force)
        race = race_lines(cfg, pilot_values(cfg, args.out)) if cfg["study"]["search"] == "race" else []
        print("\n".join(plan_lines(cfg) + race + measured_estimate(cfg, left)), flush=True)
        return 0
    if announces(cfg, from_file=bool(args.config)):
        print("\n".join(plan_lines(cfg)), flush=True)
    result = run_study(cfg, args.out, force=args.force, progress=not args.quiet)
    ok = len(result["rows"]) - len(result["failed"])
    print(f"study {args.out}: {ok}/{len(result['rows'])} runs finished")
    for name in result["failed"]:
        print(f"  not finished: {name} (see {StudyDir(args.out).run(name).path / ERROR})")
    print(f"report: {write_report(args.out)['html']}")
    return 1 if result["failed"] else 0


def cmd_report(args) -> int:
    from ..report.report import write_report
    if not StudyDir(args.study).results.is_file():
        raise RunError(f"{args.study} is not a study (no {RESULTS})")
    if args.replay_race:
        from ..study.replay import replay_lines
        from ..study.results import read_results
        print("\n".join(replay_lines(read_results(StudyDir(args.study).results), _race_rule(args), args.orders)))
        return 0
    if args.set or args.orders != 1:
        raise ConfigError("--set and --orders go with --replay-race; a report reads the study as it ran")
    paths = write_report(args.study)
    print(f"report: {paths['html']}")
    return 0


def _race_rule(args):
    """The race's keys for ``report --replay-race``: the study's config, then ``--set``."""
    from ..study import RACE_TESTS
    from ..study.race import Rule
    study = StudyDir(args.study)
    cfg = configlib.merge(configlib.defaults(), study.read_config(), str(study.config_file))
    for item in args.set:
        configlib.merge(cfg, configlib.parse_set(item), "--set")
    cfg["study"]["search"] = "race"
    configlib.check(cfg)
    configlib.check_choice(cfg, "study", "race_test", RACE_TESTS)
    return Rule.of(cfg["study"])


EXPORT_FORMATS = {".qdz": "qdz", ".onnx": "onnx"}


def cmd_export(args) -> int:
    from ..export.packed import export_run
    fmt = args.format or EXPORT_FORMATS.get(Path(args.out).suffix.lower())
    if fmt is None:
        raise ConfigError(f"--out {args.out}: the format comes from its extension, .qdz (packed) or .onnx; "
                          f"name the file so, or give --format qdz or --format onnx")
    export_run(args.run, args.out, checkpoint=args.checkpoint, fmt=fmt)
    size = Path(args.out).stat().st_size
    print(f"exported {args.run} ({args.checkpoint}.pt) to {args.out} ({fmt}, {size:,} bytes)")
    fp32 = (RunDir(args.run).read_summary() or {}).get("fp32_bytes")
    if fmt == "qdz" and fp32:
        print(f"its fp32 weights: {fp32:,} bytes ({fp32 / size:.1f}x the packed file)")
    return 0


def cmd_predict(args) -> int:
    from ..deploy.predict import predict_dataset, predict_image
    _engine_threads(getattr(args, "train.threads"))
    if args.image:
        if flags_config(args).get("data") or args.config or args.set:
            raise ConfigError("give either an image file (or folder) or dataset options, not both")
        if Path(args.image).is_dir():
            return _predict_folder(args)
        if not Path(args.image).exists():
            raise DataError(f"no such image file or folder: {args.image}")
        if args.out:
            raise DataError(f"--out writes the predictions of a folder of images; {args.image} is not a folder")
        top, _ = predict_image(args.model, args.image)
        print(json.dumps({"image": args.image, **top}) if args.json else
              f"{args.image}: {top['name']} (class {top['index']}, p = {top['probability']:.3f})")
        return 0
    if args.out:
        raise ConfigError("--out writes the predictions of a FOLDER of images: give one")
    if not flags_config(args).get("data") and not args.config and not args.set:
        raise ConfigError("give an image file, a folder of images or --dataset (and its options) to predict on")
    result = predict_dataset(args.model, _config(args)["data"])
    print(json.dumps(result) if args.json else
          f"{args.model} on {result['dataset']} test: accuracy {result['accuracy']:.4f} "
          f"({result['correct']}/{result['total']}, {result['backend']} engine)")
    return 0


def _engine_threads(n: int | None) -> None:
    """``--threads N`` for the engine: numba's threads (the numpy kernels use one)."""
    if not n:
        return
    from ..deploy.numba_kernels import HAVE_NUMBA, numba
    if HAVE_NUMBA:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _predict_folder(args) -> int:
    """Every image under the folder, as CSV: into ``--out`` (atomically), else on stdout;
    either only once every image was read."""
    from ..atomic import atomic_write_text
    from ..deploy.predict import predict_folder, predictions_csv
    if args.json:
        raise ConfigError("--json is for one image or --dataset; a folder's predictions are CSV")
    rows, others = predict_folder(args.model, args.image, skip_bad_images=args.skip_bad_images)
    if others:
        print(f"qdistill: {others} file(s) under {args.image} are not images (png, jpg, jpeg, bmp, webp) and were "
              f"left out", file=sys.stderr)
    bad = sum(1 for r in rows if r.get("error"))
    if bad:
        print(f"qdistill: {bad} unreadable image(s), listed with their error in the CSV", file=sys.stderr)
    if not args.out:
        sys.stdout.write(predictions_csv(rows))
        return 0
    atomic_write_text(args.out, predictions_csv(rows))
    print(f"{args.out}: {len(rows)} predictions of the images under {args.image}")
    return 0


def cmd_bench(args) -> int:
    if args.deploy + args.scaling + args.cluster > 1:
        raise ConfigError("choose one of --deploy, --scaling and --cluster")
    if args.cluster:
        from ..bench import cluster as bench_cluster
        if args.epochs < 1:
            raise ConfigError("--epochs must be >= 1")
        log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
        result = bench_cluster.run(epochs=args.epochs, log=log)
        print(json.dumps(result) if args.json else bench_cluster.format_table(result))
        return 0
    if args.deploy:
        from ..bench import deploy as bench_deploy
        result = bench_deploy.run()
        print(json.dumps(result) if args.json else bench_deploy.format_table(result))
        return 0
    from ..bench import training as bench
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.scaling:
        if args.batch < 1:
            raise ConfigError("--batch must be >= 1")
        result = bench.scaling(batch=args.batch, device=args.device, channels_last=not args.no_channels_last,
                               log=log)
        print(json.dumps(result) if args.json else bench.format_scaling(result))
        return 0
    if getattr(args, "student.model") is not None or args.set:
        from ..bench import step_rate
        result = step_rate.model_rate(_config(args), device=args.device, log=log)
        print(json.dumps(result) if args.json else step_rate.format_model_rate(result))
        return 0
    if args.k < 2 or args.steps < 1:
        raise ConfigError("--k must be >= 2 and --steps >= 1")
    result = bench.run(k=args.k, steps=args.steps, device=args.device,
                       channels_last=not args.no_channels_last, log=log)
    print(json.dumps(result) if args.json else bench.format_table(result))
    return 0
