"""The network layer: quantizer formulas, their autograd nodes, quantized layers, the
model registry, fused groups of students, and the Q1-Q4 losses.

This file stays torch-free: it holds the enumerations this layer owns, so the config
schema can check names without importing torch.
"""

SCHEMES = ("dorefa", "homework", "lsq")
"""The quantization schemes (`qdistill.nn.schemes` holds one object each)."""
MIN_WEIGHT_BITS = {"lsq": 2}
"""Weight bits below which a scheme has no levels (others: 1)."""
MODELS = ("dorefa-svhn", "resnet20", "vgg7", "vgg7-wide")
"""The registered models (`qdistill.nn.models`); ``FILE.py:FUNCTION`` and
``package.module:FUNCTION`` name a user's own (`qdistill.nn.reference`)."""
FLAT_MODELS = ("dorefa-svhn", "vgg7", "vgg7-wide")
"""The models a fused group can hold (`qdistill.nn.fused`: flat ``nn.Sequential`` stacks)."""
PACKED_MAX_BITS = 4
"""Weight and activation bits the packed ``.qdz`` format holds: 1..PACKED_MAX_BITS."""
LOSSES = ("hard", "soft", "hard+soft", "hard+softgt")
KD_TERMS = ("kl", "dkd", "ls", "dist")
"""The teacher terms of Q2 and Q3 (`qdistill.nn.losses`): ``kl`` Hinton et al. 2015,
``dkd`` Zhao et al. CVPR 2022, ``ls`` Sun et al. CVPR 2024, ``dist`` Huang et al. NeurIPS 2022."""
KD_DEFAULTS = {"dkd_alpha": 1.0, "dkd_beta": 8.0, "dist_beta": 1.0, "dist_gamma": 1.0}
"""The weights inside the terms, as their papers set them (DKD's beta is 8 on CIFAR-100)."""


def packing_note(weight_bits: int, act_bits: int) -> str | None:
    """A student these bits train for but `qdistill export` cannot pack, said when it
    starts to train; None where it can."""
    if weight_bits <= PACKED_MAX_BITS and act_bits <= PACKED_MAX_BITS:
        return None
    return (f"a W{weight_bits}A{act_bits} student trains, but `qdistill export` packs 1..{PACKED_MAX_BITS}-bit "
            f"weights and activations only; `qdistill export --out student.onnx` exports it")


def scheme_bits_error(scheme: str, weight_bits: int, act_bits: int) -> str | None:
    """The config check's message when ``scheme`` cannot quantize to these bits, else
    ``None``. LSQ's signed weight grid ``-2**(b-1) .. 2**(b-1) - 1`` is ``{-1, 0}`` at one
    bit: no positive level (and ``Q_P = 0`` would divide its step's initialisation by 0)."""
    low = MIN_WEIGHT_BITS.get(scheme, 1)
    if weight_bits < low:
        return f"student.scheme {scheme} needs weight_bits >= {low} (1 bit leaves no signed levels), got {weight_bits}"
    return None
