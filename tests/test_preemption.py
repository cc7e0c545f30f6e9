"""Long runs and preemption: mid-task checkpoints, stop signals, timing across resumes.

A run stopped mid-epoch (a stop signal at a step boundary, or SIGKILL after a mid-task
checkpoint) and started again on its folder must end bit-identical on the CPU to an
uninterrupted run: the accuracy matrix and the final weights, for every strategy.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import get_object

from cl_bench import CLBenchError
from cl_bench.runner import CHECKPOINT, Runner, RunInterrupted, parse_checkpoint_every
from tests.conformance_cases import BACKBONES, COST, OPTIMIZERS
from tests.conftest import compose_cfg, conf_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 tasks x 5 classes x 8 samples, batch 16: 3 steps per epoch (16 + 16 + 8), 2 epochs.
SMALL = (
    "experiment=smoke", "dataset.num_tasks=2", "dataset.max_train_per_class=8", "train.batch_size=16",
    "train.epochs=2", "device.num_threads=1", "seed=1",
)
# The cheapest settings that keep each method's mechanism (generators: fewer passes).
CHEAP = {**COST, "vcl": ("strategy.test_samples=2",)}


def strategy_overrides(strategy: str) -> tuple[str, ...]:
    cls = get_object(compose_cfg(f"strategy={strategy}").strategy._target_)
    scenario = next(s for s in ("class_il", "task_il", "domain_il") if s in cls.scenarios)
    return (f"strategy={strategy}", f"scenario={scenario}", *SMALL, *CHEAP.get(strategy, ()))


class SignalAt(Runner):
    """The real Runner; the process sends itself `signum` right after training step
    `at_step` (counted within task `at_task`)."""

    def __init__(self, cfg, folder, at_task: int, at_step: int, signum=signal.SIGTERM) -> None:
        super().__init__(cfg, folder)
        self.at, self.signum, self.counts = (at_task, at_step), signum, {}

    def build(self) -> None:
        super().build()
        train_step = self.strategy.train_step

        def step(batch):
            out = train_step(batch)
            task = batch.task.id
            self.counts[task] = self.counts.get(task, 0) + 1
            if (task, self.counts[task]) == self.at:
                self.hit()
            return out

        self.strategy.train_step = step

    def hit(self) -> None:
        os.kill(os.getpid(), self.signum)


def final_state(runner: Runner) -> dict:
    return {k: v.detach().cpu().clone() for k, v in runner.strategy.model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def without_times(value):
    """`value` without the wall times strategies report (e.g. generator_train_s)."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if not (str(k).endswith("_s") or "_s_" in str(k))}
    if isinstance(value, list):
        return [without_times(v) for v in value]
    return value


def run_to_end(cfg, folder: Path) -> tuple[dict, dict]:
    runner = Runner(cfg, folder)
    summary = runner.run()
    return summary, final_state(runner)


# ----- every strategy, interrupted mid-epoch in-process ---------------------------------------
@pytest.mark.parametrize("strategy", conf_options("strategy"))
def test_sigterm_mid_epoch_then_resume_is_bit_identical(strategy, tmp_path):
    overrides = strategy_overrides(strategy)
    reference, reference_state = run_to_end(compose_cfg(*overrides), tmp_path / "reference")

    folder = tmp_path / "interrupted"
    runner = SignalAt(compose_cfg(*overrides), folder, at_task=1, at_step=4)
    with pytest.raises(RunInterrupted) as info:
        runner.run()
    exc = info.value
    assert exc.exit_code == 143 and "\n" not in str(exc)
    assert str(exc).startswith("interrupted by SIGTERM in task 1, epoch ") and "run the same command" in str(exc)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # our handler is gone again
    assert not (folder / "metrics.json").exists()
    ckpt = torch.load(folder / CHECKPOINT, weights_only=False)
    assert ckpt["progress"]["tasks_done"] == 1 and ckpt["mid"]["task"] == 1 and ckpt["mid"]["steps"] == 4

    resumed, resumed_state = run_to_end(compose_cfg(*overrides), folder)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert without_times(resumed["train_log"]) == without_times(reference["train_log"])
    assert_same_state(resumed_state, reference_state)


# The publication protocol: batch norm in every block, SGD with momentum and weight decay
# (its momentum carried across tasks too) and AdamW. A few strategies of each family run
# fast; every strategy runs in the exhaustive tier.
PROTOCOL_FAST = ("finetune", "ewc", "si", "er", "lwf", "icarl", "packnet", "hat")


