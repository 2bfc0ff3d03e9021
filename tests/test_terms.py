"""Distillation terms and quantizers as a user reaches them: the config keys, the CLI
flag, the study's grid over terms, and the report's arms."""
import functools

import pytest

from qdistill import cli
from qdistill.resolve import resolve
from qdistill.study.grid import expand
from qdistill.training import loop
from qdistill.training.rundir import RunDir

from conftest import SMALL


def test_the_study_grid_sweeps_the_teacher_terms_of_q2_and_q3_only():
    cfg = resolve(None, None, ["study.kd=['kl', 'dkd']", "study.seeds=[0]", "study.temperatures=[4.0]"])
    names = [c.name for c in expand(cfg)]
    assert names == ["q1-hard-T1-s0", "q2-soft-T4-s0", "q2-soft-dkd-T4-s0", "q3-hard+soft-T4-s0",
                     "q3-hard+soft-dkd-T4-s0", "q4-hard+softgt-T4-s0"]
    kds = {c.name: c.cfg["student"]["kd"] for c in expand(cfg)}
    assert kds["q3-hard+soft-dkd-T4-s0"] == "dkd" and kds["q4-hard+softgt-T4-s0"] == "kl"
    with pytest.raises(Exception, match="study.kd: unknown distillation term 'kld'"):
        resolve(None, None, ["study.kd=['kld']"])


def test_lsq_with_one_bit_weights_is_refused_by_the_config_check(capsys):
    assert cli.main(["student", "--scheme", "lsq", "--weight-bits", "1", "--loss", "hard", "--out", "x"]) == 2
    assert "student.scheme lsq needs weight_bits >= 2" in capsys.readouterr().err


def test_kd_warmup_ramps_the_soft_term_linearly():
    cfg = resolve(None, None, ["student.loss=hard+soft", "student.kd_warmup=4"], role="student")
    m = loop.Member(loop.Run(cfg, "x"), loop._loss(cfg), {}, {})
    weights = [w.keywords["soft_weight"] if isinstance(w, functools.partial) else 1.0
               for w in (loop._warmed(m, e) for e in range(6))]
    assert weights == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("kd", ["dkd", "ls", "dist"])
def test_every_term_trains_from_the_cli(small_teacher, tmp_path, kd):
    out = tmp_path / kd
    assert cli.main(["student", "--teacher", str(small_teacher), "--loss", "hard+soft", "--kd", kd, "-T", "4",
                     "--epochs", "1", "--quiet", "--allow-weak-teacher", "--out", str(out)]) == 0
    s = RunDir(out).read_summary()
    assert f'kd = "{kd}"' in (out / "config.toml").read_text() and s["grad_ratio_soft_hard"] > 0


@pytest.mark.slow  # a whole study
def test_a_study_over_terms_reports_each_arm(small_teacher, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[data]\ndataset = "digits"\nmax_train = 240\nmax_test = 80\n[train]\nepochs = 1\n'
                   f'[teacher]\nrun = "{small_teacher}"\n'
                   '[study]\nseeds = [0]\ntemperatures = [4.0]\nquestions = ["q1", "q3"]\nkd = ["kl", "dkd"]\n'
                   'allow_weak_teacher = true\n')
    s = tmp_path / "S"
    assert cli.main(["study", str(cfg), "--out", str(s), "--quiet"]) == 0
    rows = (s / "results.csv").read_text().splitlines()
    assert any(r.startswith("q3-hard+soft-dkd-T4-s0,q3,hard+soft,dkd,") for r in rows)
    md = (s / "report.md").read_text()
    assert "Q3 hard + soft (teacher) [dkd]" in md and (s / "chosen" / "q3-dkd.toml").is_file()
    assert 'kd = "dkd"' in (s / "chosen" / "q3-dkd.diff").read_text()
