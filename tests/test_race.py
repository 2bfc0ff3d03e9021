"""The race's tests and rule (`qdistill.study.racetests`, `qdistill.study.race`):
every statistic against scipy.stats on values where a wrong formula would differ, and
the rule's drops, stops and replay on hand-made accuracies."""
import math

import numpy as np
import pytest
from scipy import stats

from qdistill.study.race import Rule, race, race_state
from qdistill.study.racetests import conover_difference, friedman, holm, paired_t, race_test, wilcoxon


def test_friedman_with_ties_matches_scipy_and_the_tie_correction_matters():
    x = np.array([[0.91, 0.90, 0.90, 0.85], [0.92, 0.92, 0.88, 0.86], [0.90, 0.91, 0.89, 0.89],
                  [0.93, 0.90, 0.90, 0.90], [0.94, 0.91, 0.92, 0.88]])
    q, p, r = friedman(x)
    ref = stats.friedmanchisquare(*x.T)
    assert q == pytest.approx(ref.statistic, rel=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    n, k = x.shape  # without the tie term the statistic would be smaller: the test sees the difference
    untied = 12 * np.sum((r.sum(0) - n * (k + 1) / 2) ** 2) / (n * k * (k + 1))
    assert q > untied * 1.05
    assert r[1].tolist() == [1.5, 1.5, 3, 4]  # rank 1 is the highest accuracy, ties averaged


def test_conover_difference_by_hand():
    # ranks [1,2,3], [1,3,2], [2,1,3]: A = 42, R = (4, 6, 8), n A - sum R^2 = 126 - 116 = 10,
    # dof = 2 * 2 = 4: t_{0.975, 4} * sqrt(2 * 10 / 4)
    x = np.array([[3.0, 2.0, 1.0], [3.0, 1.0, 2.0], [2.0, 3.0, 1.0]])
    _, _, r = friedman(x)
    assert conover_difference(r, 0.05) == pytest.approx(stats.t.ppf(0.975, 4) * math.sqrt(5.0), rel=1e-12)
    assert conover_difference(r, 0.10) == pytest.approx(stats.t.ppf(0.95, 4) * math.sqrt(5.0), rel=1e-12)


def test_wilcoxon_with_zeros_and_ties_matches_scipy():
    a = np.array([0.90, 0.91, 0.92, 0.88, 0.95, 0.90, 0.93, 0.89, 0.94])
    b = np.array([0.90, 0.89, 0.90, 0.89, 0.91, 0.88, 0.90, 0.87, 0.92])  # one zero, tied |d|
    w, p, side = wilcoxon(a, b)
    ref = stats.wilcoxon(a, b, zero_method="wilcox", correction=True, method="approx")
    assert w == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    assert side > 0  # a is the better
    w2, p2, side2 = wilcoxon(b, a)
    assert (w2, side2) == (w, -side) and p2 == pytest.approx(p, rel=1e-12)


def test_paired_t_matches_scipy_one_sided():
    best = np.array([0.93, 0.91, 0.95, 0.92, 0.94, 0.90])
    other = np.array([0.91, 0.92, 0.90, 0.90, 0.93, 0.89])
    t, p = paired_t(best, other)
    ref = stats.ttest_rel(best, other, alternative="greater")
    assert t == pytest.approx(ref.statistic, rel=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    t, p = paired_t(best, best - 0.01)  # constant differences (up to rounding): no test, as R's t.test
    assert math.isnan(t) and p == 1.0


def test_paired_t_reads_float32_accuracies_two_images_apart_in_every_seed_as_constant():
    """The demo's Q1 and Q2 runs: 354 and 353 of 359 test images against 352 and 351. As
    float32 accuracies the differences are 0.0055710077 and 0.0055710673: R's rule alone
    saw a standard error and gave t = 186,933 (p = 1.7e-6)."""
    f32 = lambda k, n: float(np.float32(k / n))
    best, other = [f32(354, 359), f32(353, 359)], [f32(352, 359), f32(351, 359)]
    assert best[0] - other[0] != best[1] - other[1]
    t, p = paired_t(best, other)
    assert math.isnan(t) and p == 1.0
    n = 26032  # SVHN's test split: one image apart is still a difference
    t, p = paired_t([f32(25000, n), f32(25010, n), f32(25020, n)], [f32(24990, n), f32(25001, n), f32(25010, n)])
    assert t == pytest.approx(stats.ttest_rel([10, 9, 10], [0, 0, 0], alternative="greater").statistic, rel=1e-3)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04, 1.0 -> 4*0.01, 3*0.03, max(0.09, 2*0.04), 1
    assert holm([0.01, 0.04, 0.03, 1.0]) == pytest.approx([0.04, 0.09, 0.09, 1.0], abs=1e-15)
    assert holm([0.5, 0.2]) == pytest.approx([0.5, 0.4])


def test_friedman_drops_arms_beyond_conovers_difference_only():
    # arm 0 best, arm 1 close, arm 2 always last: R = (n + ..), C's sum n*3
    x = np.array([[0.95, 0.94, 0.80], [0.94, 0.95, 0.81], [0.96, 0.93, 0.79], [0.95, 0.94, 0.82],
                  [0.93, 0.94, 0.80], [0.96, 0.95, 0.78]])
    v = race_test(x, "friedman", 0.05)
    q, p, r = friedman(x)
    sums = r.sum(0)
    cd = conover_difference(r, 0.05)
    assert v.test == "friedman" and p < 0.05
    assert sums[2] - sums.min() > cd >= sums[1] - sums.min()  # the data put the cut between arms 1 and 2
    assert v.drop == [2]


def test_two_arms_use_wilcoxon_and_drop_the_worse():
    a = np.array([0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96])
    b = a - np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07])
    v = race_test(np.stack([b, a], axis=1), "friedman", 0.05)
    assert v.test == "wilcoxon" and v.drop == [0]
    assert v.p[0] == pytest.approx(stats.wilcoxon(b, a, method="approx", correction=True).pvalue, rel=1e-9)
    assert race_test(np.stack([b, a], axis=1)[:4], "friedman", 0.05).drop == []  # 4 pairs cannot reject at 5%


