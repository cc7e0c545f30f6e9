"""Training controls (issue 14): what each one does to training, measured on real runs.

- train.scheduler / milestones / gamma / warmup_epochs / min_lr: the lr every training step
  actually used (read from the strategy's optimizer inside its step) follows the schedule,
  restarts at each task, scales every param group from its own base lr, also for an
  optimizer kept across tasks;
- train.clip_grad_norm: the update of a plain SGD step is lr * clip when the gradient is
  larger, the step is unchanged (bit for bit) when it is smaller; GEM/A-GEM clip after
  their projection;
- train.validate / patience: the validation loss is the cross-entropy of the strategy's
  scores on the current task's val split; early stopping stops at the expected epoch and
  ends the task with the best epoch's weights; validation changes nothing else;
- dataset.first_task_classes / class_order=seedN: B50-style streams and the seed-1993 order;
- the neutral setting of each control gives a run bit-identical to the control off.

Tiny runs on the offline split_digits stream (2 tasks x 5 classes, 8 samples per class).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cl_bench.runner as runner_module
from cl_bench import CLBenchError
from cl_bench.config import preflight
from cl_bench.data.stream import group_classes, resolve_class_order
from cl_bench.runner import Runner, validate_task
from cl_bench.strategies.base import Strategy
from cl_bench.strategies.finetune import Finetune
from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 tasks x 5 classes x 8 samples (40 per task), batch 16: 3 steps per epoch (16 + 16 + 8)
TINY = (
    "dataset.num_tasks=2", "dataset.max_train_per_class=8", "train.batch_size=16", "train.epochs=4",
    "train.lr=0.1", "device.num_threads=1", "seed=3", "checkpoint=false",
)
STEPS_PER_EPOCH = 3


class Recording(Runner):
    """The real Runner; records, inside every training step, the task and the lr of each
    param group of the strategy's optimizer (what the step uses), and optionally the model's
    parameters before and after the step."""

    def __init__(self, cfg, folder, updates: bool = False) -> None:
        super().__init__(cfg, folder)
        self.lrs: list[tuple[int, list[float]]] = []
        self.updates: list[torch.Tensor] = []
        self.record_updates = updates

    def build(self) -> None:
        super().build()
        strategy, train_step = self.strategy, self.strategy.train_step

        def step(batch):
            self.lrs.append((batch.task.id, [g["lr"] for g in strategy.optimizer.param_groups]))
            if not self.record_updates:
                return train_step(batch)
            before = flat_params(strategy.model)
            out = train_step(batch)
            self.updates.append(flat_params(strategy.model) - before)
            return out

        strategy.train_step = step


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def weights(runner: Runner) -> dict:
    return {k: v.detach().clone() for k, v in runner.strategy.model.state_dict().items()}


def run(tmp_path, *overrides, name="run", cls=Runner, **kwargs):
    runner = cls(compose_cfg(*TINY, *overrides), tmp_path / name, **kwargs)
    summary = runner.run()
    return runner, summary


def assert_bit_identical(a: tuple, b: tuple) -> None:
    (ra, sa), (rb, sb) = a, b
    assert np.array_equal(np.asarray(sa["accuracy_matrix"]), np.asarray(sb["accuracy_matrix"]))
    wa, wb = weights(ra), weights(rb)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [log["mean_loss"] for log in sa["train_log"]] == [log["mean_loss"] for log in sb["train_log"]]


class TwoLrFinetune(Finetune):
    """Fine-tuning whose optimizer has two param groups: the head at a tenth of train.lr."""

    def before_task(self, task) -> None:
        if self.optimizer is None or self.train_cfg.reset_optimizer:
            head = list(self.model.head.parameters()) if hasattr(self.model, "head") else []
            ids = {id(p) for p in head}
            body = [p for p in self.model.parameters() if id(p) not in ids]
            self.optimizer = self.make_optimizer([
                {"params": body},
                {"params": head, "lr": self.train_cfg.lr / 10},
            ])


# ----- learning-rate schedules ----------------------------------------------------------------
def expected_multistep(epoch: int, step: int) -> float:
    """lr=0.1, milestones [2, 3], gamma 0.5, 1 warm-up epoch of 3 steps (linear per step)."""
    factor = 0.5 ** sum(epoch >= m for m in (2, 3))
    if step < STEPS_PER_EPOCH:
        factor *= (step + 1) / STEPS_PER_EPOCH
    return 0.1 * factor


@pytest.mark.parametrize("keep", [False, True], ids=["fresh_optimizer", "kept_optimizer"])
def test_multistep_with_warmup_sets_the_lr_of_every_step_and_restarts_at_each_task(tmp_path, keep):
    overrides = ("train.scheduler=multistep", "train.milestones=[2,3]", "train.gamma=0.5", "train.warmup_epochs=1",
                 "train.momentum=0.9", f"train.reset_optimizer={str(not keep).lower()}")
    runner, _ = run(tmp_path, *overrides, cls=Recording)
    expected = [expected_multistep(s // STEPS_PER_EPOCH, s) for s in range(4 * STEPS_PER_EPOCH)]
    for task in (0, 1):
        used = [lrs[0] for t, lrs in runner.lrs if t == task]
        assert used == pytest.approx(expected, rel=1e-12, abs=0)
    # the base lr stays in the group (restarts come from it, also for the optimizer kept across tasks)
    assert runner.strategy.optimizer.param_groups[0]["initial_lr"] == 0.1


def test_the_schedule_scales_each_param_group_from_its_own_base_lr(tmp_path):
    target = f"strategy._target_={TwoLrFinetune.__module__}.TwoLrFinetune"
    runner, _ = run(tmp_path, target, "train.scheduler=multistep", "train.milestones=[2,3]", "train.gamma=0.5",
                    "train.warmup_epochs=1", cls=Recording)
    expected = [expected_multistep(s // STEPS_PER_EPOCH, s) for s in range(4 * STEPS_PER_EPOCH)] * 2
    assert [lrs[0] for _, lrs in runner.lrs] == pytest.approx(expected, rel=1e-12)
    assert [lrs[1] for _, lrs in runner.lrs] == pytest.approx([lr / 10 for lr in expected], rel=1e-12)


def test_hat_two_param_groups_follow_the_schedule(tmp_path):
    runner, _ = run(tmp_path, "strategy=hat", "scenario=task_il", "train.scheduler=multistep",
                    "train.milestones=[2,3]", "train.gamma=0.5", "train.warmup_epochs=1", cls=Recording)
    expected = [expected_multistep(s // STEPS_PER_EPOCH, s) for s in range(4 * STEPS_PER_EPOCH)] * 2
    assert len(runner.strategy.optimizer.param_groups) == 2
    for group in (0, 1):
        assert [lrs[group] for _, lrs in runner.lrs] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("warmup", [0, 1])
def test_cosine_goes_from_the_base_lr_towards_min_lr_once_per_epoch(tmp_path, warmup):
    runner, _ = run(tmp_path, "train.scheduler=cosine", "train.min_lr=0.01", f"train.warmup_epochs={warmup}",
                    "train.optimizer=adamw", cls=Recording)
    expected = []
    for epoch in range(4):
        t = (epoch - warmup) / (4 - warmup)
        lr = 0.01 + 0.09 * (1 + math.cos(math.pi * max(t, 0.0))) / 2
        for b in range(STEPS_PER_EPOCH):
            step = epoch * STEPS_PER_EPOCH + b
            expected.append(lr * ((step + 1) / (warmup * STEPS_PER_EPOCH) if step < warmup * STEPS_PER_EPOCH else 1))
    used = [lrs[0] for _, lrs in runner.lrs]
    assert used == pytest.approx(expected * 2, rel=1e-12)
    assert used[STEPS_PER_EPOCH * warmup] == pytest.approx(0.1)  # the full lr right after the warm-up
    per_epoch = used[STEPS_PER_EPOCH * warmup : 4 * STEPS_PER_EPOCH : STEPS_PER_EPOCH]
    assert all(a > b > 0.01 for a, b in zip(per_epoch, per_epoch[1:]))  # decreasing, above the floor (as torch's)


def test_the_lr_goes_to_the_loggers_when_it_changes(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(Runner, "_log", lambda self, metrics, step: logged.append((step, dict(metrics))))
    run(tmp_path, "train.scheduler=multistep", "train.milestones=[2,3]", "train.gamma=0.5")
    lrs = [(step, m["train/lr"]) for step, m in logged if "train/lr" in m]
    spt = 4 * STEPS_PER_EPOCH  # steps per task; global steps count from 1
    assert [step for step, _ in lrs] == [1, 7, 10, spt + 1, spt + 7, spt + 10]
    assert [lr for _, lr in lrs] == pytest.approx([0.1, 0.05, 0.025] * 2)


# ----- gradient clipping --------------------------------------------------------------------------
def test_clipping_caps_the_sgd_update_at_lr_times_clip_and_leaves_smaller_gradients_alone():
    strategy = Strategy()
    strategy.train_cfg = compose_cfg("train.clip_grad_norm=1.0", "train.lr=0.1").train
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    optimizer = strategy.make_optimizer(params)
    for scale, expected_norm in ((10.0, 0.1 * 1.0), (0.5, 0.1 * 0.5)):
        grads = [torch.full((3,), 1.0), torch.full((4,), 1.0)]
        norm = math.sqrt(7.0)
        with torch.no_grad():
            for p in params:
                p.zero_()
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g * (scale / norm)  # total gradient norm: scale
        raw = [p.grad.clone() for p in params]
        optimizer.step()
        update = torch.cat([(p.detach() - b) for p, b in zip(params, before)])
        assert update.norm().item() == pytest.approx(expected_norm, rel=1e-5)
        if scale < 1.0:  # below the threshold: exactly the plain SGD step
            assert all(torch.equal(p.detach() - b, -0.1 * g) for p, b, g in zip(params, before, raw))


@pytest.mark.parametrize("strategy", ["finetune", "gem", "agem"])
def test_every_step_of_a_run_is_clipped_after_the_strategy_changed_the_gradient(tmp_path, strategy):
    """Plain SGD: the update is lr * the clipped gradient, so with a clip below every gradient
    norm each step moves the weights by exactly lr * clip (GEM/A-GEM: after their projection,
    which changes the gradient's norm; a clip before it would give other norms)."""
    runner, summary = run(tmp_path, f"strategy={strategy}", "scenario=task_il", "train.clip_grad_norm=0.001",
                          "train.epochs=2", cls=Recording, updates=True)
    norms = torch.stack([u.norm() for u in runner.updates])
    assert len(norms) == 2 * 2 * STEPS_PER_EPOCH
    assert torch.allclose(norms, torch.full_like(norms, 0.1 * 0.001), rtol=1e-3)
    if strategy == "gem":
        assert runner.strategy.summary()["projected_steps"] > 0  # the projection did happen in task 1


# ----- neutral settings: bit-identical to the control off ----------------------------------------
NEUTRAL = {
    "multistep_gamma_1": ("train.scheduler=multistep", "train.milestones=[1,2]", "train.gamma=1.0"),
    "cosine_floor_at_lr": ("train.scheduler=cosine", "train.min_lr=0.1"),
    "clip_above_every_norm": ("train.clip_grad_norm=1e9",),
    "validate_without_patience": ("train.validate=true",),
}


@pytest.mark.parametrize("name", NEUTRAL)
def test_a_neutral_setting_of_each_control_is_bit_identical_to_the_control_off(tmp_path, name):
    base = ("dataset.val_fraction=0.25", "train.momentum=0.9")
    off = run(tmp_path, *base, name="off")
    on = run(tmp_path, *base, *NEUTRAL[name], name="on")
    assert_bit_identical(on, off)


def test_the_defaults_are_the_controls_off(tmp_path):
    train = compose_cfg().train
    assert (getattr(train.scheduler, "value", train.scheduler), train.warmup_epochs, train.clip_grad_norm,
            train.validate, train.patience) == ("none", 0, None, False, 0)
    dataset = compose_cfg().dataset
    assert dataset.first_task_classes is None and dataset.class_order == "natural"
    explicit = ("train.scheduler=none", "train.clip_grad_norm=0", "train.validate=false", "train.patience=0",
                "train.warmup_epochs=0", "train.min_lr=0", "dataset.first_task_classes=null")
    assert_bit_identical(run(tmp_path, name="defaults"), run(tmp_path, *explicit, name="explicit"))


# Validation is an observer: the strategy's predict may change the model's mode, masks or gates
# or draw random numbers (VCL); the training that follows must not see any of it.
OBSERVED = ["finetune", "icarl", "vcl", "hat", "piggyback", "packnet", "cpg", "pnn", "lwf", "bic", "ewc", "den"]


@pytest.mark.parametrize("strategy", OBSERVED)
def test_validation_changes_nothing_in_training(tmp_path, strategy):
    from tests.test_preemption import strategy_overrides

    overrides = (*strategy_overrides(strategy), *TINY, "train.epochs=2", "dataset.val_fraction=0.25")
    off = Runner(compose_cfg(*overrides), tmp_path / "off")
    on = Runner(compose_cfg(*overrides, "train.validate=true"), tmp_path / "on")
    summaries = off.run(), on.run()
    assert_bit_identical((on, summaries[1]), (off, summaries[0]))
    assert all(len(log["val"]) == 2 for log in summaries[1]["train_log"])


def strategies():
    from tests.conftest import conf_options

    return conf_options("strategy")


@pytest.mark.parametrize("strategy", strategies())
def test_every_strategy_trains_with_every_control_on(tmp_path, strategy):
    """Every make_optimizer call site (fresh, kept across tasks, several param groups, the
    strategies' own phases) works under the schedule, clipping, validation and early stopping."""
    from tests.test_preemption import strategy_overrides

    controls = ("train.epochs=3", "dataset.val_fraction=0.25", "train.patience=1", "train.scheduler=multistep",
                "train.milestones=[1]", "train.warmup_epochs=1", "train.clip_grad_norm=0.5", "train.momentum=0.9",
                "train.reset_optimizer=false")
    summary = Runner(compose_cfg(*strategy_overrides(strategy), *controls), tmp_path / "run").run()
    assert np.isfinite(np.asarray(summary["accuracy_matrix"])).all()
    for log in summary["train_log"]:
        assert 1 <= log["early_stopping"]["epochs_run"] <= 3 and len(log["val"]) == log["early_stopping"]["epochs_run"]


# ----- validation and early stopping ---------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["class_il", "task_il"])
def test_the_validation_loss_is_the_cross_entropy_of_the_scores_in_the_scenarios_sense(tmp_path, scenario):
    runner, summary = run(tmp_path, f"scenario={scenario}", "dataset.val_fraction=0.25", "train.validate=true")
    last = summary["train_log"][-1]["val"]
    assert [v["epoch"] for v in last] == [0, 1, 2, 3]
    task = runner.stream.tasks[-1]
    model = runner.strategy.model.eval()
    with torch.no_grad():
        logits = model(runner.stream.transform(task.val.x))
    y = task.val.y
    if scenario == "task_il":
        outputs = torch.tensor(task.outputs)
        position = {c: i for i, c in enumerate(task.outputs)}
        logits, target = logits[:, outputs], torch.tensor([position[int(c)] for c in y])
        pred = outputs[logits.argmax(1)]
    else:
        target, pred = y, logits.argmax(1)
    assert last[-1]["loss"] == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)
    assert last[-1]["acc"] == pytest.approx((pred == y).float().mean().item())
    assert validate_task(runner.strategy, runner.stream, task, 7) == pytest.approx((last[-1]["loss"], last[-1]["acc"]), rel=1e-5)


