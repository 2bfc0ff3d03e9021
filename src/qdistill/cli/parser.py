"""The command line's parser: every command, its flags and their help.

A flag that sets a config key stores its value under the key's dotted name
(``dest="train.epochs"``), so `qdistill.resolve.flags_config` turns every such flag into
config before anything is checked: one route from the command line to the config. Its
help shows the key's default, read from the schema.
"""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from .. import config as configlib
from ..data import AUGMENTS, DATASETS
from ..nn import KD_TERMS, LOSSES, SCHEMES
from ..training import OPTIMIZERS, PRECISIONS, RECIPES, SCHEDULES
from . import commands


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        print(f"qdistill: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class _Ray(argparse.Action):
    """``--ray [ADDRESS]``: ``study.executor = "ray"`` and ``study.ray_address``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, "study.executor", "ray")
        setattr(namespace, self.dest, values)


def _key(group, *flags: str, key: str, help: str = "", **kwargs) -> None:
    """A flag that sets the config key ``key`` (``section.name``); its help ends with the
    key and its default from the schema."""
    section, name = key.split(".")
    default = configlib.DEFAULTS[section].get(name)
    shown = "T^2" if name == "c" else ("" if default in ("", []) else default)
    tail = f"{key}" + (f", default {shown}" if shown != "" else "")
    if "const" not in kwargs and "choices" not in kwargs:
        kwargs.setdefault("metavar", name.upper())
    group.add_argument(*flags, dest=key, default=None, help=f"{help} ({tail})" if help else f"({tail})", **kwargs)


# --- flags shared by several commands ---------------------------------------------------------

def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config")
    g.add_argument("--config", help="TOML config file (see configs/)")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key (repeatable)")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    _key(g, "--dataset", key="data.dataset", choices=DATASETS)
    _key(g, "--data-dir", key="data.data_dir", help="svhn, cifar10, cifar100: folder of the official files "
         "(~/.cache/qdistill/DATASET); imagefolder: ROOT with train/<class>/ and test/<class>/")
    _key(g, "--data-path", key="data.data_path", help="the .npz file of the npz dataset")
    _key(g, "--extra", key="data.extra", action="store_const", const=True, help="svhn: add extra_32x32.mat to train")
    _key(g, "--no-verify", key="data.verify", action="store_const", const=False,
         help="svhn, cifar10, cifar100: accept files that are not the official ones (skip md5)")
    _key(g, "--augment", key="data.augment", choices=AUGMENTS)
    _key(g, "--val-fraction", key="data.val_fraction", type=float)
    _key(g, "--max-train", key="data.max_train", type=int, help="keep the first N training images")
    _key(g, "--max-test", key="data.max_test", type=int, help="keep the first N test images")


def _add_training(p: argparse.ArgumentParser, model_key: str) -> None:
    g = p.add_argument_group("training")
    _key(g, "--model", key=model_key, help="a registered model (vgg7, vgg7-wide, dorefa-svhn, resnet20), or your "
         "own: FILE.py:FUNCTION or package.module:FUNCTION, its keyword arguments in [SECTION.model_args]")
    _key(g, "--recipe", key="train.recipe", choices=RECIPES,
         help="a bundle of optimizer, learning rate, schedule, batch size and averaging; keys you set override it")
    _key(g, "--epochs", key="train.epochs", type=int)
    _key(g, "--batch-size", key="train.batch_size", type=int)
    _key(g, "--optimizer", key="train.optimizer", choices=OPTIMIZERS)
    _key(g, "--lr", key="train.lr", type=float, help="the peak learning rate")
    _key(g, "--schedule", key="train.schedule", choices=SCHEDULES)
    _key(g, "--weight-decay", key="train.weight_decay", type=float)
    _key(g, "--seed", key="train.seed", type=int)
    _key(g, "--device", key="train.device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    _key(g, "--precision", key="train.precision", choices=PRECISIONS,
         help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    _key(g, "--tensorboard", key="train.tensorboard", action="store_const", const=True,
         help="also write each epoch's scalars as TensorBoard event files in the run directory "
              "(pip install 'qdistill[tensorboard]')")
    _key(g, "--compile", key="train.compile", type=_compile_value, metavar="{auto,true,false}",
         help="torch.compile the training step (auto: where the run is long enough to repay compiling)")
    _threads_flag(g)
    g.add_argument("--quiet", action="store_true", help="no progress bars (one line per finished run stays)")


COMPILE_VALUES = {"auto": "auto", "true": True, "false": False}


def _compile_value(text: str):
    """``--compile``'s value as the config holds it; another word: one line naming the
    spellings (the README's, not Python's ``True``/``False``)."""
    if text.lower() not in COMPILE_VALUES:
        raise argparse.ArgumentTypeError(f"choose from auto, true, false (got {text!r})")
    return COMPILE_VALUES[text.lower()]


def _threads_flag(g) -> None:
    _key(g, "--threads", key="train.threads", type=int,
         help="torch's CPU threads (0: torch's default); on a shared machine, 1 per process avoids oversubscription")


def _add_student(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("student")
    _key(g, "--loss", key="student.loss", choices=LOSSES)
    _key(g, "--temperature", "-T", key="student.temperature", type=float)
    _key(g, "--c", key="student.c", type=float, help="weight of the soft term")
    _key(g, "--kd", key="student.kd", choices=KD_TERMS, help="the teacher term of Q2 and Q3 (a study: study.kd)")
    _key(g, "--weight-bits", key="student.weight_bits", type=int)
    _key(g, "--act-bits", key="student.act_bits", type=int)
    _key(g, "--grad-bits", key="student.grad_bits", type=int)
    _key(g, "--scheme", key="student.scheme", choices=SCHEMES)
    _key(g, "--quantize-first-last", key="student.quantize_first_last", action="store_const", const=True)
    _key(g, "--omit-class", key="student.omit_class", type=int,
         help="leave class K out of the student's training (the unseen-class probe; -1: none)")
    _key(g, "--allow-weak-teacher", key="study.allow_weak_teacher", action="store_const", const=True,
         help="use a teacher whose validation accuracy is within 5 points of chance")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The run directory of ``teacher`` and ``student``, and what to do with one that exists."""
    p.add_argument("--out", help="run directory to write")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its checkpoint, with its own config (flags given must agree)")
    p.add_argument("--extend", action="store_true",
                   help="with a larger --epochs: train a started or finished run on, where its schedule gives the "
                        "epochs it trained the same rates")
    p.add_argument("--force", action="store_true", help="overwrite an existing run")


def _trainer(sub, name: str, help: str, model_key: str):
    p = sub.add_parser(name, help=help)
    _add_config_flags(p)
    _add_data(p)
    _add_training(p, model_key)
    return p


# --- the commands -------------------------------------------------------------------------------

def _teacher_and_student(sub) -> None:
    t = _trainer(sub, "teacher", "train a full-precision teacher", "teacher.model")
    _add_run_flags(t)
    t.set_defaults(func=commands.cmd_teacher)

    s = _trainer(sub, "student", "train a quantized student (Q1-Q4 losses)", "student.model")
    _add_student(s)
    _key(s, "--teacher", key="teacher.run", help="teacher: a run directory, or a TorchScript, .pt2, .onnx or "
         ".npz-of-logits file (README; required except for --loss hard)")
    _add_run_flags(s)
    s.set_defaults(func=commands.cmd_student)


def _study(sub) -> None:
    st = _trainer(sub, "study", "the Q1-Q4 temperature study, then its report", "student.model")
    st.add_argument("config_file", nargs="?", metavar="CONFIG.toml", help="study config (see configs/)")
    _add_student(st)
    _key(st, "--teacher", key="teacher.run", help="reuse this teacher (a run directory or a teacher file) "
         "instead of training one")
    st.add_argument("--out", help="study directory (required, except with --plan)")
    _key(st, "--workers", key="study.workers", type=_at_least_one, help="runs at once, on a local Ray instance")
    _key(st, "--ray", key="study.ray_address", nargs="?", const="local", metavar="ADDRESS", action=_Ray,
         help="runs as Ray tasks (study.executor = ray): alone, a local Ray instance; or join the cluster at "
              "ADDRESS (auto, HOST:PORT, ray://HOST:PORT) made with `ray start`")
    _key(st, "--no-fused", key="study.fused", action="store_const", const=False,
         help="never fuse (\"auto\" fuses on CUDA only)")
    st.add_argument("--force", action="store_true", help="accept a changed config (stale runs are redone)")
    st.add_argument("--plan", action="store_true",
                    help="print the runs, the images they train and the estimated time from a few timed steps "
                         "here (at most about 30 s); write nothing and need no dataset files")
    st.set_defaults(func=commands.cmd_study, **{"study.executor": None})


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _readers(sub) -> None:
    e = sub.add_parser("eval", help="test accuracy, per-class accuracy and confusion matrix of a run")
    e.add_argument("run")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(e)
    _key(e, "--data-dir", key="data.data_dir", help="where the run's data is now: svhn, cifar10, cifar100: the folder "
         "of the official files; imagefolder: ROOT with train/ and test/")
    _key(e, "--data-path", key="data.data_path", help="where the run's .npz file is now")
    _threads_flag(e)
    e.set_defaults(func=commands.cmd_eval)

    r = sub.add_parser("report", help="(re)write the report of a study")
    r.add_argument("study")
    r.add_argument("--replay-race", action="store_true", help="apply the race (study.race_test, first_test, "
                   "max_seeds, confidence from the study's config or --set) to a finished grid study, seed by seed, "
                   "and print what it would have decided; writes nothing")
    r.add_argument("--orders", type=_at_least_one, default=1, metavar="N",
                   help="with --replay-race: also replay in N random seed orders and judge the race against the grid")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="with --replay-race: override the study's race keys (repeatable)")
    r.set_defaults(func=commands.cmd_report)

    d = sub.add_parser("datasets", help="list datasets and whether the SVHN and CIFAR files are present")
    _add_config_flags(d)
    _key(d, "--data-dir", key="data.data_dir", help="svhn, cifar10, cifar100: the folder to look for their official "
         "files in (~/.cache/qdistill/DATASET)")
    d.set_defaults(func=commands.cmd_datasets)


