"""The config schema: layering, validation and the documented defaults."""
from pathlib import Path

import pytest

from qdistill import config as configlib
from qdistill.resolve import resolve
from qdistill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_documented_defaults_match_the_code():
    assert resolve(ROOT / "configs" / "default.toml") == resolve()


def test_layers_file_then_flags_then_set(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepochs = 7\nlr = 0.5\n[student]\ntemperature = 2\n")
    cfg = resolve(f, {"train": {"epochs": 9}}, ["train.epochs=11", "student.loss=hard+soft"])
    assert cfg["train"]["epochs"] == 11          # --set beats the flag and the file
    assert cfg["train"]["lr"] == 0.5             # the file beats the default
    assert cfg["student"]["temperature"] == 2.0  # ints are accepted for floats
    assert cfg["student"]["loss"] == "hard+soft"
    assert configlib.loss_c(cfg["student"]) == 4.0


def test_c_overrides_T_squared():
    cfg = resolve(None, None, ["student.temperature=3", "student.c=0.25"])
    assert configlib.loss_c(cfg["student"]) == 0.25
    assert configlib.loss_c(resolve(None, None, ["student.temperature=3"])["student"]) == 9.0


@pytest.mark.parametrize("item, words", [
    ("train.epochs=0", "train.epochs"),
    ("student.weight_bits=9", "1..8 or 32"),
    ("student.act_bits=0", "1..8 or 32"),
    ("student.temperature=0", "student.temperature"),
    ("student.temperature=-2", "student.temperature"),
    ("student.loss=kl", "student.loss"),
    ("data.dataset=cifar", "data.dataset"),
    ("train.bogus=1", "unknown key train.bogus"),
    ("bogus.key=1", "unknown section [bogus]"),
    ("train.epochs=ten", "must be an integer"),
    ("data.val_fraction=1.0", "val_fraction"),
    ("study.questions=['q5']", "q5"),
    ("study.temperatures=[]", "non-empty list"),
    ("noequals", "section.key=value"),
])
def test_bad_values_name_the_key(item, words):
    with pytest.raises(ConfigError, match=None) as e:
        resolve(None, None, [item])
    assert words in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[student]\nbits = 2\n")
    with pytest.raises(ConfigError, match="unknown key student.bits"):
        resolve(unknown)


def test_dumps_round_trips(tmp_path):
    cfg = resolve(None, None, ["student.c=2.5", "data.data_dir='a \"quoted\" dir'"])
    path = tmp_path / "out.toml"
    path.write_text(configlib.dumps(cfg))
    assert resolve(path) == cfg


def test_differences_name_three_keys_in_schema_order_then_how_many_more():
    old = resolve()
    five = resolve(None, None, ["train.epochs=7", "train.lr=0.5", "train.seed=3", "student.temperature=2",
                                "data.max_train=10"])
    assert configlib.differences(old, five) == [
        "data.max_train: 0 -> 10", "student.temperature: 4.0 -> 2.0", "train.epochs: 60 -> 7", "and 2 more"]
    three = resolve(None, None, ["train.epochs=7", "train.lr=0.5", "data.max_train=10"])
    assert configlib.differences(old, three) == [
        "data.max_train: 0 -> 10", "train.epochs: 60 -> 7", "train.lr: 0.01 -> 0.5"]
    assert configlib.differences(old, old) == []