def scripted_validation(monkeypatch, losses: dict[int, list[float]]) -> dict:
    """Replace the validation loss by a script {task: [loss after epoch 0, 1, ...]}; records the
    model's weights at every validation."""
    seen = {"states": {}}
    real = runner_module.validate_task

    def fake(strategy, stream, task, batch_size):
        _, acc = real(strategy, stream, task, batch_size)
        epoch = sum(1 for key in seen["states"] if key[0] == task.id)
        seen["states"][(task.id, epoch)] = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
        return losses[task.id][epoch], acc

    monkeypatch.setattr(runner_module, "validate_task", fake)
    return seen


def test_early_stopping_stops_after_patience_epochs_without_gain_and_keeps_the_best_weights(tmp_path, monkeypatch):
    # task 0: best after epoch 1, then 2 epochs without a lower loss: stop after epoch 3 (the
    # lower loss scripted for epoch 4 is never reached); task 1: always better, all 6 epochs
    seen = scripted_validation(monkeypatch, {0: [3.0, 2.0, 2.0, 2.4, 1.0, 0.5], 1: [3.0, 2.0, 1.0, 0.9, 0.8, 0.7]})
    at_task_end = {}
    original_after = Finetune.after_task

    def after_task(self, task):
        at_task_end[task.id] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        original_after(self, task)

    monkeypatch.setattr(Finetune, "after_task", after_task)
    runner, summary = run(tmp_path, "dataset.val_fraction=0.25", "train.patience=2", "train.epochs=6")
    first, second = summary["train_log"]
    per_epoch = 2  # 30 training samples (10 held out) in batches of 16
    assert first["steps"] == 4 * per_epoch and first["samples"] == 4 * 30
    assert first["early_stopping"] == {"epochs_run": 4, "stopped_early": True, "best_epoch": 1, "best_val_loss": 2.0}
    assert [v["loss"] for v in first["val"]] == [3.0, 2.0, 2.0, 2.4]
    assert second["steps"] == 6 * per_epoch and second["early_stopping"]["best_epoch"] == 5
    best, end = seen["states"][(0, 1)], at_task_end[0]
    assert all(torch.equal(best[k], end[k]) for k in best)  # the task ended with epoch 1's weights
    assert not all(torch.equal(seen["states"][(0, 3)][k], end[k]) for k in best)
    last = seen["states"][(1, 5)]
    assert all(torch.equal(last[k], at_task_end[1][k]) for k in last)


