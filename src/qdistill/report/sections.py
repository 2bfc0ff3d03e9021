"""The report's sections as blocks (`document`: headings, paragraphs, lists, tables,
images, code), each a short function of the `StudyView`. Torch-free."""
from __future__ import annotations

from ..study.results import STATUSES, condition_key
from ..training import CHANCE_MARGIN, near_chance
from .formatting import ci_text, excludes_zero, mean_pm, num, pct, pts
from . import race, temperature
from .view import TITLES, StudyView


def blocks(v: StudyView, images: dict, configs: dict, diff_text: dict) -> list:
    """The whole report, top to bottom."""
    b = _header(v) + [("h", 2, "Summary"), ("ul", _summary(v))] + _teacher(v) + _results(v) + race.section(v.meta, v.rows)
    if v.chosen:
        b += [("h", 2, "Chosen temperature per question"), _chosen_table(v),
              ("p", "Paired difference: for each seed, the chosen condition's test accuracy minus Q1's "
                    "(same seed: same initial weights and batch order), "
                    "then mean ± t(0.975, n-1)·sd/√n.")]
    if "accuracy" in images:
        b += [("h", 2, "Accuracy vs temperature"), ("img", "accuracy", "accuracy vs temperature")]
    b += _what_changes(v, images) + temperature.section(v)
    if "curves" in images:
        b += [("h", 2, "Training curves of the chosen configurations"), ("img", "curves", "training curves")]
    b += _deliverables(v, configs, diff_text) + _failures(v)
    if v.notes:
        b += [("h", 2, "Notes"), ("ul", v.notes)]
    return b


def _header(v: StudyView) -> list:
    st, student = v.meta.get("study", {}), v.meta.get("student", {})
    n_status = {s: sum(r["status"] == s for r in v.rows) for s in STATUSES}
    desc = (f"Student {student.get('model', '?')} "
            f"W{student.get('weight_bits', '?')}A{student.get('act_bits', '?')} "
            f"({student.get('scheme', '?')}), questions {', '.join(q.upper() for q in v.questions)}")
    if st.get("temperatures"):
        desc += f", temperatures {', '.join(num(t) for t in st['temperatures'])}"
    if st.get("seeds"):
        desc += f", seeds {', '.join(str(s) for s in st['seeds'])}"
    return [("h", 1, f"Temperature study report: {v.dir.path.name}"),
            ("p", desc + f"; {len(v.rows)} runs: {n_status['ok']} ok, {n_status['failed']} failed, "
                         f"{n_status['pending']} pending. Accuracies are in percent."),
            ("p", "Every choice is made on validation accuracy (mean `val_best_acc` over seeds, "
                  "ties to the lower T); test accuracy (`test_acc_at_val_best`: the test accuracy at the "
                  "epoch of best validation) is reported, never used to choose." + _resolution(v))]


def _resolution(v: StudyView) -> str:
    """How fine the validation split that makes every choice is."""
    if not v.val_images:
        return ""
    return (f" The validation split holds {v.val_images} images per run: one image is "
            f"{100 / v.val_images:.2f} points of validation accuracy, so differences of a few images decide.")


def _difference_words(d: dict | None) -> str:
    """What a paired difference to Q1 says, and whether its interval can say it."""
    if d is None:
        return "; no Q1 runs with the same seeds to compare with."
    if d["n"] < 2:
        return (f"; {pts(d['mean'])} points vs Q1 on 1 seed: n/a (1 seed), "
                "so this difference cannot be told apart from seed noise.")
    s = f"; {pts(d['mean'])} points vs Q1 over {d['n']} paired seeds, 95% CI {ci_text(d)}: "
    if d["lo"] == d["hi"]:
        # Identical per-seed differences (likely on a small test set) give a zero-width
        # interval: it measures nothing, so claim nothing from it.
        return s + ("every seed gave the same difference, so the interval has zero width and "
                    "does not measure the uncertainty; more seeds are needed.")
    if excludes_zero(d):
        return s + "the CI excludes 0, so the difference is larger than its uncertainty."
    return s + "the CI includes 0, so the difference is within its uncertainty."


