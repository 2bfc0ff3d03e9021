"""Datasets, validation split, batching and augmentation.

Every dataset arrives as a `Dataset` of uint8 ``(N, 3, 32, 32)`` images and int64 labels
held in memory; `qdistill.data.batching` slices them and scales to [0, 1] on the fly;
`qdistill.data.registry` loads one by name.

* ``svhn``   official format-2 .mat files in ``data_dir`` (downloaded when missing)
* ``digits`` scikit-learn's bundled 8x8 digits at 32x32x3 (offline)
* ``npz``    the user's ``data_path`` .npz
* ``fake``   random images with SVHN's sizes, for benchmarks
* ``imagefolder`` the user's ``data_dir`` with ``train/<class>/*`` and ``test/<class>/*`` images
* ``cifar10``, ``cifar100`` the official python archives in ``data_dir`` (downloaded when missing)

This file stays torch-free: it holds the enumerations this layer owns, so the config
schema can check names without importing torch.
"""

DATASETS = ("svhn", "digits", "npz", "fake", "imagefolder", "cifar10", "cifar100")
AUGMENTS = ("none", "light")