def test_epochs_with_a_non_finite_validation_loss_do_not_count_for_early_stopping(tmp_path, monkeypatch):
    """E.g. iCaRL: its nearest-mean classifier has no mean for the classes of the task it is
    training, so their scores are -inf and the loss inf; early stopping must not stop on that."""
    inf = float("inf")
    scripted_validation(monkeypatch, {0: [inf] * 4, 1: [inf, 2.0, inf, inf]})
    runner, summary = run(tmp_path, "dataset.val_fraction=0.25", "train.patience=1")
    first, second = summary["train_log"]
    assert first["early_stopping"] == {"epochs_run": 4, "stopped_early": False, "best_epoch": None,
                                       "best_val_loss": inf}
    assert second["early_stopping"]["epochs_run"] == 4 and second["early_stopping"]["best_epoch"] == 1
    assert any("not finite" in w for w in summary["warnings"])


def test_icarl_validates_on_its_network_logits_while_new_classes_have_no_mean(tmp_path):
    """iCaRL's nearest-mean scores give a task's new classes -inf until its exemplars exist, so
    its validation uses the network's logits (`validation_scores`): finite in every task."""
    runner, summary = run(tmp_path, "strategy=icarl", "dataset.val_fraction=0.25", "train.validate=true", "train.epochs=2")
    assert all(math.isfinite(v["loss"]) for log in summary["train_log"] for v in log["val"])
    strategy = runner.strategy
    strategy.set_training(False)
    x = runner.stream.transform(runner.stream.tasks[1].val.x[:8])
    with torch.no_grad():
        assert torch.equal(strategy.validation_scores(x), strategy.model(x))
        assert not torch.equal(strategy.predict(x), strategy.model(x))  # predict is the nearest-mean rule