def protocol_cases() -> list:
    cases = []
    for strategy in conf_options("strategy"):
        for optimizer in ("sgd", "sgd_keep", "adamw"):
            fast = strategy in PROTOCOL_FAST and optimizer == "sgd_keep"
            marks = () if fast else (pytest.mark.exhaustive,)
            cases.append(pytest.param(strategy, optimizer, marks=marks, id=f"{strategy}-resnet_bn-{optimizer}"))
    return cases


@pytest.mark.parametrize("strategy, optimizer", protocol_cases())
def test_mid_epoch_resume_is_bit_identical_on_batch_norm_with_momentum_and_adamw(strategy, optimizer, tmp_path):
    overrides = (*strategy_overrides(strategy), *BACKBONES["resnet_bn"], *OPTIMIZERS[optimizer])
    try:
        reference, reference_state = run_to_end(compose_cfg(*overrides), tmp_path / "reference")
    except CLBenchError as exc:  # the MLP-only methods (PNN, DEN, VCL, AGS-CL) refuse it: their MLP then
        assert "backbone=mlp" in str(exc), exc
        overrides = (*strategy_overrides(strategy), *BACKBONES["mlp"], *OPTIMIZERS[optimizer])
        reference, reference_state = run_to_end(compose_cfg(*overrides), tmp_path / "reference_mlp")
    folder = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted):
        SignalAt(compose_cfg(*overrides), folder, at_task=1, at_step=4).run()
    resumed, resumed_state = run_to_end(compose_cfg(*overrides), folder)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert_same_state(resumed_state, reference_state)  # batch-norm running statistics included


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler, as in a terminal (a shell starts background jobs, e.g. CI
    under nohup, with SIGINT ignored, and the runner leaves an ignored signal alone)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_between_steps_in_the_first_task_and_resume(tmp_path, python_sigint):
    overrides = strategy_overrides("si")
    reference, reference_state = run_to_end(compose_cfg(*overrides), tmp_path / "reference")
    folder = tmp_path / "interrupted"
    with pytest.raises(RunInterrupted) as info:
        SignalAt(compose_cfg(*overrides), folder, at_task=0, at_step=2, signum=signal.SIGINT).run()
    assert info.value.exit_code == 130 and "SIGINT in task 0, epoch 0 (step 2)" in str(info.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed, resumed_state = run_to_end(compose_cfg(*overrides), folder)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert_same_state(resumed_state, reference_state)


def test_a_signal_outside_the_training_loop_stops_after_the_task(tmp_path, monkeypatch):
    """A signal during the evaluation stops after that task's evaluation and checkpoint."""
    import cl_bench.runner as runner_module

    overrides = strategy_overrides("finetune")
    evaluate, calls = runner_module.evaluate, []

    def evaluate_then_signal(*args, **kwargs):
        calls.append(1)
        out = evaluate(*args, **kwargs)
        if len(calls) == 2:  # the evaluation after task 0 (the first is the untrained baseline)
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(runner_module, "evaluate", evaluate_then_signal)
    folder = tmp_path / "run"
    with pytest.raises(RunInterrupted) as info:
        Runner(compose_cfg(*overrides), folder).run()
    assert info.value.exit_code == 128 + signal.SIGUSR1 and "SIGUSR1 after task 0" in str(info.value)
    ckpt = torch.load(folder / CHECKPOINT, weights_only=False)
    assert ckpt["progress"]["tasks_done"] == 1 and ckpt["mid"] is None


def test_a_previous_python_handler_is_called_after_the_checkpoint_instead_of_raising(tmp_path):
    """E.g. submitit's requeue handler: it gets the signal once the checkpoint is on disk."""
    overrides = strategy_overrides("ewc")
    folder, seen = tmp_path / "run", []

    def requeue(signum, frame):
        ckpt = torch.load(folder / CHECKPOINT, weights_only=False)
        seen.append((signum, ckpt["mid"]["task"], ckpt["mid"]["steps"]))

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        summary = SignalAt(compose_cfg(*overrides), folder, at_task=1, at_step=2, signum=signal.SIGUSR2).run()
        assert signal.getsignal(signal.SIGUSR2) is requeue  # restored when the run ended
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, 1, 2)]
    assert summary["status"] == "completed"  # the handler returned: the run went on


def test_checkpoint_false_saves_nothing_and_says_so(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(RunInterrupted) as info:
        SignalAt(compose_cfg(*strategy_overrides("finetune"), "checkpoint=false", "checkpoint_every=1steps"),
                 folder, at_task=0, at_step=1).run()
    assert "nothing was saved" in str(info.value)
    assert not (folder / CHECKPOINT).exists()


# ----- checkpoint_every -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected",
    [("", None), ("2epochs", ("epochs", 2)), ("1epoch", ("epochs", 1)), ("500steps", ("steps", 500)),
     ("30min", ("seconds", 1800.0)), ("90s", ("seconds", 90.0)), ("1h", ("seconds", 3600.0))],
)
def test_checkpoint_every_forms(value, expected):
    assert parse_checkpoint_every(value) == expected


