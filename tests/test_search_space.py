"""bss.search.space: search-space YAML -> validated distributions; one clear error per mistake."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bss.config import load_config  # noqa: E402
from bss.errors import ConfigError  # noqa: E402
from bss.search.space import load_space, parse_space  # noqa: E402

BASE = load_config(REPO / "config.yaml").to_dict()


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def space(**params) -> dict:
    return {"params": params or {"learning_rate": {"loguniform": [1e-4, 1e-2]}}}


@pytest.mark.parametrize("name", ["cpu.yaml", "default.yaml"])
def test_shipped_spaces_are_valid(name):
    s = load_space(REPO / "search_spaces" / name, BASE)
    keys = [p.key for p in s.params]
    assert "learning_rate" in keys and "criterion.args.alpha" in keys and "criterion.args.beta" in keys
    assert any("encoder_name" in k or k == "model.args" for k in keys)
    lr = next(p for p in s.params if p.key == "learning_rate")
    assert lr.kind == "loguniform" and lr.optuna().log


def test_distributions_and_apply(tmp_path):
    s = load_space(
        write(
            tmp_path,
            {
                "fixed": {"epochs": 3, "model.args.encoder_depth": 3, "model.args.decoder_channels": [32, 16, 8]},
                "params": {
                    "learning_rate": {"loguniform": ["1e-4", 0.01]},  # YAML reads 1e-4 as a string
                    "criterion.args.alpha": {"uniform": [0.1, 0.9]},
                    "batch_size": {"choice": [4, 8]},
                    "epochs": {"int": [2, 6]},
                    "image_size": {"choice": {"small": [64, 64], "wide": [64, 96]}},
                    "model.args": {
                        "choice": {"r18": {"encoder_name": "resnet18", "encoder_weights": None}, "r34": {"encoder_name": "resnet34", "encoder_weights": None}}
                    },
                },
            },
        ),
        BASE,
    )
    dists = s.optuna_space()
    assert dists["learning_rate"].low == pytest.approx(1e-4) and dists["learning_rate"].log
    assert list(dists["image_size"].choices) == ["small", "wide"]
    cfg = s.apply(BASE, {"learning_rate": 0.003, "criterion.args.alpha": 0.25, "batch_size": 8, "epochs": 4, "image_size": "wide", "model.args": "r34"})
    assert cfg["learning_rate"] == 0.003 and cfg["epochs"] == 4 and cfg["batch_size"] == 8
    assert cfg["image_size"] == [64, 96]
    assert cfg["criterion"]["args"] == {"alpha": 0.25, "beta": 0.7}  # beta kept from the base
    # a mapping choice merges into the base's model.args: other keys (dropout) and fixed ones stay
    assert cfg["model"]["args"]["encoder_name"] == "resnet34" and cfg["model"]["args"]["dropout"] == 0.2
    assert cfg["model"]["args"]["encoder_depth"] == 3 and cfg["model"]["args"]["encoder_weights"] is None


@pytest.mark.parametrize(
    "data, message",
    [
        (space(learning_rat={"loguniform": [1e-4, 1e-2]}), "unknown config key 'learning_rat'. Did you mean 'learning_rate'?"),
        (space(**{"criterion.argz.alpha": {"uniform": [0, 1]}}), "unknown config key 'criterion.argz.alpha'. Did you mean 'criterion.args.alpha'?"),
        (space(learning_rate={"loguniform": [0, 1e-2]}), "params.learning_rate: loguniform needs 0 < low"),
        (space(learning_rate={"loguniform": [1e-2, 1e-4]}), "needs low < high"),
        (space(learning_rate={"log_uniform": [1e-4, 1e-2]}), "unknown distribution 'log_uniform'. Did you mean 'loguniform'?"),
        (space(learning_rate={"uniform": [1e-4]}), "uniform takes [low, high]"),
        (space(learning_rate={"uniform": ["a", 1]}), "bound 'a' is not a number"),
        (space(learning_rate=0.001), "is not a distribution"),
        (space(epochs={"int": [1.5, 4]}), "int takes integer bounds"),
        (space(batch_size={"choice": []}), "choice needs at least one value"),
        (
            space(image_size={"choice": [[64, 64], [100, 100]]}),
            "params.image_size = '[100,100]': config key 'image_size' must be [height, width] with each a positive multiple of 32",
        ),
        (space(batch_size={"choice": [8, "big"]}), "config key 'batch_size' must be int"),
        (space(**{"model.args.encoder_name": {"choice": ["resnet18", "resnet181"]}}), "unknown encoder 'resnet181'"),
        (space(train_dataset={"choice": ["a", "b"]}), "'train_dataset' is set by the search loop"),
        (space(**{"learning_rate.x": {"uniform": [0, 1]}}), "'learning_rate.x' goes below 'learning_rate', which is not a mapping"),
        ({"params": {"learning_rate": {"uniform": [0, 1]}}, "schedular": {}}, "unknown section 'schedular'. Did you mean 'scheduler'?"),
        ({"params": {"learning_rate": {"uniform": [0, 1]}}, "scheduler": {"grace": 1}}, "scheduler: unknown option 'grace'. Did you mean 'grace_period'?"),
        ({"params": {"learning_rate": {"uniform": [0, 1]}}, "searcher": {"algorithm": "bayes"}}, "searcher.algorithm: invalid value 'bayes'"),
        ({"params": {}}, "params: the space needs at least one searched key"),
        ({"fixed": {"epoch": 3}, "params": {"learning_rate": {"uniform": [0, 1]}}}, "fixed: unknown config key 'epoch'. Did you mean 'epochs'?"),
    ],
)
def test_mistakes_give_one_clear_error(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_space(path, BASE)
    text = str(info.value)
    assert message in text
    assert text.startswith(f"search space {path}")
    assert "\n" not in text


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_space(tmp_path / "nope.yaml", BASE)


def test_not_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("params: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(path, BASE)


def test_nested_params_overlap():
    with pytest.raises(ConfigError, match="lies inside"):
        parse_space({"params": {"model.args": {"choice": [{"encoder_name": "resnet18"}]}, "model.args.encoder_name": {"choice": ["resnet18"]}}})


# --------------------------------------------------------------------------- searchers


def test_searchers_build_what_the_tuner_needs(tmp_path):
    from bss.errors import BSSError
    from bss.search.searchers import SEARCHERS, SPACE_SEARCHERS, get_searcher
    from bss.search.trial import TrialContext

    assert SPACE_SEARCHERS == ("tpe", "random") and set(SEARCHERS) == {"tpe", "random", "replicas"}
    sp = parse_space({**space(), "searcher": {"algorithm": "tpe", "trials": 5, "n_startup_trials": 4, "multivariate": False}})
    context = TrialContext(base=BASE, space=sp, rule=None, trials_dir=str(tmp_path), seed=7, iteration=0)
    alg, param_space, samples = get_searcher("tpe").build(context, 5, [{"learning_rate": 1e-3}])
    assert param_space is None and samples == 5
    sampler = get_searcher("tpe").sampler(sp, 7)
    assert type(sampler).__name__ == "TPESampler" and sampler._n_startup_trials == 4  # the space's searcher options
    assert type(get_searcher("random").sampler(sp, 7)).__name__ == "RandomSampler"
    alg, param_space, samples = get_searcher("replicas").build(context, 3, None)
    assert alg is None and samples == 1 and param_space["replica"] == {"grid_search": [1, 2, 3]}
    with pytest.raises(BSSError, match="unknown searcher 'bayes'; choose one of: tpe, random, replicas"):
        get_searcher("bayes")


def test_a_tab_in_a_space_is_one_line_naming_the_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("params:\n  learning_rate:\n\ttype: loguniform\n")
    with pytest.raises(ConfigError) as err:
        load_space(path, BASE)
    text = str(err.value)
    assert text.startswith(f"{path}, line 3, column 1: not valid YAML") and "replace the tab with spaces" in text and "\n" not in text, text