def _agreement_words(v: StudyView, q: str) -> list[str]:
    agree = [(c.temperature, c.stat("teacher_agreement")[0]) for c in v.conds
             if c.arm == q and c.stat("teacher_agreement")]
    if len(agree) < 2:
        return []
    hi, lo = max(agree, key=lambda x: x[1]), min(agree, key=lambda x: x[1])
    if hi[1] == lo[1]:
        return [f"{TITLES[q]}: top-1 agreement with the teacher is {pct(hi[1])}% at every T."]
    return [f"{TITLES[q]}: top-1 agreement with the teacher is highest at T = {num(hi[0])} "
            f"({pct(hi[1])}%) and lowest at T = {num(lo[0])} ({pct(lo[1])}%)."]


def _summary(v: StudyView) -> list[str]:
    items, teacher = [], v.teacher
    if teacher.get("test_acc") is not None:
        items.append(f"Teacher ({teacher.get('model') or teacher.get('kind') or 'full precision'}): "
                     f"test accuracy {pct(teacher['test_acc'])}%.")
    q1 = v.chosen.get("q1")
    if q1:
        items.append(f"{TITLES['q1']}: test accuracy {mean_pm((q1['test_mean'], q1['test_std']), '%')} "
                     f"over {q1['n']} seed(s); the reference of every paired difference.")
    for q, info in v.chosen.items():
        if q == "q1":
            continue
        s = (f"{TITLES[q]}: T = {num(info['temperature'])} won on validation "
             f"({pct(info['val_mean'])}%), test {mean_pm((info['test_mean'], info['test_std']), '%')}")
        s += _difference_words(v.diffs.get(q))
        if info["test_best_temperature"] != info["temperature"]:
            s += (f" (Test accuracy alone would have picked T = {num(info['test_best_temperature'])};"
                  " the choice uses validation only.)")
        items += [s] + _agreement_words(v, q)
    if v.entropy is not None:
        ts, hs, hmax = v.entropy
        items.append(f"The teacher's soft targets carry {hs[0]:.3f} nats of entropy at T = {num(ts[0])} and "
                     f"{hs[-1]:.3f} nats at T = {num(ts[-1])} (uniform: ln K = {hmax:.3f}).")
    return items


def _teacher(v: StudyView) -> list:
    t = v.teacher
    code = lambda key: f"`{t[key]}`" if t.get(key) else "n/a"
    return [("h", 2, "Teacher"),
            ("table", ["model", "kind", "val best acc", "test acc", "run", "file", "sha256"],
             [[t.get("model") or "n/a", t.get("kind") or "n/a", pct(t.get("val_best_acc")),
               pct(t.get("test_acc")), code("run"), code("file"), code("sha256")]])]


def _results(v: StudyView) -> list:
    table = []
    for c in v.conds:
        info = v.chosen.get(c.arm)
        agr, klv = c.stat("teacher_agreement"), c.stat("kl_to_teacher")
        table.append([TITLES[c.arm], c.loss, "–" if c.question == "q1" else num(c.temperature),
                      "–" if c.c is None else num(c.c), len(c.rows), pct(c.stat("val_best_acc")[0]),
                      mean_pm(c.stat("test_acc_at_val_best")),
                      pct(c.stat("test_acc_last")[0]) if c.stat("test_acc_last") else "n/a",
                      pct(agr[0]) if agr else "n/a", f"{klv[0]:.4f}" if klv else "n/a",
                      "**chosen**" if info and condition_key(info["condition"]) == condition_key(c) else ""])
    b = [("h", 2, "Results by question and temperature"),
         ("table", ["question", "loss", "T", "c", "seeds", "val best (mean)", "test at val best (mean ± sd)",
                    "test last (mean)", "agreement (mean)", "KL to teacher (mean)", ""], table) if table
         else ("p", "No finished run yet: nothing to tabulate or choose.")]
    missing = [q for q in v.questions if q not in v.chosen]
    if missing and v.chosen:
        b.append(("p", f"No finished run yet for {', '.join(q.upper() for q in missing)}."))
    return b


