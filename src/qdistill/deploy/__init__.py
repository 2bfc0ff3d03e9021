"""Torch-free inference of exported students: ``load(path) -> Engine``.

Imports numpy (and numba when installed) only, so a deployment needs neither torch nor
a compiler. See `engine` for the integer pipeline and `qdz` for the file format.
"""
from .engine import Engine, load
from .qdz import FORMAT_VERSION, QdzError

__all__ = ["Engine", "load", "QdzError", "FORMAT_VERSION"]
