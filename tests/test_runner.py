"""Behaviour of the runner and the two baseline strategies on Split Digits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cl_bench.results import read_matrix
from cl_bench.runner import CHECKPOINT, Runner
from tests.conftest import compose_cfg, run_killed_and_resumed


def test_default_run_writes_results(run_cfg, tmp_path):
    summary = run_cfg()
    out = tmp_path / "run"
    R = read_matrix(out / "accuracy_matrix.csv")
    assert R.shape == (5, 5)
    assert np.isfinite(R).all() and ((R >= 0) & (R <= 1)).all()
    np.testing.assert_allclose(R, np.asarray(summary["accuracy_matrix"]), atol=1e-6)
    frame = pd.read_csv(out / "accuracy_matrix.csv", index_col=0)
    assert list(frame.columns) == [f"task_{j}" for j in range(5)]
    assert list(frame.index) == [f"after_task_{i}" for i in range(5)]
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("acc", "bwt", "fwt", "forgetting", "avg_inc_acc"):
        assert saved["metrics"][key] == pytest.approx(summary["metrics"][key])
    assert saved["strategy"] == "finetune" and saved["scenario"] == "class_il"
    assert saved["parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert len(saved["timing"]["train_s"]) == 5 and len(saved["random_init_accuracy"]) == 5
    assert saved["versions"]["torch"]
    # class-IL runs also record the task-aware view
    assert (out / "accuracy_matrix_task_aware.csv").exists()
    assert "Accuracy matrix" in (out / "results.md").read_text()
    # no temporary files left behind by the atomic writes
    assert not list(out.glob(".*.tmp"))


def test_each_task_beats_chance_right_after_training(run_cfg):
    R = np.asarray(run_cfg()["accuracy_matrix"])
    # chance in class-IL over 10 outputs is 0.1; a 2-class digits task is learned almost perfectly
    assert (np.diag(R) > 0.9).all()


def test_same_seed_gives_identical_matrix(run_cfg):
    a = run_cfg("seed=3", name="a")
    b = run_cfg("seed=3", name="b")
    assert np.array_equal(np.asarray(a["accuracy_matrix"]), np.asarray(b["accuracy_matrix"]))
    assert np.array_equal(np.asarray(a["random_init_accuracy"]), np.asarray(b["random_init_accuracy"]))


def test_different_seed_gives_different_model(run_cfg):
    a = run_cfg("seed=0", name="a")
    b = run_cfg("seed=1", name="b")
    assert a["random_init_accuracy"] != b["random_init_accuracy"]


def test_joint_beats_finetune_in_class_il(run_cfg):
    ft = run_cfg("strategy=finetune", name="ft")
    joint = run_cfg("strategy=joint", name="joint")
    assert joint["metrics"]["acc"] > ft["metrics"]["acc"] + 0.5
    assert joint["metrics"]["acc"] > 0.85


def test_finetune_forgets_in_class_il_far_more_than_in_task_il(run_cfg):
    cil = run_cfg("scenario=class_il", name="cil")
    til = run_cfg("scenario=task_il", name="til")
    R_cil, R_til = np.asarray(cil["accuracy_matrix"]), np.asarray(til["accuracy_matrix"])
    assert R_cil[-1, 0] < 0.1  # task 0 is gone after four more tasks
    assert R_til[-1, 0] > 0.8  # with the task id, most of it survives
    assert til["metrics"]["bwt"] > cil["metrics"]["bwt"] + 0.5
    # task-IL has no separate task-aware matrix: its matrix already is one
    assert til["metrics_task_aware"] is None


def test_domain_il_uses_a_shared_two_way_head(run_cfg):
    s = run_cfg("scenario=domain_il")
    assert s["parameters"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 2 + 2
    R = np.asarray(s["accuracy_matrix"])
    assert (np.diag(R) > 0.8).all()


def test_class_order_and_validation_split(run_cfg):
    s = run_cfg("dataset.class_order=random", "dataset.val_fraction=0.2", "seed=5")
    order = s["class_order"]
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert s["classes_per_task"] == [order[i : i + 2] for i in range(0, 10, 2)]
    explicit = run_cfg("dataset.class_order=[9,8,7,6,5,4,3,2,1,0]", name="explicit")
    assert explicit["classes_per_task"][0] == [9, 8]


class _Killed(Exception):
    pass


def test_resume_after_kill_gives_the_same_matrix(tmp_path, monkeypatch):
    overrides = ("train.epochs=2", "seed=7")
    reference = Runner(compose_cfg(*overrides), tmp_path / "reference").run()

    folder = tmp_path / "killed"
    original = Runner._train_task

    def die_on_task_3(self, task, bar):
        if task.id == 3:
            raise _Killed()
        return original(self, task, bar)

    monkeypatch.setattr(Runner, "_train_task", die_on_task_3)
    with pytest.raises(_Killed):
        Runner(compose_cfg(*overrides), folder).run()
    assert (folder / CHECKPOINT).exists()
    assert not (folder / "metrics.json").exists() and not (folder / "accuracy_matrix.csv").exists()

    monkeypatch.setattr(Runner, "_train_task", original)
    trained = []
    monkeypatch.setattr(
        Runner, "_train_task", lambda self, task, bar: trained.append(task.id) or original(self, task, bar)
    )
    resumed = Runner(compose_cfg(*overrides), folder).run()
    assert trained == [3, 4]  # tasks 0-2 came from the checkpoint
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    from cl_bench import CLBenchError

    Runner(compose_cfg("train.epochs=1"), tmp_path / "r").run()
    with pytest.raises(CLBenchError, match="different config"):
        Runner(compose_cfg("train.epochs=2"), tmp_path / "r").run()
    # resume=false starts over in the same folder
    Runner(compose_cfg("train.epochs=2", "resume=false"), tmp_path / "r").run()


def test_optimizer_state_survives_resume_when_not_reset(tmp_path, monkeypatch):
    overrides = ("train.reset_optimizer=false", "train.momentum=0.9", "train.epochs=1")
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))


def test_active_classes_predict_only_among_the_classes_seen_so_far():
    """With train.active_classes the evaluation masks the classes of later tasks: outputs
    rigged to win everywhere are never predicted; without it they take every sample."""
    import torch

    from cl_bench.config import build
    from cl_bench.data.digits import split_digits
    from cl_bench.models.mlp import MLP
    from cl_bench.runner import evaluate

    for active in (True, False):
        torch.manual_seed(0)
        cfg = compose_cfg("strategy=finetune", f"train.active_classes={active}")
        stream = split_digits(scenario="class_il")
        s = build(cfg.strategy, "strategy")
        s.setup(MLP(stream.input_shape, stream.num_outputs), stream, cfg.train, torch.device("cpu"))
        s.begin_task(stream.tasks[1])
        with torch.no_grad():
            s.model.head.bias[4:] += 1e4  # classes of tasks 2-4 win every sample unless masked
        acc, _ = evaluate(s, stream, 512)
        if active:  # predictions among classes 0-3 only
            assert (acc[2:] == 0).all() and acc[:2].sum() > 0
        else:
            assert (acc[:2] == 0).all() and acc[2:].sum() > 0


@pytest.mark.parametrize("deterministic", [True, False])
def test_metrics_record_throughput_peak_memory_and_determinism(deterministic, tmp_path):
    import torch

    cfg = compose_cfg("experiment=smoke", "progress=false", "device.num_threads=1",
                      f"device.deterministic={str(deterministic).lower()}")
    summary = Runner(cfg, tmp_path / "run").run()
    timing = summary["timing"]
    samples = sum(log["samples"] for log in summary["train_log"])
    assert timing["train_samples_per_s"] == pytest.approx(samples / sum(timing["train_s"]))
    runner = Runner(cfg, tmp_path / "sizes")
    runner.build()
    per_eval = sum(len(t.test) for t in runner.stream.tasks)  # every task's test set after each task
    evaluated = per_eval * len(timing["eval_s"])
    assert timing["eval_samples_per_s"] == pytest.approx(evaluated / sum(timing["eval_s"]))
    assert summary["peak_memory_bytes"] > 50 * 2**20  # the process holds torch: at least tens of MiB
    assert summary["deterministic"] is deterministic
    assert torch.backends.cudnn.deterministic is deterministic and torch.backends.cudnn.benchmark is not deterministic
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


@pytest.mark.parametrize("scenario", ["class_il", "task_il"])
@pytest.mark.parametrize("order", ["natural", "seed1993", "[1,0,3,2,5,4,7,6,9,8]"])
def test_evaluate_counts_as_a_plain_argmax_over_each_tasks_outputs(tmp_path, scenario, order):
    """`evaluate` slices a task's consecutive outputs and gathers any others (a class order's
    permuted ones, in their order, which decides ties); both accuracies equal a direct count."""
    import torch

    from cl_bench.runner import evaluate

    runner = Runner(compose_cfg("experiment=smoke", f"scenario={scenario}", f"dataset.class_order={order}"), tmp_path / "r")
    runner.prepare()
    runner._train_task(runner.stream.tasks[0], None)
    strategy, stream = runner.strategy, runner.stream
    acc, acc_aware = evaluate(strategy, stream, 7)  # several batches per task
    with torch.inference_mode():
        for task in stream.tasks:
            scores = strategy.predict(stream.transform(task.test.x), task.id if scenario == "task_il" else None)
            outputs = torch.tensor(task.outputs)
            aware = (outputs[scores[:, outputs].argmax(1)] == task.test.y).double().mean().item()
            plain = (scores.argmax(1) == task.test.y).double().mean().item()
            assert acc_aware[task.id] == pytest.approx(aware, abs=1e-12)
            assert acc[task.id] == pytest.approx(aware if scenario == "task_il" else plain, abs=1e-12)


@pytest.mark.parametrize("outputs", [[0, 1], [4, 5, 6], [3, 1], [2, 4], [7]])
def test_output_columns_select_the_same_columns_and_gradients_as_a_gather(outputs):
    """A slice for a run of consecutive ascending outputs, a gather otherwise; either way the
    values and the gradients are those of indexing with the outputs' list."""
    import torch

    from cl_bench.data.stream import output_columns

    columns = output_columns(outputs, torch.device("cpu"))
    consecutive = outputs == list(range(outputs[0], outputs[0] + len(outputs)))
    assert isinstance(columns, slice) is consecutive
    scores = torch.randn(5, 10, requires_grad=True)
    picked = scores[:, columns]
    reference = scores[:, torch.tensor(outputs)]
    assert torch.equal(picked, reference)
    weights = torch.randn_like(picked)
    (grad,) = torch.autograd.grad((picked * weights).sum(), scores)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), scores)
    assert torch.equal(grad, grad_reference)


