"""The command line's parser: every command, its flags and their help."""
from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..data import AUGMENTS, DATASETS
from ..nn import LOSSES, SCHEMES
from ..training import PRECISIONS, SCHEDULES
from . import commands


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
    g.add_argument("--data-dir", help="svhn, cifar10, cifar100: folder of the official files (default "
                   "~/.cache/qdistill/DATASET); imagefolder: ROOT with train/<class>/ and test/<class>/")
    g.add_argument("--data-path", help="the .npz file of the npz dataset")
    g.add_argument("--extra", action="store_true", default=None, help="svhn: add extra_32x32.mat to train")
    g.add_argument("--no-verify", action="store_false", dest="verify", default=None,
                   help="svhn, cifar10, cifar100: accept files that are not the official ones (skip md5)")
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
    g.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write each epoch's scalars as TensorBoard event files in the run directory "
                        "(pip install 'qdistill[tensorboard]')")
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
    g.add_argument("--allow-weak-teacher", action="store_true",
                   help="use a teacher whose validation accuracy is within 5 points of chance")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The run directory of ``teacher`` and ``student``, and what to do with one that exists."""
    p.add_argument("--out", help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite an existing run")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qdistill", description="Distil full-precision teachers into DoReFa low-bit students.")
    p.add_argument("--version", action="version", version=f"qdistill {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("teacher", help="train a full-precision teacher")
    _add_common(t, model_help="teacher architecture (default vgg7)")
    _add_run_flags(t)
    t.set_defaults(func=commands.cmd_teacher)

    s = sub.add_parser("student", help="train a quantized student (Q1-Q4 losses)")
    _add_common(s, model_help="student architecture (default vgg7)")
    _add_student_flags(s)
    s.add_argument("--teacher", help="teacher: a run directory, or a TorchScript, .pt2, .onnx or .npz-of-logits "
                                     "file (README; required except for --loss hard)")
    _add_run_flags(s)
    s.set_defaults(func=commands.cmd_student)

    e = sub.add_parser("eval", help="test accuracy, per-class accuracy and confusion matrix of a run")
    e.add_argument("run")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(e)
    e.add_argument("--data-dir", help="where the run's SVHN files are now")
    e.add_argument("--data-path", help="where the run's .npz file is now")
    e.set_defaults(func=commands.cmd_eval)

    st = sub.add_parser("study", help="the Q1-Q4 temperature study, then its report")
    st.add_argument("config_file", nargs="?", metavar="CONFIG.toml", help="study config (see configs/)")
    _add_common(st, model_help="student architecture (default vgg7)")
    _add_student_flags(st)
    st.add_argument("--teacher", help="reuse this teacher (a run directory or a teacher file) instead of "
                                      "training one")
    st.add_argument("--out", required=True, help="study directory")
    st.add_argument("--workers", type=int, help="runs at once, on a local Ray instance (study.workers)")
    st.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="runs as Ray tasks: alone, a local Ray instance; or join the cluster at ADDRESS "
                         "(auto, HOST:PORT, ray://HOST:PORT) made with `ray start` (study.executor, study.ray_address)")
    st.add_argument("--no-fused", action="store_true", help="never fuse (study.fused = \"auto\" fuses on CUDA only)")
    st.add_argument("--force", action="store_true", help="accept a changed config (stale runs are redone)")
    st.set_defaults(func=commands.cmd_study)

    r = sub.add_parser("report", help="(re)write the report of a study")
    r.add_argument("study")
    r.set_defaults(func=commands.cmd_report)

    x = sub.add_parser("export", help="write a trained student as a packed .qdz (or ONNX)")
    x.add_argument("run")
    x.add_argument("--out", required=True, help="output file (student.qdz or student.onnx)")
    x.add_argument("--checkpoint", choices=("best", "last"), default="best")
    x.add_argument("--format", choices=("qdz", "onnx"), default="qdz")
    x.set_defaults(func=commands.cmd_export)

    pr = sub.add_parser("predict", help="classify with an exported .qdz (integer engine, no torch)")
    pr.add_argument("model", metavar="MODEL.qdz")
    pr.add_argument("image", nargs="?", metavar="IMAGE|FOLDER",
                    help="an image file (PNG, JPEG, BMP, WebP), or a folder of them (searched recursively: "
                         "a CSV path,label,class,confidence); else the test split of --dataset")
    pr.add_argument("--out", metavar="PREDICTIONS.csv",
                    help="with a FOLDER: write its CSV to this file (default: print it)")
    pr.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(pr)
    pr.add_argument("--dataset", choices=DATASETS)
    pr.add_argument("--data-dir")
    pr.add_argument("--data-path")
    pr.add_argument("--no-verify", action="store_false", dest="verify", default=None)
    pr.add_argument("--max-test", type=int)
    pr.set_defaults(func=commands.cmd_predict)

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
    b.set_defaults(func=commands.cmd_bench)

    d = sub.add_parser("datasets", help="list datasets and whether the SVHN files are present")
    _add_config_flags(d)
    d.add_argument("--data-dir", help="folder of the SVHN .mat files (default ~/.cache/qdistill/svhn)")
    d.set_defaults(func=commands.cmd_datasets)
    return p


