"""The one config resolution path every command takes: defaults < a base config (a
run's own, or a teacher's data) < ``--config FILE.toml`` < flags < ``--set``, then every
check. The names a key may take come from the layer that defines them."""
from __future__ import annotations

import os

from . import config as configlib
from .data import AUGMENTS, DATASETS
from .errors import ConfigError
from .nn import FLAT_MODELS, KD_TERMS, LOSSES, MODELS, SCHEMES, reference, scheme_bits_error
from .study import EXECUTORS, QUESTIONS, RACE_TESTS, SEARCHES
from .training import OPTIMIZERS, PRECISIONS, RECIPES, ROLES, SCHEDULES, TEACHER_LAYOUTS, TEACHER_RANGES

CHOICES = {("data", "dataset"): DATASETS, ("data", "augment"): AUGMENTS, ("student", "scheme"): SCHEMES,
           ("student", "loss"): LOSSES, ("train", "schedule"): SCHEDULES, ("train", "precision"): PRECISIONS,
           ("run", "role"): ROLES, ("student", "kd"): KD_TERMS, ("teacher", "input_range"): TEACHER_RANGES,
           ("teacher", "layout"): TEACHER_LAYOUTS, ("study", "executor"): EXECUTORS, ("study", "search"): SEARCHES,
           ("study", "race_test"): RACE_TESTS, ("train", "recipe"): RECIPES,
           ("train", "optimizer"): OPTIMIZERS}


def flags_config(args) -> dict:
    """The config keys that parsed command-line flags (``args``) set, as a partial
    config: every flag that sets a key stores it under its dotted name (`cli.parser`)."""
    out: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".", 1)
            out.setdefault(section, {})[key] = value
    return out


def validate(cfg: dict) -> dict:
    """`qdistill.config.check` plus every enumerated key; returns ``cfg``."""
    configlib.check(cfg)
    for (section, key), choices in CHOICES.items():
        configlib.check_choice(cfg, section, key, choices)
    for q in cfg["study"]["questions"]:
        if q not in QUESTIONS:
            raise ConfigError(f"study.questions: unknown question {q!r}; known: {', '.join(QUESTIONS)}")
    for kd in cfg["study"]["kd"]:
        if kd not in KD_TERMS:
            raise ConfigError(f"study.kd: unknown distillation term {kd!r}; known: {', '.join(KD_TERMS)}")
    s = cfg["student"]
    error = scheme_bits_error(s["scheme"], s["weight_bits"], s["act_bits"])
    if error:
        raise ConfigError(error)
    if cfg["study"]["fused"] is True and s["model"] not in FLAT_MODELS:
        raise ConfigError(f"study.fused = true: fused groups hold flat networks only ({', '.join(FLAT_MODELS)}), "
                          f"not {s['model']}; use fused = \"auto\" (one run at a time) or false")
    for section in ("teacher", "student"):
        try:
            check_model(cfg[section], section)
        except reference.ModelError as e:
            raise ConfigError(f"{section}.model: {e}") from None
    return cfg


def check_model(sec: dict, section: str) -> None:
    """``SECTION.model``: a registered name, or code (`qdistill.nn.reference`); a file is
    made absolute and its sha256 recorded in ``model_sha256``."""
    ref = sec["model"]
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{section}.model must be a model name or FILE.py:FUNCTION, got {ref!r}")
    if not reference.is_code(ref):
        if ref not in MODELS:
            raise ConfigError(f"{section}.model: unknown model {ref!r}; registered: {', '.join(MODELS)}; "
                              "or your own as FILE.py:FUNCTION or package.module:FUNCTION")
        return
    if reference.is_file(ref):
        target, function = ref.rsplit(":", 1)
        sec["model"] = ref = f"{os.path.abspath(os.path.expanduser(target))}:{function}"
        if os.path.exists(target) or not sec.get("model_sha256"):
            sec["model_sha256"] = reference.read(ref)[1]
        # else a run's own config whose file is gone: eval and export rebuild from the
        # checkpoint's copy; training it again would need the file (`reference.source`)
    else:
        reference.file_of(ref)  # the module can be found (it is imported when built)


def resolve(config_file=None, flags: dict | None = None, sets=(), *, base: dict | None = None,
            base_origin: str = "base config", role: str | None = None, check: bool = True) -> dict:
    """The config: defaults, then ``base``, the file, ``flags`` and the ``--set`` items,
    each overriding the last; ``role`` sets ``run.role``; validated unless ``check`` is
    false (a first look, e.g. for the teacher whose data a student inherits). The recipe
    that the last layer names lies between the defaults and the layers."""
    layers = [(base, base_origin)] if base else []
    if config_file:
        layers.append((configlib.read_toml(config_file), str(config_file)))
    if flags:
        layers.append((flags, "command line"))
    layers += [(configlib.parse_set(item), f"--set {item}") for item in sets]
    cfg = configlib.defaults()
    for layer, origin in layers:  # first find the recipe: the last layer that names one
        configlib.merge(cfg, layer, origin=origin)
    if not isinstance(cfg["train"]["recipe"], str) or cfg["train"]["recipe"] not in RECIPES:
        raise ConfigError(f"train.recipe must be one of {', '.join(RECIPES)}, got {cfg['train']['recipe']!r}")
    cfg = configlib.merge(configlib.defaults(), {"train": RECIPES[cfg["train"]["recipe"]]}, origin="recipe")
    for layer, origin in layers:
        configlib.merge(cfg, layer, origin=origin)
    if role:
        cfg["run"]["role"] = role
    return configlib.absolute_paths(validate(cfg)) if check else cfg
