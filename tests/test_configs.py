"""Every config file composes and runs on the smoke protocol; typed checks catch bad keys."""

from __future__ import annotations

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

from cl_bench import CLBenchError
from cl_bench.runner import Runner
from tests.conftest import compose_cfg, conf_options


def supported_scenarios(strategy: str) -> list[str]:
    from hydra.utils import get_object

    cfg = compose_cfg(f"strategy={strategy}")
    return list(get_object(cfg.strategy._target_).scenarios)


@pytest.mark.parametrize("strategy", conf_options("strategy"))
def test_every_strategy_runs_on_smoke(strategy, tmp_path):
    """Each strategy config runs in the first scenario its class supports (class_il for most)."""
    scenario = supported_scenarios(strategy)[0]
    s = Runner(compose_cfg("experiment=smoke", f"strategy={strategy}", f"scenario={scenario}"), tmp_path).run()
    assert np.isfinite(np.asarray(s["accuracy_matrix"])).all()


def test_unsupported_scenario_fails_before_training(tmp_path):
    from cl_bench.strategies.finetune import Finetune

    class TaskOnly(Finetune):
        scenarios = ("task_il",)

    from cl_bench.data.digits import split_digits
    from cl_bench.models.mlp import MLP

    stream = split_digits(scenario="class_il")
    with pytest.raises(CLBenchError, match="does not support scenario=class_il"):
        TaskOnly().setup(MLP(stream.input_shape, stream.num_outputs), stream, compose_cfg().train, "cpu")


@pytest.mark.parametrize("dataset", conf_options("dataset"))
def test_every_dataset_runs_on_smoke(dataset, tmp_path):
    """File-backed datasets run their real loaders on small files written in the real format."""
    from tests.real_format import prepare

    files = prepare(dataset, tmp_path / "data")
    s = Runner(compose_cfg("experiment=smoke", f"dataset={dataset}", *files), tmp_path / "run").run()
    R = np.asarray(s["accuracy_matrix"])
    assert np.isfinite(R).all() and R.shape[0] == s["num_tasks"]


# VGG-16 and AlexNet (134M / 57M parameters): no checkpoints (half a gigabyte each) and one step per task
HEAVY = {"vgg16": ("checkpoint=false", "dataset.max_train_per_class=4"),
         "alexnet": ("checkpoint=false", "dataset.max_train_per_class=4")}


@pytest.mark.parametrize("backbone", conf_options("backbone"))
def test_every_backbone_runs_on_smoke(backbone, tmp_path):
    s = Runner(compose_cfg("experiment=smoke", f"backbone={backbone}", *HEAVY.get(backbone, ())), tmp_path).run()
    assert s["parameters"] > 0


def test_misspelled_top_level_key_fails():
    with pytest.raises(ConfigCompositionException, match="sed"):
        compose_cfg("sed=1")


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg("train.epochs=many")
    assert "train.epochs" in str(info.value.__cause__) or "epochs" in str(info.value)


def test_unknown_scenario_fails():
    with pytest.raises(ConfigCompositionException):
        compose_cfg("scenario=online")


def test_unknown_strategy_argument_fails_naming_the_key(tmp_path):
    with pytest.raises(CLBenchError, match=r"strategy\.lamda"):
        Runner(compose_cfg("+strategy.lamda=1"), tmp_path).run()


def test_wrong_type_for_target_argument_fails(tmp_path):
    with pytest.raises(CLBenchError, match=r"backbone\.dropout"):
        Runner(compose_cfg("backbone.dropout=lots"), tmp_path).run()


def test_bad_values_fail_before_training(tmp_path):
    for override, message in [
        ("train.epochs=0", "train.epochs"),
        ("train.lr=-1", "train.lr"),
        ("dataset.num_tasks=3", "num_tasks"),
        ("dataset.val_fraction=1.5", "val_fraction"),
        ("backbone.hidden_sizes=[]", "hidden_sizes"),
    ]:
        with pytest.raises(CLBenchError, match=message):
            Runner(compose_cfg(override), tmp_path / "x").run()
        assert not (tmp_path / "x" / "metrics.json").exists()
