"""The live progress display: the training bar of each task and a line per long strategy phase.

Each run goes through `Runner` with the display on (`progress=true`) and a recording,
non-terminal rich Console; the runner's rich `Progress` is kept so its bars (one rich
task per training bar and per strategy phase, in the order they were added) can be
checked once the run is over: every expected phase of every task with its description
and its total, known in advance, and reached.
"""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from cl_bench.runner import Runner
from cl_bench.strategies.base import PhaseProgress, Strategy
from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("train.epochs=2", "dataset.max_train_per_class=20", "device.num_threads=1", "checkpoint=false")


def batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


# For each strategy: its overrides and, per task, the lines the task shows in order:
# TRAIN (its training bar) and its phases as (description, total); total None: any total
# known in advance, reached.
TRAIN = ("", None)


def ewc_phases(task, strategy, cfg):
    return [TRAIN, ("Fisher", min(strategy.fisher_samples or len(task.train), len(task.train)))]  # samples


def mas_phases(task, strategy, cfg):
    return [TRAIN, ("MAS importance", len(task.train))]  # num_samples=0: all of them


def dgr_phases(task, strategy, cfg):  # generator_passes=1
    return [TRAIN, ("generator training", cfg.train.epochs * batches(len(task.train), strategy.generator_batch_size))]


def packnet_phases(task, strategy, cfg):
    total = strategy.retrain_epochs * batches(len(task.train), cfg.train.batch_size)
    return [TRAIN, ("retraining after pruning", total)]


def bic_phases(task, strategy, cfg):
    bias = [("bias correction", strategy.bias_epochs)] if task.id > 0 else []  # no old classes at task 0
    return [TRAIN, *bias, ("herding exemplars", len(task.train))]


def eeil_phases(task, strategy, cfg):
    finetune = [("balanced fine-tuning", None)] if task.id > 0 else []
    return [TRAIN, *finetune, ("herding exemplars", len(task.train))]


def icarl_phases(task, strategy, cfg):
    return [TRAIN, ("herding exemplars", len(task.train))]


def vcl_phases(task, strategy, cfg):
    bs, epochs, k = cfg.train.batch_size, cfg.train.epochs, strategy.coreset_size
    init = [("maximum-likelihood init", epochs * batches(len(task.train) - k, bs))] if task.id == 0 else []
    return [*init, TRAIN, ("coreset training", epochs * batches((task.id + 1) * k, bs))]


CASES = {
    "dgr": (["strategy=dgr", "strategy.generator_passes=1"], dgr_phases),
    "ewc": (["strategy=ewc"], ewc_phases),  # the MLP's closed-form Fisher, on all 40 samples of a task
    # a CNN takes torch.func.vmap, in chunks of 64 samples: 70 of the 80 samples are 64 + 6
    "ewc_cnn": (["strategy=ewc", "backbone=cnn", "dataset.max_train_per_class=40", "strategy.fisher_samples=70"],
                ewc_phases),
    "mas": (["strategy=mas"], mas_phases),
    "packnet": (["strategy=packnet", "scenario=task_il", "strategy.retrain_epochs=1"], packnet_phases),
    "bic": (["strategy=bic", "strategy.bias_epochs=30"], bic_phases),
    "eeil": (["strategy=eeil", "strategy.finetune_epochs=2"], eeil_phases),
    "icarl": (["strategy=icarl"], icarl_phases),
    "vcl": (["strategy=vcl", "strategy.coreset_size=5", "strategy.train_samples=2", "strategy.test_samples=4"],
            vcl_phases),
}


def run_with_display(tmp_path, monkeypatch, *overrides):
    """(runner, its rich Progress with every bar it showed, the console's text, and for each
    training bar its (steps done, loss field) after its first update)."""
    kept, first_updates = {}, {}
    original = Runner._progress_bar

    def recording(self):
        bar = original(self)
        kept["bar"] = bar
        update = bar.update

        def update_and_record(task_id, **kw):
            update(task_id, **kw)
            task = next(t for t in bar.tasks if t.id == task_id)
            if task.fields.get("unit") == "steps" and task_id not in first_updates:
                first_updates[task_id] = (task.completed, task.fields["loss"])

        bar.update = update_and_record
        return bar

    monkeypatch.setattr(Runner, "_progress_bar", recording)
    out = io.StringIO()
    cfg = compose_cfg(*TINY, *overrides, "progress=true")
    runner = Runner(cfg, tmp_path / "run", console=Console(file=out, force_terminal=False, width=200))
    runner.run()
    return runner, kept["bar"], out.getvalue(), first_updates


@pytest.mark.parametrize("name", list(CASES))
def test_each_long_phase_has_its_own_line_that_reaches_its_total(tmp_path, monkeypatch, name):
    overrides, phases = CASES[name]
    runner, bar, text, _ = run_with_display(tmp_path, monkeypatch, *overrides)
    expected = []
    for task in runner.stream.tasks:
        for line in phases(task, runner.strategy, runner.cfg):
            expected.append((f"task {task.id}", None) if line is TRAIN else (f"task {task.id}: {line[0]}", line[1]))
    shown = [(t.description, t.total) for t in bar.tasks]
    assert [d for d, _ in shown] == [d for d, _ in expected]
    for (description, total), t in zip(expected, bar.tasks):
        if total is not None:
            assert t.total == total > 0, description
        assert t.completed == t.total, f"{description} stopped at {t.completed}/{t.total}"
    # a non-terminal console gets the final state of every line once the display stops
    assert expected[-1][0] in text
    # no phase object is left on the strategy (the checkpoints snapshot its attributes)
    assert not any(isinstance(v, PhaseProgress) or k == "_reporter" for k, v in vars(runner.strategy).items())


def test_training_bar_advances_per_step_and_shows_no_loss_before_the_first_epoch_ends(tmp_path, monkeypatch):
    runner, bar, text, first_updates = run_with_display(tmp_path, monkeypatch, "strategy=ewc")
    training = [t for t in bar.tasks if t.fields["unit"] == "steps"]
    assert len(training) == len(runner.stream)
    for task, t in zip(runner.stream.tasks, training):
        steps = runner.cfg.train.epochs * batches(len(task.train), runner.cfg.train.batch_size)
        assert t.total == t.completed == steps
        assert t.fields["loss"].startswith("loss ") and "nan" not in t.fields["loss"]
        # the bar moves with the first step (of 2 x 2 here), with an empty loss field until an
        # epoch's mean exists
        assert first_updates[t.id] == (1, "")
    assert "nan" not in text


def test_progress_without_a_display_does_nothing():
    strategy = Strategy()
    with strategy.progress("Fisher", total=3) as advance:
        for _ in range(3):
            advance()
    assert isinstance(strategy.progress("x"), PhaseProgress)


def test_display_off_runs_the_phases_unshown(run_cfg):
    summary = run_cfg(*TINY, "strategy=bic", "strategy.bias_epochs=5", "progress=false")
    assert len(summary["accuracy_matrix"]) == 5
