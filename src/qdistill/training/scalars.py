"""Each epoch's scalars as TensorBoard event files (``train.tensorboard = true``): one
writer per run directory, its ``events.out.tfevents.*`` beside ``metrics.jsonl``, each
field of a ``metrics.jsonl`` row a scalar tagged with the field's name, at step = epoch.
Off, `Scalars` does nothing and imports nothing.

The writer is torch's ``SummaryWriter``, which needs the optional ``tensorboard`` package
(``pip install 'qdistill[tensorboard]'``).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

FIELDS = ("train_loss", "train_acc", "val_acc", "test_acc", "lr", "img_per_s")
MISSING = "train.tensorboard needs the tensorboard package: pip install 'qdistill[tensorboard]'"


def summary_writer():
    """torch's ``SummaryWriter`` class; a `ConfigError` (one line) without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(MISSING) from None
    return SummaryWriter


class Scalars:
    """The event files of the runs in ``outs`` (one run, or a fused group's members, by
    index). The class is looked up at construction, so a missing package stops a command
    before it trains; member ``j``'s writer opens at the first epoch it is given, with
    ``purge_step`` that epoch: readers (TensorBoard, its ``EventAccumulator``) then drop
    the points an earlier attempt (killed, or started over) wrote at or after it, so a
    resumed run shows one point per epoch."""

    def __init__(self, outs, enabled: bool):
        self._outs = [Path(o) for o in outs]
        self._writer_class = summary_writer() if enabled else None
        self._writers: dict[int, object] = {}

    def write(self, j: int, row: dict) -> None:
        """Member ``j``'s row of ``metrics.jsonl``, flushed to its event file."""
        if self._writer_class is None:
            return
        if j not in self._writers:
            self._writers[j] = self._writer_class(log_dir=str(self._outs[j]), purge_step=row["epoch"])
        w = self._writers[j]
        for key in FIELDS:
            w.add_scalar(key, row[key], row["epoch"])
        w.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