def test_patience_without_a_validation_split_is_a_one_line_error():
    with pytest.raises(CLBenchError) as info:
        preflight(compose_cfg("train.patience=3"))
    assert "\n" not in str(info.value) and "dataset.val_fraction" in str(info.value)


# ----- a larger first task and named class orders -------------------------------------------------
# np.random.seed(1993); np.random.permutation(100): the CIFAR-100 order of iCaRL, LUCIR and PyCIL,
# as listed in FACIL (src/datasets/dataset_config.py, "cifar100_icarl")
SEED1993_CIFAR100 = [
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1, 85, 19, 17, 50,
    28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31, 54, 37, 95, 14, 71, 96,
    98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94, 11, 12, 47, 25, 30, 46, 62, 69,
    36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29, 49, 57, 33,
]


def test_seed1993_is_the_icarl_lucir_pycil_cifar100_order_whatever_the_run_seed():
    assert resolve_class_order("seed1993", 100, seed=0) == SEED1993_CIFAR100
    assert resolve_class_order("seed1993", 100, seed=7) == SEED1993_CIFAR100
    groups = group_classes(SEED1993_CIFAR100, 6, first_task_classes=50)  # B50, 5 steps
    assert [len(g) for g in groups] == [50, 10, 10, 10, 10, 10]
    assert groups[0] == SEED1993_CIFAR100[:50] and groups[-1] == SEED1993_CIFAR100[90:]


