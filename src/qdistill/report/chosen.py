"""The chosen configurations of a study: ``chosen/qN.toml``, byte copies of the chosen
runs' configs, and ``chosen/qN.diff``, unified diffs of each against ``q1.toml``."""
from __future__ import annotations

import difflib

from ..atomic import atomic_write_bytes, atomic_write_text
from ..study import QUESTIONS
from ..study.studydir import StudyDir
from ..training.rundir import CONFIG


def config_diff(a: bytes, b: bytes, qa: str, qb: str, run_a: str, run_b: str) -> str:
    """A unified diff of config ``b`` (question ``qb``, from run ``run_b``) against ``a``."""
    def lines(data: bytes) -> list[str]:
        text = data.decode("utf-8", errors="replace")
        return (text if text.endswith("\n") or not text else text + "\n").splitlines(keepends=True)
    # The run each config came from goes in the date field (after a tab), which patch ignores.
    return "".join(difflib.unified_diff(lines(a), lines(b), fromfile=f"{qa}.toml", tofile=f"{qb}.toml",
                                        fromfiledate=f"{StudyDir.run_folder(run_a)}/{CONFIG}",
                                        tofiledate=f"{StudyDir.run_folder(run_b)}/{CONFIG}"))


def write_chosen(study: StudyDir, chosen: dict, swept: list, notes: list) -> tuple[list, dict, dict]:
    """chosen/qN.toml (byte copies of the chosen runs' configs; ``qN-TERM.toml`` for a
    teacher term other than kl) and chosen/qN.diff (against q1.toml); removes deliverables
    of questions and terms this study no longer has."""
    chosen_dir = study.chosen
    paths, configs, diff_text = [], {}, {}
    for q, info in chosen.items():
        src = study.run(info["run"]) / CONFIG
        if not src.is_file():
            notes.append(f"runs/{info['run']}/{CONFIG} missing: chosen/{q}.toml not written.")
            continue
        configs[q] = src.read_bytes()
        atomic_write_bytes(chosen_dir / f"{q}.toml", configs[q])
        paths.append(chosen_dir / f"{q}.toml")
    for q in swept:
        if q in configs and "q1" in configs:
            diff_text[q] = config_diff(configs["q1"], configs[q], "q1", q,
                                       chosen["q1"]["run"], chosen[q]["run"])
            atomic_write_text(chosen_dir / f"{q}.diff", diff_text[q])
            paths.append(chosen_dir / f"{q}.diff")
    # A re-run after --force may have dropped a question or a term: leave no stale deliverable.
    written = {p.name for p in paths}
    for p in [*chosen_dir.glob("q*.toml"), *chosen_dir.glob("q*.diff")]:
        if p.name not in written and p.name.split(".")[0].split("-")[0] in QUESTIONS:
            p.unlink()
    return paths, configs, diff_text
