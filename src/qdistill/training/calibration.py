"""How a classifier's probabilities fit its mistakes: expected calibration error and
negative log-likelihood, and the unseen-class probe's numbers. numpy only (float64), so
the loop writes them and the report recomputes them from ``test_logits.npy`` with the
same code."""
from __future__ import annotations

import numpy as np

ECE_BINS = 15


def log_softmax(logits) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits, labels) -> float:
    """Negative log-likelihood, ``-mean_i log softmax(z_i)[y_i]`` (nats)."""
    labels = np.asarray(labels)
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


def ece(logits, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error (Guo et al. 2017, eq. 3) over ``bins`` equal-width bins
    of confidence ``c_i = max_k softmax(z_i)_k``: bin ``b`` holds the images with ``c_i`` in
    ``((b - 1) / B, b / B]``, and ``ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|`` with
    ``acc`` the fraction of correct top-1 predictions and ``conf`` the mean confidence of
    the bin (empty bins contribute nothing)."""
    labels = np.asarray(labels)
    p = np.exp(log_softmax(logits))
    conf, correct = p.max(axis=1), (p.argmax(axis=1) == labels)
    which = np.clip(np.ceil(conf * bins).astype(int), 1, bins)  # c in ((b-1)/B, b/B] -> b
    total = 0.0
    for b in range(1, bins + 1):
        in_bin = which == b
        if in_bin.any():
            total += in_bin.sum() / len(labels) * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def class_rank(logits, k: int) -> np.ndarray:
    """Per image, the rank of class ``k`` among its logits: 1 + the number of classes with
    a strictly larger logit (1 is best)."""
    z = np.asarray(logits, dtype=np.float64)
    return 1 + (z > z[:, [k]]).sum(axis=1)


def bias_for_rate(logits, k: int, rate: float) -> float:
    """The shift ``b`` added to class ``k``'s logit after which the fraction of images
    whose top class is ``k`` is as close as possible to ``rate``: image ``i`` turns to ``k``
    once ``b > m_i = max_{j != k} z_ij - z_ik``, so ``b`` is the midpoint between the
    ``n_k``-th and the next smallest margin, ``n_k = round(rate * n)`` (0 when already
    enough images pick ``k``)."""
    z = np.asarray(logits, dtype=np.float64)
    others = np.delete(z, k, axis=1).max(axis=1)
    margins = np.sort(others - z[:, k])
    n_k = int(round(rate * len(z)))
    if n_k <= int((margins < 0).sum()):
        return 0.0
    upper = margins[n_k] if n_k < len(margins) else margins[-1] + 1.0
    return float((margins[n_k - 1] + upper) / 2)