@pytest.mark.parametrize("value", ["2", "often", "0steps", "1.5epochs", "-3min", "5 parsecs"])
def test_a_bad_checkpoint_every_is_refused_before_anything_runs(value, tmp_path):
    runner = Runner(compose_cfg("experiment=smoke", f"checkpoint_every={value}"), tmp_path / "run")
    with pytest.raises(CLBenchError) as info:
        runner.prepare()
    message = str(info.value)
    assert "checkpoint_every" in message and "500steps" in message and "\n" not in message
    assert not (tmp_path / "run").exists()


def saves_during(tmp_path, every: str, monkeypatch, clock=None) -> list[tuple]:
    """(task, epoch, batch) of each mid-task save of a finetune run."""
    saved = []
    original = Runner._save_mid

    def spy(self, task, position):
        saved.append((task.id, position["epoch"], position["batch"]))
        if clock is not None:
            clock.append(time.monotonic())
        return original(self, task, position)

    monkeypatch.setattr(Runner, "_save_mid", spy)
    Runner(compose_cfg(*strategy_overrides("finetune"), f"checkpoint_every={every}"), tmp_path / every).run()
    return saved


def test_checkpoint_every_epochs(tmp_path, monkeypatch):
    assert saves_during(tmp_path, "1epochs", monkeypatch) == [(t, e, 0) for t in range(2) for e in (1, 2)]
    assert saves_during(tmp_path, "2epochs", monkeypatch) == [(t, 2, 0) for t in range(2)]


def test_checkpoint_every_steps(tmp_path, monkeypatch):
    # 3 steps per epoch; the count restarts at every save, the between-task ones included
    assert saves_during(tmp_path, "2steps", monkeypatch) == [(t, e, b) for t in range(2) for e, b in ((0, 2), (1, 1), (1, 3))]


def test_checkpoint_every_wall_time(tmp_path, monkeypatch):
    """At the first step boundary at least that long after the last save."""
    fake = [0.0]
    monkeypatch.setattr("cl_bench.runner._monotonic", lambda: fake[0])
    import cl_bench.runner as runner_module

    train = runner_module.Runner._train_task

    def slow_clock_train(self, task, bar):
        step = self.strategy.train_step

        def ticking(batch):
            fake[0] += 40.0  # every step "takes" 40 s
            return step(batch)

        self.strategy.train_step = ticking
        try:
            return train(self, task, bar)
        finally:
            self.strategy.train_step = step

    monkeypatch.setattr(Runner, "_train_task", slow_clock_train)
    # 90 s: the third step after each save (120 s >= 90 s); between-task saves reset the clock
    assert saves_during(tmp_path, "90s", monkeypatch) == [(t, e, b) for t in range(2) for e, b in ((0, 3), (1, 3))]


def test_no_checkpoint_every_means_no_mid_task_save(tmp_path, monkeypatch):
    assert saves_during(tmp_path, "", monkeypatch) == []


# ----- timing ---------------------------------------------------------------------------------
def test_timing_adds_up_over_the_processes(tmp_path):
    overrides = strategy_overrides("finetune")
    folder = tmp_path / "run"
    runner = SignalAt(compose_cfg(*overrides), folder, at_task=1, at_step=5)
    with pytest.raises(RunInterrupted):
        runner.run()
    first = torch.load(folder / CHECKPOINT, weights_only=False)["mid"]
    assert first["elapsed_s"] > 0 and first["train_s"] > 0
    resumed = Runner(compose_cfg(*overrides), folder)
    summary = resumed.run()
    timing = summary["timing"]
    assert timing["total_s"] >= first["elapsed_s"]
    assert timing["train_s"][1] >= first["train_s"]  # the task's time before the interruption counts
    assert len(timing["train_s"]) == len(timing["eval_s"]) == 2


def test_rerun_of_a_finished_folder_rewrites_nothing(tmp_path):
    overrides = strategy_overrides("finetune")
    folder = tmp_path / "run"
    first = Runner(compose_cfg(*overrides), folder).run()
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    again = Runner(compose_cfg(*overrides), folder).run()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == files
    assert again["timing"] == json.loads(json.dumps(first["timing"]))


# ----- real processes -------------------------------------------------------------------------
CLI_ARGS = ("experiment=smoke", "dataset.max_train_per_class=40", "train.epochs=3", "train.batch_size=8",
            "device.num_threads=1", "strategy=si")


