"""``qdistill ARGV`` in a fresh process, started in a fraction of a second: what
``python -m qdistill.cli ARGV`` does, less its imports.

A command's process spends about 5 s of CPU importing torch, torch._dynamo (Adam's
constructor imports it), matplotlib and qdistill before it does anything; the fault tests
start a dozen. Here a fork server (`multiprocessing`'s ``forkserver``: a process started
once, from the same interpreter and environment, that has imported those modules and
run nothing else) forks one child per command. The child is a new OS process, as a
command's is: its own pid, signals, open files and locks (SIGKILL and SIGTERM land on it
alone; the kernel drops its locks when it dies), fresh torch state (no thread pool,
seed or setting of an earlier command); it runs ``cli.main(argv)`` with ``sys.argv`` as
``python -m`` sets it and exits with its code, or with a traceback and 1.

`Command` has the part of `subprocess.Popen` the tests use: ``pid``, ``poll``, ``wait``,
``send_signal`` and ``returncode`` (``-N`` for a signal ``N``); stdout and stderr go to
files (or nowhere) rather than pipes, read with `Command.err` / `Command.out` once it
ended. `stop` ends the server (a module fixture's teardown).
"""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import qdistill.cli
from qdistill.cli.main import main as cli_main

# What a command imports before it trains, imported once by the server (not by the test
# process that imports this module: it has its own): the CLI, a study and its report (its
# statistics import scipy's, 0.2 s a command), torch and the parts of it a run loads. A
# name that does not import is skipped.
PRELOAD = ["torch", "torch._dynamo", "torch.optim", "matplotlib.figure", "scipy.stats", "qdistill.cli.commands",
           "qdistill.report.report", "qdistill.study.run", "qdistill.training.loop"]

_MAIN = str(Path(qdistill.cli.__file__).with_name("__main__.py"))  # sys.argv[0] under `python -m qdistill.cli`
_ctx = None


def _server():
    """The fork server's context, started on first use with this module preloaded."""
    global _ctx
    if _ctx is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([*PRELOAD, __name__])
        # the server imports this module by name: it finds it through PYTHONPATH (the
        # forkserver of this Python applies no sys.path of ours); set while it starts
        here, before = str(Path(__file__).parent), os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *([before] if before else [])])
        try:
            from multiprocessing import forkserver
            forkserver.ensure_running()
        finally:
            if before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = before
        _ctx = ctx
    return _ctx


def stop() -> None:
    """End the fork server (the next `Command` starts another)."""
    global _ctx
    if _ctx is not None:
        from multiprocessing import forkserver
        forkserver._forkserver._stop()
        _ctx = None


def _run(argv: list[str], out: str, err: str) -> None:
    """In the child: stdout and stderr to ``out`` and ``err`` (file descriptors 1 and 2, as
    a subprocess's), then the command, as ``python -m qdistill.cli ARGV``."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False, errors="backslashreplace")
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, errors="backslashreplace")
    sys.argv = [_MAIN, *argv]
    code = cli_main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class Command:
    """``qdistill ARGV`` in a fresh process (see the module docstring). ``out``, ``err``:
    files for its stdout and stderr, else they are discarded."""

    def __init__(self, *argv, out: Path | None = None, err: Path | None = None):
        self.args = [str(a) for a in argv]
        self._out, self._err = out, err
        self._process = _server().Process(target=_run, args=(self.args, str(out or os.devnull),
                                                             str(err or os.devnull)), daemon=False)
        self._process.start()
        self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self._process.kill()

    def err(self) -> str:
        return self._err.read_text() if self._err else ""

    def out(self) -> str:
        return self._out.read_text() if self._out else ""


def run(*argv, timeout: float | None = None, out: Path | None = None, err: Path | None = None) -> int:
    """``qdistill ARGV`` in a fresh process, to the end: its exit code."""
    return Command(*argv, out=out, err=err).wait(timeout)
