"""The shared distillation pieces, and LwF on the real protocol (prediction over the
trained classes, its protection-off switch, a frozen old model with batch norm)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_bench.runner import Runner
from cl_bench.strategies.distillation import kd_loss, sigmoid_targets
from cl_bench.strategies.lwf import LwF
from tests.conftest import compose_cfg, run, spy_frozen_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ("dataset.max_train_per_class=30", "train.epochs=1", "checkpoint=false", "device.num_threads=1")


def test_kd_loss_is_minimised_by_matching_the_teacher():
    teacher = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    matched = kd_loss(teacher.clone(), teacher, temperature=2.0)
    other = kd_loss(torch.zeros_like(teacher), teacher, temperature=2.0)
    assert other > matched
    # at the optimum the value is T^2 times the teacher's entropy
    p = torch.softmax(teacher / 2.0, 1)
    entropy = -(p * p.log()).sum(1).mean()
    assert torch.isclose(matched, 4.0 * entropy)


def test_kd_loss_restricted_to_outputs_ignores_the_rest():
    teacher = torch.tensor([[1.0, 2.0, 9.0]])
    student = torch.tensor([[1.0, 2.0, -9.0]])
    assert torch.isclose(kd_loss(student, teacher, outputs=[0, 1]), kd_loss(teacher, teacher, outputs=[0, 1]))


def test_kd_loss_gradient_flows_only_to_the_student():
    teacher = torch.randn(4, 5, requires_grad=True)
    student = torch.randn(4, 5, requires_grad=True)
    kd_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_kd_loss_without_t_squared_is_eq_3_of_castro_et_al():
    """EEIL (Castro et al. 2018, Eq. 3) and BiC (Wu et al. 2019, Eq. 2): -1/N sum_i sum_j
    pdist_ij log qdist_ij, no T^2 factor."""
    teacher, student = torch.randn(6, 4), torch.randn(6, 4)
    p = torch.softmax(teacher / 2.0, 1)
    q = torch.softmax(student / 2.0, 1)
    by_hand = -(p * q.log()).sum(1).mean()
    assert torch.isclose(kd_loss(student, teacher, 2.0, t_squared=False), by_hand)
    assert torch.isclose(kd_loss(student, teacher, 2.0), 4.0 * by_hand)


def test_sigmoid_targets_are_one_hot_with_the_old_classes_distilled():
    """iCaRL's targets over all outputs (the authors' code): old classes' columns hold the
    previous model's sigmoid, the others the one-hot label (later classes 0)."""
    teacher = torch.tensor([[0.0, 2.0, 5.0, 1.0, -1.0]])
    target = sigmoid_targets(torch.tensor([2]), 5, teacher, [0, 1])
    expected = torch.tensor([[0.5, torch.sigmoid(torch.tensor(2.0)).item(), 1.0, 0.0, 0.0]])
    assert torch.allclose(target, expected)
    assert torch.equal(sigmoid_targets(torch.tensor([1]), 3), torch.tensor([[0.0, 1.0, 0.0]]))


def test_icarl_loss_is_the_authors_mean_over_batch_and_all_outputs(tmp_path):
    """The authors' code: mean of the sigmoid BCE over batch x ALL outputs (later classes
    with target 0), so their learning rate transfers; `sum` is Alg. 3 over the seen classes."""
    from cl_bench.strategies.base import Batch
    from cl_bench.strategies.icarl import ICaRL

    for reduction in (None, "sum"):  # None: the shipped default, the authors' mean
        extra = () if reduction is None else (f"strategy.loss_reduction={reduction}",)
        runner = Runner(compose_cfg("strategy=icarl", *extra, *SMALL), tmp_path)
        runner.build()
        icarl, task = runner.strategy, runner.stream.tasks[0]
        assert isinstance(icarl, ICaRL)
        icarl.begin_task(task)
        icarl.before_task(task)
        x, y = runner.stream.transform(task.train.x[:16]), task.train.y[:16]
        with torch.no_grad():
            logits = icarl.model(x)
        per_output = F.binary_cross_entropy_with_logits(logits, F.one_hot(y, 10).float(), reduction="none")
        expected = per_output[:, :2].sum(1).mean() if reduction == "sum" else per_output.mean()
        loss = icarl.train_step(Batch(x, y, task.train.x[:16], task))["loss"]
        assert torch.isclose(loss, expected), (reduction, loss, expected)


# ----- LwF on the real protocol -------------------------------------------------------------------


def test_lwf_class_il_predicts_only_trained_classes_whatever_active_classes(tmp_path):
    """LwF's heads grow per task, and its class-IL losses cover the seen classes only, so
    train.active_classes changes nothing: the same matrix, no later class ever predicted."""
    matrices = {}
    for active in ("true", "false"):
        s = run(tmp_path, "strategy=lwf", *SMALL, f"train.active_classes={active}", name=active)
        matrices[active] = np.asarray(s["accuracy_matrix"])
    assert np.array_equal(matrices["true"], matrices["false"])
    assert not np.triu(matrices["false"], 1).any()


def test_lwf_predict_never_returns_a_class_not_yet_trained(tmp_path):
    runner = Runner(compose_cfg("strategy=lwf", *SMALL), tmp_path)
    original = runner._train_task

    def train_task(task, bar):
        log = original(task, bar)
        seen = {o for t in runner.stream.tasks[: task.id + 1] for o in t.outputs}
        runner.strategy.set_training(False)
        with torch.no_grad():
            for t in runner.stream.tasks:
                pred = runner.strategy.predict(runner.stream.transform(t.test.x)).argmax(1)
                assert set(pred.tolist()) <= seen
        return log

    runner._train_task = train_task
    runner.run()


@pytest.mark.parametrize(
    "scenario, finetune_extra",
    [("class_il", ("train.active_classes=true",)), ("task_il", ()), ("domain_il", ())],
)
def test_lwf_with_alpha_zero_is_exactly_finetune(scenario, finetune_extra, tmp_path):
    """The protection-off switch, strategy.alpha=0: finetune's matrix bit for bit (in class-IL
    LwF's losses and prediction cover the seen classes, i.e. finetune with active classes)."""
    common = (f"scenario={scenario}", "dataset.max_train_per_class=30", "train.epochs=2", "checkpoint=false",
              "device.num_threads=1", "train.optimizer=sgd", "train.momentum=0.9", "train.weight_decay=5e-4")
    off = run(tmp_path, "strategy=lwf", "strategy.alpha=0", *common, *finetune_extra, name="off")
    finetune = run(tmp_path, "strategy=finetune", *common, *finetune_extra, name="finetune")
    assert np.array_equal(np.asarray(off["accuracy_matrix"]), np.asarray(finetune["accuracy_matrix"]))


def test_lwf_old_model_is_frozen_in_eval_mode_with_batch_norm(tmp_path, monkeypatch):
    checked = spy_frozen_teacher(monkeypatch, LwF, "old_model")
    run(tmp_path, "strategy=lwf", "backbone=reduced_resnet18", "backbone.nf=4", "train.optimizer=adamw",
        "train.lr=0.001", "train.weight_decay=0.01", *SMALL)
    assert checked