def test_t_holm_drops_each_arm_below_alpha_after_holm():
    rng = np.random.default_rng(0)
    base = rng.normal(0.9, 0.01, size=8)
    wobble = np.array([0.004, -0.006, 0.005, -0.004, 0.003, -0.005, 0.002, -0.003])  # mean -0.0005: not separated
    x = np.stack([base, base + wobble, base - 0.05 + rng.normal(0, 0.002, 8)], axis=1)
    v = race_test(x, "t-holm", 0.05)
    raw = [1.0] + [stats.ttest_rel(x[:, 0], x[:, j], alternative="greater").pvalue for j in (1, 2)]
    assert v.test == "t-holm" and v.p == pytest.approx(holm(raw), rel=1e-9)
    assert v.drop == [j for j in range(3) if holm(raw)[j] < 0.05] == [2]


def _values(rows: dict[str, list[float]]) -> dict[str, dict[int, float]]:
    return {arm: dict(enumerate(v)) for arm, v in rows.items()}


def test_race_drops_keep_their_seeds_and_stop_at_the_first_missing_run():
    good = [0.95, 0.94, 0.96, 0.95, 0.94, 0.96, 0.95, 0.96]
    close = [0.94, 0.95, 0.95, 0.96, 0.93, 0.95, 0.96, 0.95]
    bad = [0.80, 0.81, 0.79, 0.82, 0.80, 0.78, 0.81, 0.80]
    rule = Rule("friedman", first_test=4, max_seeds=8, confidence=0.95)
    order = list(range(8))
    r = race("q2", ["T1", "T4", "T8"], _values({"T1": bad, "T4": good, "T8": close}), order, rule)
    first = r.tests[0]
    assert first["n"] == 4 and r.dropped["T1"]["n"] == r.dropped["T1"]["seed"] + 1
    assert r.dropped["T1"]["test"] == "friedman" and r.dropped["T1"]["p"] < 0.05
    assert r.arm_seeds("T1", order) == order[:r.dropped["T1"]["n"]]
    assert set(r.alive) == {"T4", "T8"} and r.decided and r.seeds == order  # undivided at max_seeds
    # with seed 5 of T8 missing, the race waits there: the next seed, no test past it
    partial = _values({"T1": bad[:4], "T4": good, "T8": close[:5]})
    p = race("q2", ["T1", "T4", "T8"], partial, order, rule)
    assert p.next_seed == 5 and p.seeds == order[:5] and p.arm_seeds("T4", order) == order[:6]
    assert p.dropped == {k: v for k, v in r.dropped.items() if v["n"] <= 5}


