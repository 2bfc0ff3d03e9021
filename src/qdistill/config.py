"""The config schema every command shares: defaults, TOML files, overrides, checks.

A config is a plain ``dict`` of sections (``data``, ``teacher``, ``student``, ``train``,
``study``, ``run``). Layers, last wins: defaults < ``--config FILE.toml`` < command-line
flags < ``--set section.key=value`` (`qdistill.resolve` applies them). Every error is a
`ConfigError` naming the key. This module checks types and ranges; the names a key may
take (datasets, schemes, losses, ...) belong to the layers that define them and are
checked by `qdistill.resolve`. Torch-free.
"""
from __future__ import annotations

import copy
import math
import os
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

from .errors import ConfigError

DEFAULTS: dict[str, dict] = {
    "data": {
        "dataset": "digits",          # svhn, digits, npz, fake, imagefolder, cifar10, cifar100
        "data_dir": "~/.cache/qdistill/svhn",
        "data_path": "",              # the .npz of the npz dataset
        "extra": False,               # svhn: add extra_32x32.mat to train
        "augment": "none",            # none, light
        "val_fraction": 0.05,
        "verify": True,               # svhn: md5-check the official files
        "max_train": 0,               # keep the first N train images (0: all)
        "max_test": 0,                # keep the first N test images (0: all)
        "skip_bad_images": False,     # imagefolder: leave unreadable images out (counted) instead of failing
    },
    "teacher": {
        "run": "",                    # an existing teacher run to reuse, or a teacher file
        "model": "vgg7",              # a registered model, FILE.py:FUNCTION or package.module:FUNCTION
        # "model_args": absent means {}: keyword arguments of a FUNCTION model
        # "model_sha256": written by qdistill for a FILE.py model: the sha256 of its text
        # the input a teacher file expects (a qdistill run takes the defaults)
        "input_range": "0-1",         # 0-1, 0-255
        "mean": [],                   # per channel, subtracted after input_range (empty: none)
        "std": [],                    # per channel, divided by after mean (empty: none)
        "layout": "NCHW",             # NCHW, NHWC
        "input_size": 0,              # 0: 32; else bilinear resize to input_size x input_size
    },
    "student": {
        "model": "vgg7",              # vgg7, vgg7-wide, dorefa-svhn, resnet20, FILE.py:FUNCTION or package.module:FUNCTION
        # "model_args", "model_sha256": as in [teacher]
        "weight_bits": 2,
        "act_bits": 1,
        "grad_bits": 32,
        "scheme": "dorefa",           # dorefa, homework, lsq
        "quantize_first_last": False,
        "loss": "hard",               # hard, soft, hard+soft, hard+softgt
        "temperature": 4.0,
        # "c": absent means T**2 (config.default_c)
        "omit_class": -1,             # K >= 0: leave class K out of the student's training (the unseen-class probe)
        "kd": "kl",                   # the teacher term of Q2 and Q3: kl, dkd, ls, dist
        "dkd_alpha": 1.0,             # dkd: weight of the target-class term
        "dkd_beta": 8.0,              # dkd: weight of the non-target-class term
        "dist_beta": 1.0,             # dist: weight of the within-image correlation term
        "dist_gamma": 1.0,            # dist: weight of the within-class correlation term
        "kd_warmup": 0,               # epochs over which the teacher term's weight ramps up linearly from 0
    },
    "train": {
        "recipe": "fast",             # fast, course: a bundle of the keys below, which override it (`training.recipes`)
        "epochs": 60,
        "batch_size": 64,             # the recipe's
        "optimizer": "adam",          # the recipe's: adam, sgd (Nesterov, momentum 0.9)
        "lr": 0.01,                   # the recipe's peak learning rate
        "schedule": "linear",         # the recipe's: course (x0.1 at 25%, x0.05 at 67%, never in epoch 1), cosine, linear
        "warmup": 0.23,               # the recipe's; linear: the fraction of the steps that ramp up to the peak
        "weight_decay": 0.0,          # the recipe's
        "ema": 0.0,                   # the recipe's: decay of the weight average that is evaluated and kept (0: none)
        "compile": "auto",            # torch.compile the training step: auto (long runs), true, false
        "seed": 0,
        "device": "auto",             # auto, cpu, cuda, cuda:N, mps
        "precision": "auto",          # auto (bf16 autocast on CUDA, fp32 elsewhere), fp32, bf16
        "tensorboard": False,         # also write each epoch's scalars as TensorBoard event files
        "threads": 0,                 # torch's intra-op CPU threads (0: torch's default, or the study's cpus_per_run)
        "deterministic": True,        # CUDA: deterministic cuDNN and algorithms (CPU kernels are anyway)
    },
    "study": {
        "temperatures": [1.0, 2.0, 4.0, 8.0, 15.0],
        # "c": absent means T**2 (config.default_c)
        "seeds": [0, 1, 2],
        "questions": ["q1", "q2", "q3", "q4"],
        "kd": ["kl"],                 # the teacher terms Q2 and Q3 sweep (each x T x seeds)
        "teacher_epochs": 0,          # 0: train.epochs
        "fused": "auto",              # auto (fused groups on CUDA, one run at a time elsewhere), true, false
        "workers": 0,                 # runs at once on a local Ray instance (0 or 1: one by one, in this process)
        "executor": "local",          # local (this process), ray (Ray tasks: --ray [ADDRESS])
        "ray_address": "",            # "" or "local": start a local Ray instance; auto, HOST:PORT, ray://HOST:PORT
        "cpus_per_run": 0,            # CPUs (and torch threads) per Ray task; 0: CPUs / workers, or 1 on a cluster
        "gpus_per_run": "auto",       # GPUs per Ray task: auto (none without GPUs; with --workers N, min(1, GPUs / N); else 1) or a number
        "retries": 3,                 # Ray: resubmissions of a run whose worker or node died
        "allow_weak_teacher": False,  # use a teacher within 5 points of chance (--allow-weak-teacher)
        "search": "grid",             # grid (every seed of every arm), race (seeds added until a question is decided)
        "max_seeds": 0,               # race: the seeds an arm may run (0: those listed; more count on from the last)
        "first_test": 4,              # race: the seeds run before the first test
        "confidence": 0.95,           # race: the tests' level
        "race_test": "friedman",      # race: friedman (Conover's difference; Wilcoxon for two arms), t-holm
    },
    "run": {
        "role": "student",            # teacher, student (written by the command)
    },
}
OPTIONAL = {("student", "c"), ("study", "c"), ("student", "model_args"), ("teacher", "model_args"),
            ("student", "model_sha256"), ("teacher", "model_sha256")}
