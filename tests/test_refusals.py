"""What a run or study would refuse is refused before anything trains or is written: one
line, exit 2 (issue 30, items 9 and 11). None of these tests trains a network."""
import pytest

from qdistill import cli

from conftest import SMALL

STUDY = ["study", *SMALL, "--epochs", "1", "--quiet", "--set", "study.seeds=[0]", "--set",
         'study.questions=["q1", "q3"]', "--set", "study.temperatures=[4.0]"]


def refused(argv, capsys) -> str:
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


@pytest.mark.parametrize("key,value,shown", [("seeds", "[0, 1, 0]", "0"), ("temperatures", "[4, 2, 4.0]", "4.0"),
                                             ("kd", '["kl", "dkd", "kl"]', '"kl"'),
                                             ("questions", '["q1", "q1"]', '"q1"')])
def test_a_study_list_that_repeats_a_value_is_refused_by_plan_and_study(key, value, shown, tmp_path, capsys):
    for extra in (["--plan"], []):
        line = refused([*STUDY, "--set", f"study.{key}={value}", *extra, "--out", tmp_path / "s"], capsys)
        assert line == f"qdistill: error: study.{key} lists {shown} twice; give each value once"
    assert not (tmp_path / "s").exists()


def test_temperatures_that_print_alike_would_share_a_run_folder(tmp_path, capsys):
    line = refused([*STUDY, "--set", "study.temperatures=[4.0, 4.0000001]", "--out", tmp_path / "s"], capsys)
    assert line == ("qdistill: error: study runs q3-hard+soft-T4-s0 twice: temperatures 4.0 and 4.0000001 print "
                    "alike; give temperatures that differ in 6 digits")
    assert not (tmp_path / "s").exists()


def test_a_study_refuses_an_omitted_class_the_data_lacks_before_its_teacher_trains(tmp_path, capsys):
    line = refused([*STUDY, "--omit-class", "12", "--out", tmp_path / "s"], capsys)
    assert line == "qdistill: error: student.omit_class 12 is not a class of the data (0..9)"
    assert not (tmp_path / "s").exists()  # no teacher, no report of 0 ok runs


def test_a_study_checks_every_runs_config_and_names_the_run(tmp_path, capsys):
    # the study's own [student] trains no soft loss; its Q3 runs do, and would never warm up
    line = refused([*STUDY, "--set", "student.kd_warmup=3", "--out", tmp_path / "s"], capsys)
    assert line == ("qdistill: error: study run q3-hard+soft-T4-s0: student.kd_warmup 3 is longer than train.epochs "
                    "1: the soft term would never reach its full weight")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("loss,kd", [("hard", "dkd"), ("hard+softgt", "ls")])
def test_a_teacher_term_without_a_teacher_loss_is_refused(loss, kd, tmp_path, capsys):
    line = refused(["student", *SMALL, "--loss", loss, "--kd", kd, "--out", tmp_path / "r"], capsys)
    assert line == (f"qdistill: error: student.kd {kd} does nothing with loss {loss}: the teacher term enters the "
                    f"soft and hard+soft losses only")
    assert not (tmp_path / "r").exists()


def test_a_warm_up_longer_than_the_run_is_refused(tmp_path, capsys):
    line = refused(["student", *SMALL, "--loss", "soft", "--epochs", "2", "--set", "student.kd_warmup=10",
                    "--out", tmp_path / "r"], capsys)
    assert line == ("qdistill: error: student.kd_warmup 10 is longer than train.epochs 2: the soft term would never "
                    "reach its full weight")
    assert not (tmp_path / "r").exists()


def test_plan_refuses_what_the_study_would_refuse(tmp_path, capsys, monkeypatch):
    line = refused([*STUDY, "--plan", "--omit-class", "12"], capsys)
    assert line == "qdistill: error: student.omit_class 12 is not a class of the data (0..9)"
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray fails
    assert "studies on Ray (--ray, --workers N) need Ray" in refused([*STUDY, "--plan", "--ray"], capsys)