def test_each_epoch_starts_in_training_mode_even_when_a_step_left_eval_mode(tmp_path, monkeypatch):
    """The runner calls set_training(True) again at an epoch's start only where a module's
    flag changed: a strategy step that leaves the body in eval mode is undone before the next
    epoch's first step, and with nothing changed the flags are only read."""
    from cl_bench.strategies.base import Strategy

    cfg = compose_cfg("experiment=smoke", "train.epochs=3", "backbone=reduced_resnet18", "checkpoint=false")
    runner = Runner(cfg, tmp_path / "r")
    runner.prepare()
    strategy = runner.strategy
    calls, first_steps = [], []
    set_training = Strategy.set_training

    def counting(self, training):
        calls.append(training)
        set_training(self, training)

    monkeypatch.setattr(type(strategy), "set_training", counting)
    train_step = strategy.train_step
    steps_per_epoch = -(-len(strategy.training_data(runner.stream.tasks[0])) // cfg.train.batch_size)

    def step(batch):
        if len(first_steps) < 3 and step.count % steps_per_epoch == 0:
            first_steps.append(all(m.training for m in strategy.model.modules()))
        step.count += 1
        out = train_step(batch)
        if step.count == steps_per_epoch:  # the first epoch's last step leaves the body in eval
            strategy.model.body.eval()
        return out

    step.count = 0
    strategy.train_step = step
    runner._step_offset = 0
    runner._train_task(runner.stream.tasks[0], None)
    assert first_steps == [True, True, True]  # every epoch began in training mode
    assert calls == [True, True]  # at the first epoch, and at the second (the body had been left in eval)


def test_a_model_replaced_during_a_task_is_put_in_training_mode_at_the_next_epoch(tmp_path):
    """The runner lists the model's modules once per task to read their training flags; when
    a strategy replaces `strategy.model` mid-task (here with an eval-mode copy), the new
    model's modules are listed and put in training mode at the next epoch's start."""
    import copy

    cfg = compose_cfg("experiment=smoke", "train.epochs=2", "backbone=reduced_resnet18", "checkpoint=false")
    runner = Runner(cfg, tmp_path / "r")
    runner.prepare()
    strategy = runner.strategy
    train_step = strategy.train_step
    steps_per_epoch = -(-len(strategy.training_data(runner.stream.tasks[0])) // cfg.train.batch_size)
    second_epoch_modes = []

    def step(batch):
        if step.count == steps_per_epoch:  # the second epoch's first step
            second_epoch_modes.extend(m.training for m in strategy.model.modules())
        step.count += 1
        out = train_step(batch)
        if step.count == steps_per_epoch:  # the first epoch's last step swaps in an eval-mode copy
            replacement = copy.deepcopy(strategy.model).eval()
            strategy.model = replacement
            strategy.optimizer = strategy.make_optimizer(replacement.parameters())
        return out

    step.count = 0
    strategy.train_step = step
    runner._step_offset = 0
    runner._train_task(runner.stream.tasks[0], None)
    assert second_epoch_modes and all(second_epoch_modes)
