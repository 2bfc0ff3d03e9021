"""The training layer: the one loop for a teacher, one student or K students, its
optimizer and schedule, teacher targets, evaluation metrics, checkpoints and the run
directory.

This file stays torch-free: it holds the enumerations this layer owns, so the config
schema can check names without importing torch.
"""

SCHEDULES = ("course", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
ROLES = ("teacher", "student")
# what a teacher path is (`teachers.detect`) and the input a teacher file declares ([teacher])
TEACHER_KINDS = ("run", "torchscript", "export", "onnx", "logits")
TEACHER_RANGES = ("0-1", "0-255")
TEACHER_LAYOUTS = ("NCHW", "NHWC")