def _deployment(sub) -> None:
    x = sub.add_parser("export", help="write a trained student as a packed .qdz (or ONNX)")
    x.add_argument("run")
    x.add_argument("--out", required=True, help="output file (student.qdz or student.onnx)")
    x.add_argument("--checkpoint", choices=("best", "last"), default="best")
    x.add_argument("--format", choices=("qdz", "onnx"), help="qdz (packed) or onnx (default: from --out's extension)")
    x.set_defaults(func=commands.cmd_export)

    pr = sub.add_parser("predict", help="classify with an exported .qdz (integer engine, no torch)")
    pr.add_argument("model", metavar="MODEL.qdz")
    pr.add_argument("image", nargs="?", metavar="IMAGE|FOLDER",
                    help="an image file (PNG, JPEG, BMP, WebP), or a folder of them (searched recursively: "
                         "a CSV path,index,name,probability); else the test split of --dataset")
    pr.add_argument("--out", metavar="PREDICTIONS.csv",
                    help="with a FOLDER: write its CSV to this file (default: print it)")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    pr.add_argument("--skip-bad-images", action="store_true",
                    help="with a FOLDER: list unreadable images in the CSV with their error instead of stopping")
    _add_config_flags(pr)
    _key(pr, "--dataset", key="data.dataset", choices=DATASETS)
    _key(pr, "--data-dir", key="data.data_dir", help="svhn, cifar10, cifar100: folder of the official files; "
         "imagefolder: ROOT with train/ and test/")
    _key(pr, "--data-path", key="data.data_path", help="the .npz file of the npz dataset")
    _key(pr, "--no-verify", key="data.verify", action="store_const", const=False)
    _key(pr, "--max-test", key="data.max_test", type=int)
    _threads_flag(pr)
    pr.set_defaults(func=commands.cmd_predict)


def _bench(sub) -> None:
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
    b.add_argument("--cluster", action="store_true",
                   help="a 4-run study on a simulated Ray cluster of 1, then 2 nodes x 1 CPU (needs qdistill[ray])")
    b.add_argument("--epochs", type=int, default=8, help="epochs per run for --cluster (default 8)")
    _key(b, "--model", key="student.model", help="time this student's training step alone (W2A1 unless --set "
         "says otherwise), eager and compiled: a registered name or FILE.py:FUNCTION")
    b.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key of the timed student (e.g. student.scheme=lsq)")
    b.set_defaults(func=commands.cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qdistill", description="Distil full-precision teachers into DoReFa low-bit students.")
    p.add_argument("--version", action="version", version=f"qdistill {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_teacher_and_student, _study, _readers, _deployment, _bench):
        add(sub)
    return p
