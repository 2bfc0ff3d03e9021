"""Small things a newcomer hit (issue 30, item 14): `eval --json` says all the text
output says, `study --plan` needs no `--out`, and `--compile` answers in the README's
spellings."""
import json

import pytest

from qdistill import cli
from qdistill.cli.parser import build_parser

from conftest import SMALL


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_compile_takes_the_readmes_spellings_and_names_them_when_refused(tmp_path, capsys):
    parse = lambda word: getattr(build_parser().parse_args(["student", "--compile", word]), "train.compile")
    assert [parse(w) for w in ("auto", "true", "False", "TRUE")] == ["auto", True, False, True]
    with pytest.raises(SystemExit) as e:
        cli.main(["student", "--compile", "yes", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert one_error_line(capsys) == ("qdistill: error: argument --compile: choose from auto, true, false "
                                      "(got 'yes') (see qdistill student --help)")
    assert not (tmp_path / "r").exists()


def test_plan_needs_no_out_and_a_study_still_does(monkeypatch, capsys):
    from qdistill.study import plan
    monkeypatch.setattr(plan, "measured_estimate", lambda cfg, left=None: ["estimate: not measured in this test"])
    assert cli.main(["study", "configs/demo.toml", "--plan"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: ") and "estimate: not measured in this test" in out
    assert cli.main(["study", "configs/demo.toml"]) == 2
    assert one_error_line(capsys) == "qdistill: error: --out STUDY is required (only --plan runs without one)"


def test_eval_gives_the_images_and_the_unseen_class_probe_in_json_and_text(small_teacher, tmp_path, capsys):
    run = tmp_path / "q3"
    assert cli.main(["student", *SMALL, "--teacher", str(small_teacher), "--loss", "hard+soft", "--epochs", "1",
                     "--allow-weak-teacher", "--omit-class", "3", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    fields = ("omitted_class", "omitted_class_acc", "omitted_class_rank", "omitted_class_bias",
              "omitted_class_acc_bias_corrected")
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["test_images"] == 80 and sum(map(sum, got["confusion"])) == 80
    assert {k: got[k] for k in fields} == pytest.approx({k: summary[k] for k in fields})
    assert cli.main(["eval", str(run)]) == 0
    text = capsys.readouterr().out
    assert "on 80 images" in text
    assert (f"unseen class 3 (left out of training): accuracy {summary['omitted_class_acc']:.4f}, mean rank "
            f"{summary['omitted_class_rank']:.2f}; bias-corrected accuracy "
            f"{summary['omitted_class_acc_bias_corrected']:.4f}") in text
    # the last checkpoint: its own accuracy and rank, but no shift was chosen for it
    assert cli.main(["eval", str(run), "--checkpoint", "last", "--json"]) == 0
    last = json.loads(capsys.readouterr().out)
    assert last["omitted_class"] == 3 and "omitted_class_rank" in last and "omitted_class_bias" not in last
    assert cli.main(["eval", str(small_teacher), "--json"]) == 0  # a teacher left nothing out
    teacher = json.loads(capsys.readouterr().out)
    assert teacher["test_images"] == 80 and not any(k.startswith("omitted") for k in teacher)