def _chosen_table(v: StudyView) -> tuple:
    table = []
    for q, info in v.chosen.items():
        d = v.diffs.get(q)
        excl = excludes_zero(d)
        table.append([TITLES[q], "–" if q == "q1" else num(info["temperature"]),
                      "–" if info["c"] is None else num(info["c"]), info["n"], pct(info["val_mean"]),
                      mean_pm((info['test_mean'], info['test_std'])),
                      "reference" if q == "q1" else pts(d["mean"]) if d else "n/a",
                      "–" if q == "q1" else ci_text(d),
                      "–" if q == "q1" or excl is None else ("yes" if excl else "no"),
                      f"`{info['run']}`"])
    return ("table", ["question", "T", "c", "seeds", "val best (mean)", "test (mean ± sd)",
                      "paired diff vs Q1 (points)", "95% CI (points)", "CI excludes 0", "config from run"],
            table)


def _what_changes(v: StudyView, images: dict) -> list:
    b = [("h", 2, "How temperature changes what the student learns")]
    if v.entropy is not None:
        ts, hs, hmax = v.entropy
        b += [("h", 3, "Softness of the teacher's targets"), ("img", "entropy", "soft-target entropy vs T"),
              ("table", ["T", "mean entropy (nats)", "fraction of ln K"],
               [[num(t), f"{h:.4f}", f"{h / hmax:.3f}"] for t, h in zip(ts, hs)])]
    if "agreement" in images:
        b += [("h", 3, "Agreement with the teacher and KL"), ("img", "agreement", "agreement and KL vs T")]
    if v.per_class:
        cols = list(v.per_class)
        k = len(v.per_class[cols[0]])
        names = v.class_names if len(v.class_names) == k else [str(i) for i in range(k)]
        b += [("h", 3, "Per-class test accuracy of the chosen students"),
              ("img", "per_class", "per-class accuracy"),
              ("table", ["class"] + [TITLES[q] for q in cols],
               [[names[i]] + [pct(v.per_class[q][i]) for q in cols] for i in range(k)])]
    return b


def _deliverables(v: StudyView, configs: dict, diff_text: dict) -> list:
    b = [("h", 2, "Deliverables"),
         ("ul", [f"`chosen/{q}.toml`: config of `{v.chosen[q]['run']}`" for q in configs]
          + [f"`chosen/{q}.diff`: {q}.toml against q1.toml" for q in diff_text]
          or ["none (no chosen run has a config)"])]
    for q, text in diff_text.items():
        b += [("h", 3, f"{q}.diff"), ("pre", "diff", text or "(identical configs)\n")]
    return b


def _failures(v: StudyView) -> list:
    b = [("h", 2, "Failed and pending runs")]
    bad = [r for r in v.rows if r["status"] != "ok"]
    b.append(("table", ["run", "question", "T", "seed", "status", "error"],
              [[f"`{r['run']}`", r["question"].upper(), num(r["temperature"]), r["seed"], r["status"],
                r["error"] or "–"] for r in bad]) if bad else ("p", "None: every run finished."))
    if v.class_names:  # a run that ends near chance learned nothing usable
        k = len(v.class_names)
        at_chance = [r for r in v.rows if r["status"] == "ok" and near_chance(r["test_acc_at_val_best"], k)]
        b.append(("h", 2, "Runs at chance"))
        b.append(("table", ["run", "question", "T", "seed", "test acc"],
                  [[f"`{r['run']}`", r["question"].upper(), num(r["temperature"]), r["seed"],
                    pct(r["test_acc_at_val_best"])] for r in at_chance]) if at_chance else
                 ("p", f"None: every finished run ends more than {100 * CHANCE_MARGIN:g} points above chance "
                       f"({pct(1 / k)}% for {k} classes)."))
    return b