def clbench(folder: Path, *extra: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cl_bench.cli", "run", *CLI_ARGS, f"hydra.run.dir={folder}", *extra],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_mid_task_checkpoint(proc: subprocess.Popen, folder: Path, task: int) -> None:
    """Poll until the checkpoint on disk is a mid-task one of `task` (no wall-clock limit:
    the process ending first fails the test)."""
    path = folder / CHECKPOINT
    while proc.poll() is None:
        if path.exists():
            try:
                ckpt = torch.load(path, weights_only=False)
            except Exception:
                ckpt = None  # replaced while reading
            if ckpt and ckpt["mid"] is not None and ckpt["mid"]["task"] >= task and ckpt["mid"]["batch"] > 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"the run ended before a mid-task checkpoint: {proc.stderr.read()}")


@pytest.fixture(scope="module")
def reference_matrix(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("reference")
    proc = clbench(root / "run", cwd=root)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return (root / "run" / "accuracy_matrix.csv").read_bytes()


def test_sigkill_mid_epoch_then_rerun_gives_the_same_matrix(tmp_path, reference_matrix):
    folder = tmp_path / "run"
    proc = clbench(folder, "checkpoint_every=1steps", cwd=tmp_path)
    wait_for_mid_task_checkpoint(proc, folder, task=1)
    proc.kill()
    proc.communicate()
    assert not (folder / "metrics.json").exists()
    again = clbench(folder, "checkpoint_every=1steps", cwd=tmp_path)
    _, err = again.communicate()
    assert again.returncode == 0, err
    assert "resuming" in err and "continues at epoch" in err
    assert (folder / "accuracy_matrix.csv").read_bytes() == reference_matrix


def test_sigterm_exits_143_with_one_line_and_resumes(tmp_path, reference_matrix):
    folder = tmp_path / "run"
    proc = clbench(folder, "checkpoint_every=1steps", cwd=tmp_path)
    wait_for_mid_task_checkpoint(proc, folder, task=1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("clbench: interrupted by SIGTERM"), err
    assert "run the same command" in lines[0]
    again = clbench(folder, cwd=tmp_path)  # checkpoint_every may change between the two
    _, err = again.communicate()
    assert again.returncode == 0, err
    assert (folder / "accuracy_matrix.csv").read_bytes() == reference_matrix


# ----- training controls: the lr schedule, clipping, validation and early stopping resume exactly -----
# VCL draws random numbers in its predict (validation forks the RNG) and, at this lr, stops its
# tasks early; finetune runs every epoch. The schedule's warm-up and decay cross the interruption.
CONTROLS = (
    "train.epochs=5", "dataset.val_fraction=0.25", "train.patience=1", "train.lr=0.05", "train.momentum=0.9",
    "train.scheduler=multistep", "train.milestones=[2]", "train.warmup_epochs=1", "train.clip_grad_norm=2.0",
)


class DieAt(SignalAt):
    """The process dies (an exception that nothing catches) right after step `at_step` of task `at_task`."""

    def hit(self) -> None:
        raise KeyboardInterrupt("killed")


@pytest.mark.parametrize("strategy, at_step, how", [
    ("vcl", 3, "signal"),  # mid-epoch, after one validation of the task
    ("vcl", 4, "signal"),  # at the last step of an epoch, before its validation
    ("finetune", 5, "signal"),
    ("vcl", 5, "kill_after_epoch_save"),  # the snapshot of checkpoint_every=1epochs (after the validation)
])
def test_resume_with_validation_early_stopping_and_a_schedule_is_bit_identical(tmp_path, strategy, at_step, how):
    overrides = (*strategy_overrides(strategy), *CONTROLS)
    reference, reference_state = run_to_end(compose_cfg(*overrides), tmp_path / "reference")
    if strategy == "vcl":
        assert any(log["early_stopping"]["stopped_early"] for log in reference["train_log"])
    folder = tmp_path / "interrupted"
    if how == "signal":
        with pytest.raises(RunInterrupted):
            SignalAt(compose_cfg(*overrides), folder, at_task=1, at_step=at_step).run()
    else:
        with pytest.raises(KeyboardInterrupt):
            DieAt(compose_cfg(*overrides, "checkpoint_every=1epochs"), folder, at_task=1, at_step=at_step).run()
    mid = torch.load(folder / CHECKPOINT, weights_only=False)["mid"]
    assert mid is not None and mid["task"] == 1 and mid["controls"]["val"]  # a validation is in the snapshot
    resumed, resumed_state = run_to_end(compose_cfg(*overrides), folder)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert without_times(resumed["train_log"]) == without_times(reference["train_log"])
    assert_same_state(resumed_state, reference_state)
