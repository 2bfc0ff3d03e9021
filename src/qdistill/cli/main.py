"""``qdistill``'s entry point: one line and exit code 2 for a `UserError` (or a library
error that bad input causes: `_library_error`), Ctrl-C and SIGTERM stop with the line
that says how to continue."""
from __future__ import annotations

import os
import signal
import sys
import threading
import warnings

from ..errors import UserError
from .parser import build_parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by SLURM, Kubernetes, ``timeout``): stop as Ctrl-C does."""


def _terminate(signum, frame):
    _terminate.received = True  # Ray turns an exception raised while it waits into KeyboardInterrupt
    raise Terminated


def _how_to_continue(args) -> str:
    if args.command == "study":
        return "rerun the same command to continue"
    if args.command in ("teacher", "student"):
        return "rerun with --resume to continue"
    return "nothing was left half-written"


def _warning_line(message, category, filename, lineno, file=None, line=None) -> str:
    """A warning as the command prints it: one line (no source line under it)."""
    text = str(message).strip().splitlines()
    return f"qdistill: warning: {text[0] if text else category.__name__}\n"


def _library_error(e: Exception) -> bool:
    """Whether ``e`` is the error a library layer raises for bad input, its own
    `ValueError` (`qdistill.nn.losses.LossError`). Looked up only where that module is
    loaded: the CLI imports no torch for it."""
    losses = sys.modules.get("qdistill.nn.losses")
    return losses is not None and isinstance(e, losses.LossError)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line
    parser = build_parser()
    args = parser.parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    _terminate.received = False
    try:
        return args.func(args)
    except (UserError, ValueError) as e:
        if not isinstance(e, UserError) and not _library_error(e):
            raise  # a bug: it keeps its traceback
        print(f"qdistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated) or _terminate.received:
            print(f"qdistill: stopped by SIGTERM; the last finished epoch is saved: {_how_to_continue(args)}",
                  file=sys.stderr)
            return 143
        print(f"qdistill: interrupted; the last finished epoch is saved: {_how_to_continue(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qdistill eval RUN | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)

