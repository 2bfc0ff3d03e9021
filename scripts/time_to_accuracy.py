"""Time to accuracy: a teacher and a W2A1 Q3 student (T = 4) per seed, trained with each
recipe variant for its epochs, on a real dataset; the table of mean test accuracy at
the best validation epoch with its 95% interval over seeds, and the wall time.

    python scripts/time_to_accuracy.py OUT --variant course:12 --variant fast:3 \
        [--variant "fast:3:train.ema=0"] [--seeds 0 1 2] [--dataset digits]

A variant is RECIPE:EPOCHS[:KEY=VALUE,...]: the keys override the recipe (an ablation).
Each run trains with one thread; run this alone on the machine for honest times.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from qdistill import cli
from qdistill.report.temperature import t_interval


def _run(cmd: list[str]) -> dict:
    if cli.main([str(c) for c in cmd]) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}")
    return json.loads((Path(cmd[cmd.index("--out") + 1]) / "summary.json").read_text())


def pipeline(out: Path, variant: str, seed: int, dataset: str) -> tuple[dict, dict]:
    recipe, epochs, *sets = variant.split(":")
    common = ["--dataset", dataset, "--recipe", recipe, "--epochs", epochs, "--seed", seed, "--threads", "1",
              "--quiet", "--set", "data.val_fraction=0.1"]
    for item in (sets[0].split(",") if sets else []):
        common += ["--set", item]
    name = variant.replace(":", "-").replace(",", "-").replace("=", "")
    tdir, sdir = out / f"{name}-s{seed}-teacher", out / f"{name}-s{seed}-student"
    teacher = _load_or(tdir, ["teacher", *common, "--out", tdir])
    student = _load_or(sdir, ["student", *common, "--teacher", tdir, "--loss", "hard+soft", "-T", "4",
                              "--weight-bits", "2", "--act-bits", "1", "--allow-weak-teacher", "--out", sdir])
    return teacher, student


def _load_or(folder: Path, cmd: list) -> dict:
    done = folder / "summary.json"
    return json.loads(done.read_text()) if done.exists() else _run(cmd)


def ci(values: list[float]) -> str:
    mean, half = t_interval(values)
    return f"{100 * mean:.2f}" if half is None else f"{100 * mean:.2f} ± {100 * half:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dataset", default="digits")
    a = p.parse_args()
    print("| variant | teacher test % | student test % | teacher + student wall s |")
    print("|---|---|---|---|")
    for v in a.variant:
        rows = [pipeline(a.out, v, s, a.dataset) for s in a.seeds]
        wall = statistics.mean(t["wall_s"] + s["wall_s"] for t, s in rows)
        print(f"| {v} | {ci([t['test_acc_at_val_best'] for t, _ in rows])} | "
              f"{ci([s['test_acc_at_val_best'] for _, s in rows])} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
