"""Training recipes: named bundles of ``train.*`` settings (``train.recipe``, flag
``--recipe``). A bundle lies between the defaults and everything the user sets: a key set
in a config file, a flag or ``--set`` overrides it (`qdistill.resolve`). A recipe changes
optimisation only, never a question's loss. Torch-free.

``course`` is the course's recipe, the behaviour of every run before recipes existed:
Adam at 0.01, x0.1 at 25% and x0.05 at 67% of the epochs, batch 256, no averaging.

``fast`` (the default) is built from airbench's evidence and kept, ingredient by
ingredient, only where a measurement on real data showed it helps at an equal number of
epochs (README, "Recipes"): the learning rate rises linearly over the first 23% of the
steps and falls linearly to zero, batches of 64. Weight averaging (``ema``), SGD with
Nesterov momentum and a lower peak rate were measured and left out.
"""
from __future__ import annotations

DEFAULT = "fast"  # config.DEFAULTS holds its values, so --help shows them
RECIPES: dict[str, dict] = {
    "course": {"optimizer": "adam", "lr": 0.01, "schedule": "course", "warmup": 0.0, "batch_size": 256,
               "weight_decay": 0.0, "ema": 0.0},
    "fast": {"optimizer": "adam", "lr": 0.01, "schedule": "linear", "warmup": 0.23, "batch_size": 64,
             "weight_decay": 0.0, "ema": 0.0},
}