def _study_folder(tmp_path, finished: bool):
    """A study folder as ``STUDY`` makes it, without training: its config, and with
    ``finished`` a summary for the teacher and every run, as a finished study leaves them."""
    from qdistill.cli import commands
    from qdistill.cli.parser import build_parser
    from qdistill.study.grid import expand
    from qdistill.study.studydir import StudyDir
    args = build_parser().parse_args([*STUDY, "--out", str(tmp_path / "s")])
    cfg = commands._config(args)
    study = StudyDir(tmp_path / "s")
    study.prepare(cfg, False)
    if finished:
        for run in [study.teacher, *(study.run(c.name) for c in expand(cfg))]:
            run.path.mkdir(parents=True, exist_ok=True)
            (run.path / "summary.json").write_text("{}")
    return study


def test_plan_on_a_folder_of_another_study_is_refused_and_on_a_finished_one_counts_nothing_left(tmp_path, capsys):
    study = _study_folder(tmp_path, finished=True)
    line = refused([*STUDY, "--plan", "--lr", "0.02", "--out", study.path], capsys)
    assert line.startswith(f"qdistill: error: {study.path} holds a study with another config (train.lr: ")
    capsys.readouterr()
    assert cli.main([str(a) for a in [*STUDY, "--plan", "--out", study.path]]) == 0
    assert "estimate: every run of this study is finished; a rerun trains nothing" in capsys.readouterr().out


def test_resume_or_extend_with_force_is_refused(tmp_path, capsys):
    for flag in ("--resume", "--extend"):
        line = refused(["student", *SMALL, flag, "--force", "--out", tmp_path / "r"], capsys)
        assert line == (f"qdistill: error: --force starts the run over and {flag} continues it: give one of them")


def test_c_defaults_to_t_squared_in_one_place(monkeypatch):
    """Issue 30, item 3: the loss, a run's config and the study grid all read `config.default_c`."""
    from qdistill import config
    from qdistill.nn.losses import build_loss
    from qdistill.resolve import resolve
    from qdistill.study.grid import expand
    assert build_loss("hard+soft", 3.0).c == 9.0
    monkeypatch.setattr(config, "default_c", lambda T: 100.0 + T)
    assert build_loss("hard+soft", 3.0).c == 103.0
    assert resolve(None, None, ["student.loss=\"hard+soft\"", "student.temperature=3.0"], role="student")[
        "student"]["c"] == 103.0
    study = resolve(None, None, ["study.temperatures=[2.0]", "study.seeds=[0]"])
    assert {c.c for c in expand(study) if c.question in ("q3", "q4")} == {102.0}


@pytest.mark.parametrize("key", ["dkd_beta", "dist_gamma"])
def test_an_infinite_term_weight_is_refused_by_the_config(key, tmp_path, capsys):
    line = refused(["student", *SMALL, "--loss", "soft", "--set", f"student.{key}=inf", "--out", tmp_path / "r"], capsys)
    assert line == f"qdistill: error: student.{key} must be a finite number >= 0, got inf"


@pytest.mark.parametrize("bits,said", [(["--scheme", "lsq", "--weight-bits", "5"], "W5A1"),
                                       (["--weight-bits", "32"], "W32A1"), (["--weight-bits", "4"], None)])
def test_a_student_the_packer_cannot_hold_is_said_as_training_starts(bits, said, tmp_path, capsys):
    """Issue 30, item 11: one warning line before anything trains (the run then stops at
    a missing teacher, so the warning came first), not only at export; none at 4 bits."""
    capsys.readouterr()
    code = cli.main([str(a) for a in ["student", *SMALL, *bits, "--loss", "soft", "--teacher", tmp_path / "none",
                                      "--out", tmp_path / "r"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("qdistill: error: ")
    assert err[:-1] == ([f"qdistill: warning: a {said} student trains, but `qdistill export` packs 1..4-bit weights "
                         f"and activations only; `qdistill export --out student.onnx` exports it"] if said else [])
