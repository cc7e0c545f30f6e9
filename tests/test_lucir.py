"""LUCIR (Hou et al., CVPR 2019): the cosine head, imprinting, fixed old-class weights, the
less-forget constraint and its adaptive weight, the margin ranking loss, class-balanced
fine-tuning, the NME option, the reduction to finetune with a cosine head, resume, and
bad hyperparameters. Runs through the real Runner with the shipped defaults on tiny data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.models.heads import CosineHead
from cl_bench.runner import Runner
from cl_bench.strategies.buffer import ReplayStrategy
from cl_bench.strategies.finetune import Finetune
from cl_bench.strategies.lucir import LUCIR, adaptive_lambda, imprint_weights, less_forget_loss, margin_ranking_loss
from tests.conftest import compose_cfg, run_killed_and_resumed

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ("dataset=split_digits", "dataset.max_train_per_class=10", "train.epochs=2", "checkpoint=false", "seed=0",
        "device.num_threads=1")
# SGD with momentum and weight decay: a fixed weight must stay fixed under both
SGD = ("train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "train.weight_decay=5e-4")


def runner_with_hook(tmp_path, overrides, after_task=None, name="run"):
    runner = Runner(compose_cfg("strategy=lucir", *TINY, *overrides), tmp_path / name)
    if after_task is not None:
        original = runner._train_task

        def train_task(task, bar):
            log = original(task, bar)
            after_task(runner.strategy, runner.stream, task)
            return log

        runner._train_task = train_task
    return runner


def test_head_is_a_cosine_head_bounded_by_sigma_and_features_can_be_negative(tmp_path):
    runner = runner_with_hook(tmp_path, SGD)
    runner.run()
    model, stream = runner.strategy.model, runner.stream
    head = model.head
    assert isinstance(head, CosineHead) and head.proxies == 1
    assert isinstance(head.sigma, torch.nn.Parameter) and head.sigma.item() != 1.0  # learnable, and it learned
    model.eval()
    with torch.no_grad():
        x = stream.transform(torch.cat([t.test.x for t in stream.tasks]))
        scores, features = model(x), model.features(x)
    assert scores.abs().max() <= head.sigma.abs() * (1 + 1e-5)
    assert torch.allclose(scores, head.sigma * F.normalize(features, dim=1) @ F.normalize(head.weight, dim=1).T, atol=1e-5)
    assert (features < 0).any()  # the last ReLU is gone (the authors' modified ResNet)


def test_new_class_weights_are_imprinted_from_normalised_mean_features(tmp_path, monkeypatch):
    checked = []
    original = LUCIR.before_task

    def before_task(self, task):
        before = self.model.head.weight.detach().clone()
        old = [o for t in self.stream.tasks[: task.id] for o in t.outputs]
        features = F.normalize(self.embed(task.train.x), dim=1)
        original(self, task)
        weight = self.model.head.weight.detach()
        if task.id == 0:  # the first task's head is the random initialisation
            assert torch.equal(weight, before)
            return
        old_norm = before[old].norm(dim=1).mean()
        for c in task.outputs:
            mean = F.normalize(features[task.train.y == c].mean(0), dim=0)
            assert torch.allclose(F.normalize(weight[c], dim=0), mean, atol=1e-6)
            assert math.isclose(weight[c].norm().item(), old_norm.item(), rel_tol=1e-5)
        assert torch.equal(weight[old], before[old])
        checked.append(task.id)

    monkeypatch.setattr(LUCIR, "before_task", before_task)
    runner_with_hook(tmp_path, ()).run()
    assert checked == [1, 2, 3, 4]


@pytest.mark.parametrize("optimizer", [SGD, ("train.optimizer=adamw", "train.lr=0.01", "train.weight_decay=0.01")])
def test_old_class_weights_are_unchanged_by_later_tasks(optimizer, tmp_path):
    after = []

    def record(s, stream, task):
        old = [o for t in stream.tasks[: task.id] for o in t.outputs]
        after.append((old, task.outputs, s.model.head.weight.detach().clone(), s.model.head.sigma.item()))

    runner_with_hook(tmp_path, optimizer, record).run()
    for (_, _, prev, prev_sigma), (old, new, now, sigma) in zip(after, after[1:]):
        assert torch.equal(now[old], prev[old]), f"old-class weights moved while training {new}"
        assert not torch.equal(now[new], prev[new])  # the new classes' weights train
        assert sigma != prev_sigma  # and so does sigma (in the authors' base param group)


def test_less_forget_loss_and_its_adaptive_weight(tmp_path, monkeypatch):
    f = torch.randn(8, 16)
    assert less_forget_loss(f, f.clone()).abs() < 1e-6
    assert less_forget_loss(3 * f, f).abs() < 1e-6  # on normalised features: scale does not matter
    g = f + 0.5 * torch.randn(8, 16)
    expected = (1 - (F.normalize(f, dim=1) * F.normalize(g, dim=1)).sum(1)).mean()
    assert less_forget_loss(f, g) > 1e-3 and torch.allclose(less_forget_loss(f, g), expected, atol=1e-6)
    assert adaptive_lambda(5.0, 50, 10) == 5.0 * math.sqrt(5.0)

    seen = []
    original = LUCIR.before_task

    def before_task(self, task):
        original(self, task)
        if task.id == 0:
            assert self.teacher is None and self.lam == 0.0
            return
        n_old = sum(len(t.outputs) for t in self.stream.tasks[: task.id])
        assert self.lam == 5.0 * math.sqrt(n_old / len(task.outputs))  # shipped lambda_base = 5
        x = self.stream.transform(task.train.x)
        self.model.eval()
        with torch.no_grad():  # the model equals its teacher at the task start
            assert less_forget_loss(self.model.features(x), self.teacher.features(x)) < 1e-6
        self.model.train()
        self._check_x = x
        seen.append(task.id)

    def after_task(self, task):
        if task.id > 0:
            self.model.eval()
            with torch.no_grad():
                assert less_forget_loss(self.model.features(self._check_x), self.teacher.features(self._check_x)) > 1e-4
        LUCIR_after(self, task)

    LUCIR_after = LUCIR.after_task
    monkeypatch.setattr(LUCIR, "before_task", before_task)
    monkeypatch.setattr(LUCIR, "after_task", after_task)
    runner_with_hook(tmp_path, SGD).run()
    assert seen == [1, 2, 3, 4]


def test_margin_loss_ranks_the_ground_truth_against_the_top_k_new_classes():
    old = torch.tensor([True, True, True, False, False, False])
    new = torch.tensor([3, 4, 5])
    cos = torch.tensor([
        [0.9, 0.95, 0.0, 0.7, 0.2, 0.6],  # old sample (label 0): an old class above the label is no negative
        [0.1, 0.2, 0.3, 0.9, 0.1, 0.8],  # a new-class sample: no term
        [0.0, 0.1, 0.0, 0.3, 0.9, 0.95],  # old sample (label 1)
    ], requires_grad=True)
    y = torch.tensor([0, 4, 1])
    loss = margin_ranking_loss(cos, y, old, new, k=2, margin=0.5)
    hand = (max(0, 0.5 - 0.9 + 0.7) + max(0, 0.5 - 0.9 + 0.6) + (0.5 - 0.1 + 0.95) + (0.5 - 0.1 + 0.9)) / 4
    assert math.isclose(loss.item(), hand, rel_tol=1e-6)
    gt = cos.detach()[[0, 0, 2, 2], [0, 0, 1, 1]]
    neg = cos.detach()[[0, 0, 2, 2], [3, 5, 5, 4]]
    reference = torch.nn.MarginRankingLoss(margin=0.5)(gt, neg, torch.ones(4))
    assert torch.allclose(loss, reference)
    loss.backward()
    touched = cos.grad != 0
    expected = torch.zeros_like(touched)
    expected[0, [0, 3, 5]] = True
    expected[2, [1, 4, 5]] = True
    assert torch.equal(touched, expected)  # only the label and the K hardest new classes
    none_old = margin_ranking_loss(cos.detach(), torch.tensor([3, 4, 5]), old, new, k=2, margin=0.5)
    assert none_old.item() == 0.0


class CosineFinetune(Finetune):
    """Finetune with LUCIR's cosine head (last ReLU off) and its imprinting, nothing else:
    the reference for LUCIR with its losses, CBF and memory off."""

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        model.set_last_relu(False)
        model.head = CosineHead(model.feature_dim, stream.num_outputs).to(device)

    def before_task(self, task) -> None:
        if task.id > 0:
            old = [o for t in self.stream.tasks[: task.id] for o in t.outputs]
            features = ReplayStrategy.embed(self, task.train.x)
            imprint_weights(self.model.head, features, task.train.y, task.outputs, old)
        super().before_task(task)


def test_with_its_losses_off_lucir_is_finetune_with_a_cosine_head(tmp_path):
    off = ("strategy.lambda_base=0", "strategy.margin_weight=0", "strategy.cbf=false", "strategy.memory_size=0")
    lucir = Runner(compose_cfg("strategy=lucir", *TINY, *SGD, *off), tmp_path / "lucir")
    mine = lucir.run()
    reference = Runner(
        compose_cfg("strategy=finetune", "strategy._target_=tests.test_lucir.CosineFinetune", "train.active_classes=true",
                    *TINY, *SGD),
        tmp_path / "reference",
    )
    theirs = reference.run()
    assert np.array_equal(np.asarray(mine["accuracy_matrix"]), np.asarray(theirs["accuracy_matrix"]))
    a, b = lucir.strategy.model.state_dict(), reference.strategy.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the shipped defaults are not that (the switches switch something)
    shipped = Runner(compose_cfg("strategy=lucir", *TINY, *SGD), tmp_path / "shipped").run()
    assert not np.array_equal(np.asarray(shipped["accuracy_matrix"]), np.asarray(theirs["accuracy_matrix"]))


def test_class_balanced_finetuning_trains_only_the_class_weights(tmp_path, monkeypatch):
    calls = []
    original = LUCIR.balanced_finetune

    def balanced_finetune(self):
        before = {k: v.clone() for k, v in self.model.state_dict().items()}
        original(self)
        after = self.model.state_dict()
        for k in before:
            if k == "head.weight":
                assert not torch.equal(before[k], after[k])
            else:  # body weights, batch-norm statistics and sigma untouched
                assert torch.equal(before[k], after[k]), k
        calls.append(1)

    monkeypatch.setattr(LUCIR, "balanced_finetune", balanced_finetune)
    runner_with_hook(tmp_path, (*SGD, "backbone=reduced_resnet18", "backbone.nf=4", "strategy.cbf=true",
                                "strategy.cbf_epochs=2")).run()
    assert len(calls) == 4  # after every task but the first


def test_nme_classifier_predicts_the_nearest_exemplar_mean(tmp_path):
    def check(s, stream, task):
        x = stream.transform(task.test.x)
        s.set_training(False)
        with torch.no_grad():
            features = F.normalize(s.model.features(x), dim=1)
            known = ~s.class_means.isnan().any(1)
            expected = torch.full((len(x), len(known)), float("-inf"))
            expected[:, known] = -torch.cdist(features, s.class_means[known])
            assert torch.allclose(s.predict(x), expected, atol=1e-5)
        seen = [o for t in stream.tasks[: task.id + 1] for o in t.outputs]
        assert known.nonzero().flatten().tolist() == seen

    runner_with_hook(tmp_path, ("strategy.classifier=nme",), check).run()


@pytest.mark.parametrize("extra", [(), ("strategy.cbf=true", "strategy.cbf_epochs=2", "strategy.classifier=nme")])
def test_resume_after_kill_gives_the_same_matrix(extra, tmp_path, monkeypatch):
    overrides = ("strategy=lucir", *TINY[:-3], "seed=3", *SGD, *extra)
    reference, resumed = run_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_at_task=2)
    assert np.array_equal(np.asarray(resumed["accuracy_matrix"]), np.asarray(reference["accuracy_matrix"]))
    assert resumed["strategy_info"] == reference["strategy_info"]


@pytest.mark.parametrize(
    "key, value",
    [("lambda_base", "-1"), ("margin", "-0.5"), ("hard_negatives", "0"), ("margin_weight", "-1"),
     ("cbf_epochs", "0"), ("cbf_lr", "0"), ("classifier", "svm"), ("selection", "reservoir"), ("memory_size", "5")],
)
def test_bad_hyperparameters_are_refused_naming_the_key(key, value, tmp_path):
    with pytest.raises(CLBenchError) as err:
        Runner(compose_cfg("strategy=lucir", *TINY, f"strategy.{key}={value}"), tmp_path).run()
    message = str(err.value)
    assert f"strategy.{key}" in message and "\n" not in message


def test_task_il_is_refused(tmp_path):
    with pytest.raises(CLBenchError, match="task_il"):
        Runner(compose_cfg("strategy=lucir", *TINY, "scenario=task_il"), tmp_path).run()
