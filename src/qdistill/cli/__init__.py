"""The ``qdistill`` command: argument parsing (`parser`), config resolution and
printing (`commands`), error messages and signals (`main`). Every command takes
``--config FILE.toml`` and ``--set section.key=value``; flags override the file and
``--set`` overrides both. A `UserError` anywhere becomes one line on stderr and exit
code 2."""
from .main import main

__all__ = ["main"]
