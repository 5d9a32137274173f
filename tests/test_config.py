"""Config loading: defaults, inheritance, overrides, and one clear error per mistake."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, run_driver

from bss.config import Config, from_dict, load_config, parse_overrides
from bss.errors import ConfigError


def test_repo_config_loads():
    cfg = load_config(REPO / "config.yaml")
    assert isinstance(cfg, Config) and cfg.height % 32 == 0 and cfg.criterion.name == "TverskyLoss"


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"epochs": 3, "model": {"name": "Unet", "args": {"encoder_name": "resnet18", "encoder_depth": 4}}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"_base_": "base.yaml", "model": {"args": {"encoder_name": "resnet34"}}}))
    cfg = load_config(tmp_path / "child.yaml", parse_overrides(["learning_rate=1e-4", "image_size=[64, 96]"]))
    assert cfg.epochs == 3 and cfg.model.name == "Unet"
    assert cfg.model.args == {"encoder_name": "resnet34", "encoder_depth": 4}
    assert cfg.learning_rate == pytest.approx(1e-4) and (cfg.height, cfg.width) == (64, 96)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"epoch": 3}, "unknown config key 'epoch'. Did you mean 'epochs'?"),
        ({"model": {"name": "Unet", "argz": {}}}, "unknown config key 'model.argz'. Did you mean 'args'?"),
        ({"tracking": {"url": "x"}}, "unknown config key 'tracking.url'. Did you mean 'uri'?"),
        ({"epochs": "ten"}, "config key 'epochs' must be int"),
        ({"epochs": True}, "config key 'epochs' must be int"),
        ({"learning_rate": "fast"}, "config key 'learning_rate' must be float"),
        ({"image_size": [100, 128]}, "'image_size' must be [height, width] with each a positive multiple of 32"),
        ({"image_size": [128]}, "'image_size' must be [height, width]"),
        ({"batch_size": 0}, "'batch_size' must be positive"),
        ({"threshold": 1.5}, "'threshold' must be between 0 and 1"),
        ({"selection_metric": "f1"}, "'selection_metric' must be one of"),
        ({"criterion": {"args": {}}}, "'criterion' is incomplete"),
        ({"device": "tpu"}, "'device' must be auto"),
        ({"learning_rate": float("nan")}, "'learning_rate' must be a finite number"),
        ({"weight_decay": float("inf")}, "'weight_decay' must be a finite number"),
        ({"student": {"ignore_bands": [0.3, 0.7]}}, "unknown config key 'student.ignore_bands'. Did you mean 'ignore_band'?"),
        ({"student": {"ignore_band": [0.7, 0.3]}}, "'student.ignore_band' must be [low, high], teacher probabilities with 0 < low < high < 1"),
        ({"student": {"ignore_band": [0.0, 0.5]}}, "'student.ignore_band' must be [low, high]"),
        ({"student": {"ignore_band": 0.5}}, "'student.ignore_band' must be [low, high]"),
        ({"student": {"ignore_band": [0.3, "high"]}}, "'student.ignore_band' must be [low, high]"),
        ({"student": {"hand_fraction": 1.0}}, "'student.hand_fraction' must be at least 0 and below 1"),
        ({"student": {"hand_fraction": float("nan")}}, "'student.hand_fraction' must be at least 0 and below 1"),
        ({"student": {"soft_targets": "yes"}}, "config key 'student.soft_targets' must be bool"),
        ({"student": {"augment": "heavy"}}, "config key 'student.augment' must be one of default, strong, got 'heavy'"),
        ({"student": {"init_from": ""}}, "config key 'student.init_from' must be the path of a checkpoint"),
        ({"student": [0.3, 0.7]}, "config key 'student' must be a mapping"),
    ],
)
def test_bad_config_names_the_key(data, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert fragment in str(err.value)


def test_error_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'epochz'"):
        load_config(path)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_to_dict_round_trip():
    cfg = from_dict({"epochs": 2, "model": {"name": "FPN", "args": {"encoder_name": "resnet18"}}})
    assert from_dict(cfg.to_dict()) == cfg
    student = from_dict({"student": {"ignore_band": [0.25, 0.75], "hand_fraction": 0.5, "augment": "strong"}})
    assert from_dict(student.to_dict()) == student and student.student.needs_soft


def test_student_defaults_change_nothing():
    """Without a `student` section a config trains as before: no band, no soft targets, natural mix, fresh weights, default augmentation."""
    student = from_dict({}).student
    assert (student.ignore_band, student.soft_targets, student.hand_fraction, student.init_from, student.augment) == (None, False, 0.0, None, "default")
    assert not student.needs_soft and load_config(REPO / "config.yaml").student == student


def test_base_cycle_is_one_error(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\nepochs: 2\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"'_base_' chain loops back on itself \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "self.yaml")


def test_loss_arguments_of_the_wrong_type_name_the_key():
    from bss.config import NamedArgs
    from bss.losses import build_loss

    with pytest.raises(ConfigError, match=r"'criterion.args.alpha' must be a finite number, got 'abc'"):
        build_loss(NamedArgs("TverskyLoss", {"alpha": "abc", "beta": 0.5}))


def test_a_tab_is_one_error_line_naming_the_file_line_and_column(tmp_path):

    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nmodel:\n\targs: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert text.startswith(f"{path}, line 3, column 1: not valid YAML") and "tab" in text and "\n" not in text, text
    run = run_driver("train.py", "--config", path, "--no-mlflow", "--output-dir", tmp_path / "out")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith(f"error: {path}, line 3, column 1"), run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_an_unclosed_bracket_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nmodel: {args: {a: 1}\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line \d+, column \d+: not valid YAML: expected ',' or '\}'") as err:
        load_config(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"override 'epochs=\[1': the value is not valid YAML"):
        parse_overrides(["epochs=[1"])