"""Keys absent by default: a config that does not use them reads and writes as before."""


def defaults() -> dict:
    return copy.deepcopy(DEFAULTS)


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def merge(cfg: dict, override: dict, origin: str = "config") -> dict:
    """Merge ``override`` into ``cfg`` in place, refusing unknown sections and keys."""
    for section, values in override.items():
        if section not in DEFAULTS:
            raise ConfigError(f"{origin}: unknown section [{section}]; known: {', '.join(DEFAULTS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        for key, value in values.items():
            if key not in DEFAULTS[section] and (section, key) not in OPTIONAL:
                known = sorted(set(DEFAULTS[section]) | {k for s, k in OPTIONAL if s == section})
                raise ConfigError(f"{origin}: unknown key {section}.{key}; known: {', '.join(known)}")
            cfg[section][key] = value
    return cfg


def parse_set(item: str) -> dict:
    """``section.key=value`` -> ``{section: {key: value}}``; the value is read as TOML
    (numbers, booleans, lists), falling back to a plain string."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, raw = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return {section: {key: value}}


def _type_check(cfg: dict) -> None:
    for section, values in DEFAULTS.items():
        for key, default in values.items():
            value = cfg[section][key]
            where = f"{section}.{key}"
            if (section, key) == ("study", "fused"):
                if not (isinstance(value, bool) or value == "auto"):
                    raise ConfigError(f'{where} must be true, false or "auto", got {value!r}')
            elif (section, key) == ("train", "compile"):
                if not (isinstance(value, bool) or value == "auto"):
                    raise ConfigError(f'{where} must be true, false or "auto", got {value!r}')
            elif (section, key) == ("study", "gpus_per_run"):
                if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                        or not 0 <= value < math.inf or (value > 1 and value != int(value))):
                    raise ConfigError(f'{where} must be "auto", a fraction of one GPU (0 to 1) or a whole number of '
                                      f'GPUs, got {value!r}')
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ConfigError(f"{where} must be true or false, got {value!r}")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"{where} must be an integer, got {value!r}")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{where} must be a number, got {value!r}")
                cfg[section][key] = float(value)
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise ConfigError(f"{where} must be a string, got {value!r}")
            elif isinstance(default, list):
                if not isinstance(value, list) or (not value and default):
                    raise ConfigError(f"{where} must be a {'non-empty ' if default else ''}list, got {value!r}")


def check_choice(cfg: dict, section: str, key: str, choices) -> None:
    if cfg[section][key] not in choices:
        raise ConfigError(f"{section}.{key} must be one of {', '.join(choices)}, got {cfg[section][key]!r}")


def _bits(cfg, section, key):
    b = cfg[section][key]
    if not (1 <= b <= 8 or b == 32):
        raise ConfigError(f"{section}.{key} must be 1..8 or 32, got {b}")


def _positive_number(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where} must be a number > 0, got {value!r}")
    return float(value)


def check(cfg: dict) -> dict:
    """Check every value's type and range; fill ``student.c`` (T**2 when absent).
    Returns ``cfg``."""
    _type_check(cfg)
    for key in ("weight_bits", "act_bits", "grad_bits"):
        _bits(cfg, "student", key)
    if not 0.0 <= cfg["data"]["val_fraction"] < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg['data']['val_fraction']}")
    for key in ("max_train", "max_test"):
        if cfg["data"][key] < 0:
            raise ConfigError(f"data.{key} must be >= 0, got {cfg['data'][key]}")
    if cfg["data"]["dataset"] == "npz" and not cfg["data"]["data_path"]:
        raise ConfigError("dataset npz needs data.data_path (--data-path FILE.npz)")
    t = cfg["train"]
    if t["epochs"] < 1:
        raise ConfigError(f"train.epochs must be >= 1, got {t['epochs']}")
    if t["batch_size"] < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {t['batch_size']}")
    _positive_number(t["lr"], "train.lr")
    if t["threads"] < 0:
        raise ConfigError(f"train.threads must be >= 0 (0: torch's default), got {t['threads']}")
    if t["weight_decay"] < 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {t['weight_decay']}")
    for key in ("warmup", "ema"):
        if not 0 <= t[key] < 1:
            raise ConfigError(f"train.{key} must be in [0, 1), got {t[key]}")
    _check_student(cfg["student"], t["epochs"])
    _check_study(cfg["study"])
    _check_teacher_input(cfg["teacher"])
    for section in ("teacher", "student"):
        if not isinstance(cfg[section].get("model_args", {}), dict):
            raise ConfigError(f"{section}.model_args must be a table, got {cfg[section]['model_args']!r}")
    return cfg


def _check_student(s: dict, epochs: int) -> None:
    """``[student]``: ranges, ``c`` filled in, and no setting that would do nothing."""
    s["temperature"] = _positive_number(s["temperature"], "student.temperature")
    if "c" in s:
        if isinstance(s["c"], bool) or not isinstance(s["c"], (int, float)) or not 0 <= s["c"] < math.inf:
            raise ConfigError(f"student.c must be a number >= 0, got {s['c']!r}")
        s["c"] = float(s["c"])
    for key in ("dkd_alpha", "dkd_beta", "dist_beta", "dist_gamma", "kd_warmup"):
        if not 0 <= s[key] < math.inf:
            raise ConfigError(f"student.{key} must be a finite number >= 0, got {s[key]}")
    if s["omit_class"] < -1:
        raise ConfigError(f"student.omit_class must be -1 (none) or a class index >= 0, got {s['omit_class']}")
    if s["loss"] in ("hard+soft", "hard+softgt") and "c" not in s:
        s["c"] = default_c(s["temperature"])  # written out, so a run's config says what it used
    if s["kd"] != "kl" and s["loss"] in ("hard", "hard+softgt"):
        raise ConfigError(f"student.kd {s['kd']} does nothing with loss {s['loss']}: the teacher term enters "
                          f"the soft and hard+soft losses only")
    if s["loss"] != "hard" and s["kd_warmup"] > epochs:
        raise ConfigError(f"student.kd_warmup {s['kd_warmup']:g} is longer than train.epochs {epochs}: the soft term "
                          f"would never reach its full weight")


def _check_study(st: dict) -> None:
    st["temperatures"] = [_positive_number(v, "study.temperatures[]") for v in st["temperatures"]]
    for seed in st["seeds"]:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"study.seeds must be integers >= 0, got {seed!r}")
    for key in ("temperatures", "seeds", "questions", "kd"):
        _no_repeats(st[key], f"study.{key}")
    if "c" in st:
        if isinstance(st["c"], bool) or not isinstance(st["c"], (int, float)) or not 0 <= st["c"] < math.inf:
            raise ConfigError(f"study.c must be a number >= 0, got {st['c']!r}")
    for key in ("teacher_epochs", "workers", "cpus_per_run", "retries", "max_seeds"):
        if st[key] < 0:
            raise ConfigError(f"study.{key} must be >= 0, got {st[key]}")
    if st["first_test"] < 2 or not 0 < st["confidence"] < 1:
        raise ConfigError(f"study.first_test must be >= 2 (a test needs two seeds) and study.confidence in (0, 1), "
                          f"got {st['first_test']} and {st['confidence']!r}")
    if st["search"] == "race" and (st["max_seeds"] or len(st["seeds"])) < st["first_test"]:
        raise ConfigError(f"study.max_seeds {st['max_seeds'] or len(st['seeds'])} is below study.first_test "
                          f"{st['first_test']}: the race would never test")


def _no_repeats(values: list, key: str) -> None:
    """A study list names each value once: a repeat would train the same run twice into one folder."""
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(f"{key} lists {_toml_value(v)} twice; give each value once")
        seen.add(v)


def _check_teacher_input(t: dict) -> None:
    """``[teacher]`` mean and std: 0, 1 or 3 (one per channel) finite numbers, std > 0;
    input_size 0 (32) or a size in pixels."""
    for key in ("mean", "std"):
        values = t[key]
        if len(values) not in (0, 1, 3) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                               or not math.isfinite(v) for v in values):
            raise ConfigError(f"teacher.{key} must be [] or 1 or 3 finite numbers (one per channel), got {values!r}")
        t[key] = [float(v) for v in values]
    if any(v <= 0 for v in t["std"]):
        raise ConfigError(f"teacher.std must be > 0, got {t['std']!r}")
    if not 0 <= t["input_size"] <= 1024:
        raise ConfigError(f"teacher.input_size must be 0 (32) or 1..1024 pixels, got {t['input_size']}")


PATH_KEYS = (("data", "data_dir"), ("data", "data_path"), ("teacher", "run"))


def absolute_paths(cfg: dict) -> dict:
    """Every path key made absolute (``~`` expanded, against the current folder), so a
    stored config means the same files from any folder; empty paths stay empty."""
    for section, key in PATH_KEYS:
        if cfg[section][key]:
            cfg[section][key] = os.path.abspath(os.path.expanduser(cfg[section][key]))
    return cfg


def default_c(temperature: float) -> float:
    """The weight ``c`` of the soft term when none is given: ``T**2`` (why: `qdistill.nn.losses`).
    The one place this default lives; the losses, the config and the study grid read it."""
    return float(temperature) * float(temperature)


def loss_c(student: dict) -> float:
    """The weight c of the soft term: ``student.c`` or `default_c`."""
    return float(student["c"]) if "c" in student else default_c(student["temperature"])


def differences(old: dict, new: dict, limit: int = 3) -> list[str]:
    """The keys whose values differ between two configs, each as ``section.key: old ->
    new`` in schema order (a key one config lacks shows as ``(none)``); at most ``limit``,
    then how many more."""
    keys = [(sec, k) for sec in DEFAULTS for k in dict.fromkeys([*DEFAULTS[sec], *old.get(sec, {}), *new.get(sec, {})])]
    missing = "(none)"
    out = [f"{sec}.{k}: {_shown(old.get(sec, {}).get(k, missing))} -> {_shown(new.get(sec, {}).get(k, missing))}"
           for sec, k in keys if old.get(sec, {}).get(k, missing) != new.get(sec, {}).get(k, missing)]
    return out[:limit] + ([f"and {len(out) - limit} more"] if len(out) > limit else [])


def _shown(v) -> str:
    return v if v == "(none)" else _toml_value(v)


def without_loss(cfg: dict) -> dict:
    """A copy of ``cfg`` without ``student.loss``, ``temperature``, ``c`` and the teacher
    term's settings: what the members of one fused group share (each member has its own
    loss)."""
    cfg = copy.deepcopy(cfg)
    for key in ("loss", "temperature", "c", "kd", "dkd_alpha", "dkd_beta", "dist_beta", "dist_gamma", "kd_warmup"):
        cfg["student"].pop(key, None)
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(str(k))


RUN_SECTIONS = ("data", "teacher", "student", "train", "run")


def run_text(cfg: dict) -> str:
    """The config of one run as written to ``RUN/config.toml`` (no ``[study]``)."""
    return dumps(cfg, RUN_SECTIONS)


def dumps(cfg: dict, sections=None) -> str:
    """The config as TOML text, sections and keys in schema order."""
    out = []
    for section in sections or DEFAULTS:
        if section not in cfg:
            continue
        out.append(f"[{section}]")
        keys = list(DEFAULTS[section]) + [k for k in cfg[section] if k not in DEFAULTS[section]]
        for key in keys:
            if key in cfg[section]:
                out.append(f"{key} = {_toml_value(cfg[section][key])}")
        out.append("")
    return "\n".join(out)
