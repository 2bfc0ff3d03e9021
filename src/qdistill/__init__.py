"""qdistill: distil full-precision teachers into DoReFa low-bit students.

The Python API, for your own training loop (each name is documented where it lives):

* `quantize` (`qdistill.nn.quantize`): a float network made a quantized student;
* `build_model` (`qdistill.nn.models.build`): a registered model (``vgg7``, ``resnet20``,
  ...) or ``FILE.py:FUNCTION``, quantized to the bits you give;
* `build_loss` and `Loss` (`qdistill.nn.losses`): the Q1-Q4 losses with the teacher terms
  ``kl``, ``dkd``, ``ls``, ``dist`` (the terms themselves: `qdistill.nn.losses.__all__`);
* `scheme` (`qdistill.nn.schemes.get`): the ``dorefa``, ``homework`` and ``lsq`` scheme
  objects; the layers `QuantConv2d`, `QuantLinear`, `QuantAct`.

They load lazily (PEP 562), so ``import qdistill.config`` needs no torch.
"""
__version__ = "0.1.0"

_API = {
    "quantize": ("qdistill.nn.quantize", "quantize"),
    "build_model": ("qdistill.nn.models", "build"),
    "build_loss": ("qdistill.nn.losses", "build_loss"),
    "Loss": ("qdistill.nn.losses", "Loss"),
    "scheme": ("qdistill.nn.schemes", "get"),
    "QuantConv2d": ("qdistill.nn.layers", "QuantConv2d"),
    "QuantLinear": ("qdistill.nn.layers", "QuantLinear"),
    "QuantAct": ("qdistill.nn.layers", "QuantAct"),
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'qdistill' has no attribute {name!r}")
    import importlib
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)


def __dir__():
    return sorted([*globals(), *__all__])
