"""Errors a user can cause. The CLI catches `UserError` once: one line on stderr, exit code 2.

Anything else that raises is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a config, a flag, a path or a data file."""


class ConfigError(UserError):
    """A config file or flag has an unknown key or a value out of range."""


class DataError(UserError):
    """A dataset file is missing, corrupt or malformed."""


class RunError(UserError):
    """A run directory is missing, incomplete, or would be overwritten."""


class ExportError(UserError):
    """A model cannot be exported: full precision, or a layer or bit-width the packed format lacks."""


class WriteError(UserError):
    """A file could not be written (disk full, permission lost, I/O error); the file it
    would have replaced is intact."""


class TeacherError(UserError):
    """A teacher cannot be used: a file of no known kind, corrupt or truncated, an input it
    rejects, or outputs that do not fit the data (classes, lengths, non-finite values)."""
