"""Models from code: ``student.model`` / ``teacher.model`` name a registered model,
``FILE.py:FUNCTION`` or ``package.module:FUNCTION``.

The function (a factory) is called with the ``model_args`` table as keyword arguments,
plus ``num_classes`` where it takes it and the table does not set it; it must return a
float ``nn.Module`` mapping ``(N, 3, 32, 32)`` images in [0, 1] to ``(N, classes)``
logits (`build_float` checks it on a batch of two). qdistill quantizes it by the config
(`qdistill.nn.models.build`).

A file's text is kept by its sha256 (`remember`): the config and every checkpoint record
the sha256, checkpoints the text too, so ``eval``, ``export`` and a Ray worker rebuild the
model from the text they were given, without the file. This module imports torch only
inside `build_float`: the config check uses the rest.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import types
from pathlib import Path

from ..errors import UserError

_SOURCES: dict[str, str] = {}  # sha256 -> text of a model file read here or handed over


class ModelError(UserError):
    """A model reference that names no model qdistill can build."""


def is_code(ref: str) -> bool:
    """Whether ``ref`` names a function (``TARGET:FUNCTION``) rather than a registered model."""
    return ":" in ref


def is_file(ref: str) -> bool:
    return is_code(ref) and ref.rsplit(":", 1)[0].endswith(".py")


def _split(ref: str) -> tuple[str, str]:
    target, _, function = ref.rpartition(":")
    if not target or not function.isidentifier():
        raise ModelError(f"model {ref!r}: expected FILE.py:FUNCTION or package.module:FUNCTION")
    return target, function


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def remember(text: str) -> str:
    """Keep a model file's text; returns its sha256."""
    digest = sha256(text)
    _SOURCES[digest] = text
    return digest


def _module_file(name: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as e:
        raise ModelError(f"cannot find model module {name}: {type(e).__name__}: {e}") from None
    if spec is None:
        raise ModelError(f"cannot find model module {name} (is it installed, or on PYTHONPATH?)")
    if not spec.origin or not Path(spec.origin).is_file():
        raise ModelError(f"model module {name} has no source file (origin: {spec.origin}); qdistill keeps "
                         "a model's source with its runs")
    return Path(spec.origin)


def file_of(ref: str) -> Path:
    """The file that defines the factory of a ``FILE.py:FUNCTION`` or module reference."""
    target, _ = _split(ref)
    return Path(target) if is_file(ref) else _module_file(target)


def read(ref: str) -> tuple[str, str]:
    """``(text, sha256)`` of the file behind ``ref``, kept (`remember`)."""
    path = file_of(ref)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelError(f"model file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read model file {path}: {e}") from None
    return text, remember(text)


def source(ref: str, digest: str) -> str:
    """The text of the file ``ref`` names, as it was when its sha256 was ``digest``: kept
    here, or read and checked. `ModelError` if the file has changed since."""
    if digest in _SOURCES:
        return _SOURCES[digest]
    text, now = read(ref)
    if digest and now != digest:
        raise ModelError(f"model file {file_of(ref)} changed since the config recorded it "
                         f"(sha256 {digest[:12]}..., now {now[:12]}...)")
    return text


def _load_file(ref: str, digest: str) -> types.ModuleType:
    text = source(ref, digest)
    name = f"qdistill_model_{sha256(text)[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__file__ = str(file_of(ref))
    sys.modules[name] = module  # dataclasses and pickling look a class's module up here
    try:
        exec(compile(text, module.__file__, "exec"), module.__dict__)
    except Exception as e:
        del sys.modules[name]
        raise ModelError(f"cannot import model file {module.__file__}: {type(e).__name__}: {e}") from None
    return module


def factory(ref: str, digest: str = ""):
    """The function ``ref`` names (file text from `source`, or the module imported)."""
    target, function = _split(ref)
    if is_file(ref):
        module = _load_file(ref, digest)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ModelError(f"cannot import model module {target}: {type(e).__name__}: {e}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ModelError(f"model {ref}: {target} has no function {function}")
    return fn


def _arguments(fn, model_args: dict, num_classes: int) -> dict:
    kwargs = dict(model_args)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if takes and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    return kwargs


def build_float(ref: str, digest: str, model_args: dict, num_classes: int):
    """The float network of a code reference, checked on two black images: an
    ``nn.Module`` giving ``(2, num_classes)`` logits (`ModelError` otherwise)."""
    import torch

    fn = factory(ref, digest)
    try:
        model = fn(**_arguments(fn, model_args, num_classes))
    except Exception as e:
        raise ModelError(f"model factory {ref} raised {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model factory {ref} returned {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(f"model {ref} has no trainable parameter: nothing to train")
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, 3, 32, 32))
    except Exception as e:
        raise ModelError(f"model {ref} fails on a (2, 3, 32, 32) batch: {type(e).__name__}: {e}") from None
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (2, num_classes):
        raise ModelError(f"model {ref} gives {shape} for a (2, 3, 32, 32) batch; qdistill needs "
                         f"(2, {num_classes}) logits")
    return model.train(was)
