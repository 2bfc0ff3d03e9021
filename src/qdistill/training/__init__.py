"""The training layer: the one loop for a teacher, one student or K students, its
optimizer and schedule, teacher targets, evaluation metrics, checkpoints and the run
directory.

This file stays torch-free: it holds the enumerations this layer owns, so the config
schema can check names without importing torch.
"""

from .recipes import RECIPES

SCHEDULES = ("course", "cosine", "linear")
OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("auto", "fp32", "bf16")
ROLES = ("teacher", "student")
# what a teacher path is (`teachers.detect`) and the input a teacher file declares ([teacher])
TEACHER_KINDS = ("run", "torchscript", "export", "onnx", "logits")
TEACHER_RANGES = ("0-1", "0-255")
TEACHER_LAYOUTS = ("NCHW", "NHWC")

# A model within 5 points of chance (1/K for K classes) learned nothing usable: a teacher
# that close is refused, and the report lists the students that end there.
CHANCE_MARGIN = 0.05


def near_chance(accuracy: float, num_classes: int) -> bool:
    """``accuracy <= 1/K + CHANCE_MARGIN``."""
    return accuracy <= 1 / num_classes + CHANCE_MARGIN
