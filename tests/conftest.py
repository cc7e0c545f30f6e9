"""Shared fixtures: real configs composed from conf/ with small overrides."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)

CONF = files("cl_bench.conf")


def conf_options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in CONF.joinpath(group).iterdir() if p.name.endswith(".yaml"))


def compose_cfg(*overrides: str):
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


def run(tmp_path: Path, *overrides: str, name: str = "run") -> dict:
    from cl_bench.runner import Runner

    return Runner(compose_cfg(*overrides), tmp_path / name).run()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on small batches gain nothing from intra-op threads, and on a busy
    2-core machine two threads spin-wait; modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cfg(tmp_path):
    def _run(*overrides: str, name: str = "run") -> dict:
        return run(tmp_path, *overrides, name=name)

    return _run


class Killed(Exception):
    """Stands for the process dying: raised when a chosen task starts training."""


def run_killed_and_resumed(tmp_path: Path, monkeypatch, overrides, kill_at_task: int) -> tuple[dict, dict]:
    """(uninterrupted run, run killed as task `kill_at_task` starts and then resumed on its folder).

    Checks on the way that the killed run left its checkpoint and no result files.
    """
    from cl_bench.runner import CHECKPOINT, Runner

    reference = Runner(compose_cfg(*overrides), tmp_path / "reference").run()
    original = Runner._train_task

    def die_at_task(self, task, bar):
        if task.id == kill_at_task:
            raise Killed()
        return original(self, task, bar)

    folder = tmp_path / "killed"
    monkeypatch.setattr(Runner, "_train_task", die_at_task)
    with pytest.raises(Killed):
        Runner(compose_cfg(*overrides), folder).run()
    assert (folder / CHECKPOINT).exists()
    assert not (folder / "metrics.json").exists()
    monkeypatch.setattr(Runner, "_train_task", original)
    resumed = Runner(compose_cfg(*overrides), folder).run()
    return reference, resumed


def spy_frozen_teacher(monkeypatch, strategy_cls, attribute: str) -> list:
    """Patch `strategy_cls.train_step` to assert, at every step that has one, that the
    teacher (`self.<attribute>`, the previous model) is in eval mode and that the step left
    its state (weights and batch-norm statistics) unchanged. Returns the list of checked steps."""
    import torch

    original, checked = strategy_cls.train_step, []

    def train_step(self, batch):
        teacher = getattr(self, attribute)
        before = None if teacher is None else {k: v.clone() for k, v in teacher.state_dict().items()}
        out = original(self, batch)
        if teacher is not None:
            assert not teacher.training
            after = teacher.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
            checked.append(1)
        return out

    monkeypatch.setattr(strategy_cls, "train_step", train_step)
    return checked
