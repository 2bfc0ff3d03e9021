"""The network layer: quantizer formulas, their autograd nodes, quantized layers, the
model registry, fused groups of students, and the Q1-Q4 losses.

This file stays torch-free: it holds the enumerations this layer owns, so the config
schema can check names without importing torch.
"""

SCHEMES = ("dorefa", "homework")
LOSSES = ("hard", "soft", "hard+soft", "hard+softgt")