def test_a_larger_first_task_in_the_named_order(tmp_path):
    order = np.random.RandomState(5).permutation(10).tolist()
    _, summary = run(tmp_path, "dataset.first_task_classes=6", "dataset.num_tasks=3", "dataset.class_order=seed5",
                     "train.epochs=1")
    assert summary["classes_per_task"] == [order[:6], order[6:8], order[8:]]
    assert summary["class_order"] == order
    assert np.asarray(summary["accuracy_matrix"]).shape == (3, 3)
    assert summary["train_log"][0]["samples"] == 6 * 8 and summary["train_log"][1]["samples"] == 2 * 8


BAD = [
    (("dataset.first_task_classes=10",), "dataset.first_task_classes must be between 1 and 9"),
    (("dataset.first_task_classes=0",), "dataset.first_task_classes must be at least 1"),
    (("dataset.first_task_classes=5", "dataset.num_tasks=4"), "leaves 5 classes, which dataset.num_tasks - 1 = 3"),
    (("dataset.first_task_classes=4", "dataset.num_tasks=1"), "needs dataset.num_tasks >= 2"),
    (("dataset.class_order=seedx",), "natural, random, seedN"),
    (("train.scheduler=multistep",), "needs train.milestones"),
    (("train.milestones=[3]",), "need train.scheduler=multistep"),
    (("train.scheduler=multistep", "train.milestones=[3,2]"), "increasing epochs"),
    (("train.gamma=0",), "train.gamma must be"),
    (("train.warmup_epochs=9",), "train.warmup_epochs must be in [0, train.epochs"),
    (("train.scheduler=cosine", "train.min_lr=1.0"), "train.min_lr must be in [0, train.lr"),
    (("train.min_lr=0.001",), "floor of train.scheduler=cosine"),
    (("train.clip_grad_norm=-1",), "train.clip_grad_norm must be"),
    (("train.validate=true",), "needs a validation split"),
    (("train.patience=-1", "dataset.val_fraction=0.2"), "train.patience must be >= 0"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_impossible_values_are_refused_in_one_line(overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(CLBenchError) as info:
        preflight(cfg)
        Runner(cfg, "/nonexistent/never-written").build()  # what preflight cannot know: at the stream's build
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_loop_and_the_strategy_read_train_as_a_plain_snapshot_of_the_config(tmp_path):
    """Reading an OmegaConf key costs ~15 us; the runner hands its loop and the strategy a
    plain `TrainConfig` with the composed values (enums kept), and a config composed without
    the schema still gets a plain object with the same attributes."""
    from omegaconf import OmegaConf

    from cl_bench.config import TrainConfig, plain_train_config

    cfg = compose_cfg("experiment=smoke", "train.scheduler=multistep", "train.milestones=[1,3]", "train.lr=0.2")
    runner = Runner(cfg, tmp_path / "run")
    runner.prepare()
    plain = runner.strategy.train_cfg
    assert type(plain) is TrainConfig and plain is runner.train_cfg
    assert OmegaConf.to_container(cfg.train) == OmegaConf.to_container(OmegaConf.structured(plain))
    assert plain.milestones == [1, 3] and type(plain.milestones) is list and plain.scheduler.value == "multistep"
    loose = plain_train_config(OmegaConf.create({"lr": 0.1, "milestones": [2]}))
    assert (loose.lr, loose.milestones) == (0.1, [2]) and not OmegaConf.is_config(loose.milestones)
    assert plain_train_config(plain) is plain