def test_race_ends_with_one_arm_and_references_keep_pace():
    rule = Rule("t-holm", first_test=3, max_seeds=10, confidence=0.95)
    good = [0.95 + 0.001 * i for i in range(10)]
    bad = [0.80 + 0.002 * (i % 3) for i in range(10)]
    values = _values({"q2-T1": bad, "q2-T4": good, "q1": [0.9] * 10, "q3-T1": bad[:3], "q3-T4": good[:3]})
    st = race_state({"q1": ["q1"], "q2": ["q2-T1", "q2-T4"], "q3": ["q3-T1", "q3-T4"]}, values, list(range(10)), rule)
    assert st.races["q2"].alive == ["q2-T4"] and st.races["q2"].decided
    assert st.races["q3"].alive == ["q3-T4"]
    n = st.races["q2"].dropped["q2-T1"]["n"]
    assert n == 3 and st.reach == 3 and st.seeds_of("q1") == [0, 1, 2]
    assert st.runs() == 3 * 5 and st.grid_runs() == 5 * 10


def test_a_race_replays_identically_from_any_prefix_of_its_runs():
    rng = np.random.default_rng(3)
    arms = [f"T{t}" for t in (1, 2, 4, 8)]
    full = {a: dict(enumerate(np.round(rng.normal(0.9 + 0.01 * i, 0.01, 12), 4))) for i, a in enumerate(arms)}
    rule = Rule("friedman", first_test=4, max_seeds=12, confidence=0.9)
    order = list(range(12))
    final = race("q3", arms, full, order, rule)
    for n in range(1, 12):  # a study killed after n seeds resumes with the same decisions
        seen = {a: {s: v for s, v in full[a].items() if s < n and s in final.arm_seeds(a, order)} for a in arms}
        part = race("q3", arms, seen, order, rule)
        assert part.tests == final.tests[:len(part.tests)]
        assert all(final.dropped[a] == d for a, d in part.dropped.items())


def test_choose_picks_among_a_races_survivors_only():
    from qdistill.study.results import choose
    rows = []
    for T, vals, dropped in ((1.0, [0.99, 0.99], 1), (4.0, [0.90, 0.91], None), (8.0, [0.92, 0.90], None)):
        for seed, v in enumerate(vals):
            rows.append({"run": f"q2-soft-T{T:g}-s{seed}", "question": "q2", "loss": "soft", "kd": "kl",
                         "temperature": T, "c": None, "seed": seed, "val_best_acc": v, "test_acc_at_val_best": v,
                         "status": "ok", "race_dropped_after": dropped})
    assert choose(rows)["q2"]["temperature"] == 8.0  # T = 1 has the higher mean but was dropped
    assert choose([{**r, "race_dropped_after": None} for r in rows])["q2"]["temperature"] == 1.0


def test_t_holm_race_records_the_best_arms_untestable_statistic_as_null():
    rule = Rule("t-holm", first_test=3, max_seeds=3, confidence=0.95)
    values = {"T1": {0: 0.80, 1: 0.82, 2: 0.81}, "T4": {0: 0.95, 1: 0.96, 2: 0.94}}
    r = race("q2", ["T1", "T4"], values, [0, 1, 2], rule)
    assert r.last["T4"] == {"test": "t-holm", "statistic": None, "p": 1.0}  # the best against itself
    t, p = paired_t(np.array([0.95, 0.96, 0.94]), np.array([0.80, 0.82, 0.81]))
    assert r.last["T1"]["statistic"] == pytest.approx(t) and r.last["T1"]["p"] == pytest.approx(min(1.0, 2 * p))
