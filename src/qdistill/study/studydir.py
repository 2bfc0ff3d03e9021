"""`StudyDir`: one study's folder. It owns the layout, the rules for starting a study
again with the same or a changed config (``--force``), and what the Ray driver writes
into it; no other module spells a file name of it. Torch-free: the report reads a study
through it.

Layout of ``STUDY/``:

* ``study.toml``           the resolved config; a different config is refused without ``--force``
* ``teacher/``             the teacher run (unless ``teacher.run`` names a run or a teacher file)
* ``teacher.json``         the teacher's path, kind, file, sha256 and accuracies
* ``teacher_test.npz``     the teacher's test logits, labels and class names (for the report)
* ``teacher_logits.pt``    the teacher's logits cache (`qdistill.training.teacher.Teacher.cached`)
* ``runs/<question>-<loss>-T<T>-s<seed>/``  one run directory (`RunDir`) per condition
* ``groups/s<seed>/checkpoint.pt``  a fused group's checkpoint while it trains
* ``results.csv``          one row per run (`qdistill.study.results`)
* ``race.json``            a race's state, replayed from the runs (`qdistill.study.race`)
* ``report.md``, ``report.html``, ``plots/``, ``chosen/``  the report (`qdistill.report`)

Folders inside the study are named by their path relative to it (``runs/NAME``,
``teacher``, ``groups/s0``): that is how Ray tasks and the driver exchange them.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import config as configlib
from ..atomic import atomic_write, atomic_write_text, remove_temps
from ..errors import ConfigError, RunError
from ..training.rundir import RunDir, recover, write_order
from .grid import expand, teacher_config

STUDY_CONFIG, RESULTS, TEACHER_JSON, TEACHER_TEST, LOGITS_CACHE = (
    "study.toml", "results.csv", "teacher.json", "teacher_test.npz", "teacher_logits.pt")
REPORT_MD, REPORT_HTML, PLOTS, CHOSEN, RACE = "report.md", "report.html", "plots", "chosen", "race.json"
TEACHER, RUNS, GROUPS = "teacher", "runs", "groups"
# How a study's runs are scheduled, not what they are: a study started one way resumes
# another way (in this process, fused, on Ray) without --force.
EXECUTION_KEYS = ("fused", "workers", "executor", "ray_address", "cpus_per_run", "gpus_per_run", "retries",
                  "allow_weak_teacher")


def _what_runs(text: str) -> str | None:
    """A study config's text without the `EXECUTION_KEYS`, keys it lacks at their
    defaults; ``None`` for a config that no longer reads."""
    try:
        cfg = configlib.merge(configlib.defaults(), configlib.tomllib.loads(text))
    except (ConfigError, configlib.tomllib.TOMLDecodeError):
        return None
    for key in EXECUTION_KEYS:
        cfg["study"].pop(key, None)
    return configlib.dumps(cfg)


@dataclass(frozen=True)
class StudyDir:
    """The folder of one study."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:  # a path wherever one is taken
        return str(self.path)

    config_file = property(lambda self: self.path / STUDY_CONFIG)
    results = property(lambda self: self.path / RESULTS)
    teacher_json = property(lambda self: self.path / TEACHER_JSON)
    teacher_test = property(lambda self: self.path / TEACHER_TEST)
    logits_cache = property(lambda self: self.path / LOGITS_CACHE)
    report_md = property(lambda self: self.path / REPORT_MD)
    report_html = property(lambda self: self.path / REPORT_HTML)
    plots = property(lambda self: self.path / PLOTS)
    chosen = property(lambda self: self.path / CHOSEN)
    race = property(lambda self: self.path / RACE)

    @property
    def teacher(self) -> RunDir:
        return RunDir(self.path / TEACHER)

    def run(self, name: str) -> RunDir:
        return RunDir(self.path / RUNS / name)

    def folder(self, rel: str) -> RunDir:
        """The run (or group) folder at ``rel`` inside the study."""
        return RunDir(self.path / rel)

    @staticmethod
    def run_folder(name: str) -> str:
        return f"{RUNS}/{name}"

    @staticmethod
    def group_folder(seed: int, index: int | None = None) -> str:
        return f"{GROUPS}/s{seed}" + ("" if index is None else f"-{index}")

    def read_config(self) -> dict:
        """``study.toml`` as written (``{}`` for a study without one)."""
        return configlib.read_toml(self.config_file) if self.config_file.is_file() else {}

    # ------------------------------------------------------------ the rules

    def prepare(self, cfg: dict, force: bool) -> None:
        """Create the study or check it holds the same config; with ``force``, drop what
        a changed config made stale (runs and the teacher whose config differs, caches,
        results and unfinished groups)."""
        text = configlib.dumps(cfg)
        if self.holds_another(cfg, force):
            self._drop_stale(cfg)
        self.path.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.path / RUNS, self.path / GROUPS):
            recover(folder)  # a driver killed while it replaced a run directory
        atomic_write_text(self.config_file, text)

    def holds_another(self, cfg: dict, force: bool) -> bool:
        """Whether the folder holds a study of another config: a `RunError` naming the keys
        that differ unless ``force``. Writes nothing (``study --plan`` asks it too)."""
        text = configlib.dumps(cfg)
        if not self.config_file.exists() or _what_runs(self.config_file.read_text()) == _what_runs(text):
            return False
        if not force:
            old = configlib.tomllib.loads(_what_runs(self.config_file.read_text()) or "")
            diff = configlib.differences(old, configlib.tomllib.loads(_what_runs(text)))
            raise RunError(f"{self.path} holds a study with another config ({'; '.join(diff)}); use --force "
                           f"to redo what that changes (runs whose own config is unchanged are kept)")
        return True

    def _drop_stale(self, cfg: dict) -> None:
        for path in (self.logits_cache, self.teacher_test, self.teacher_json, self.results, self.race):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.path / GROUPS, ignore_errors=True)
        wanted = {c.name: configlib.run_text(c.cfg) for c in expand(cfg)}
        wanted[TEACHER] = configlib.run_text(teacher_config(cfg))
        for run in [self.teacher, *(RunDir(p) for p in sorted((self.path / RUNS).glob("*")))]:
            if run.path.is_dir() and (not run.stored_config_text() or
                                      wanted.get(run.name) != run.stored_config_text()):
                shutil.rmtree(run.path)

    # ------------------------------------------------------------ what the Ray driver writes

    def resumable_files(self, folders: list[str]) -> dict[str, bytes]:
        """What a task needs to resume ``folders`` (no summary, no error), by path inside
        the study; their old ``error.txt`` and a killed writer's temp files go."""
        files = {}
        for rel in folders:
            run = self.folder(rel)
            files.update({f"{rel}/{name}": blob for name, blob in run.files(resumable=True).items()})
            run.clear_error()
            remove_temps(run.path)
        return files

    def write_epoch(self, folders: list[str], files: dict[str, bytes]) -> None:
        """An epoch's files (by path inside the study) into ``folders``: files gone from
        them go first, then the rest in `write_order` across folders (a kill between two
        writes leaves files that agree, as in the loop)."""
        for rel in folders:
            self.folder(rel).keep_only({r.rsplit("/", 1)[1] for r in files if r.rsplit("/", 1)[0] == rel})
        for rel in sorted(files, key=write_order):
            atomic_write(self.path / rel, lambda f, data=files[rel]: f.write(data))

    def write_done(self, folders: list[str], files: dict[str, bytes], **summary_extra) -> None:
        """A finished unit's folders, each replaced as a whole (`RunDir.replace`), their
        summaries with ``summary_extra`` added."""
        for rel in folders:
            run = self.folder(rel)
            mine = {r.rsplit("/", 1)[1]: data for r, data in files.items() if r.rsplit("/", 1)[0] == rel}
            run.replace(run.with_summary(mine, **summary_extra))
