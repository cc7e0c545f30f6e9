"""PackNet (Mallya & Lazebnik, CVPR 2018): several tasks packed into one network by
iterative magnitude pruning.

For task t (Sec. 3 of the paper):
 1. every free weight of the body is given to t and trained (weights of tasks < t are
    used in the forward pass but frozen: their gradients are zeroed);
 2. in each layer, the `prune_ratio` fraction of t's weights with the smallest
    magnitude is released (set to zero, free for later tasks);
 3. the remaining weights of t are retrained for `retrain_epochs` epochs.
At test, task k uses the binary mask {weights owned by tasks 0..k} (the per-weight
owner index the authors store, one byte per weight here). As in the authors' code,
biases and batch-norm layers are trained with the first task only and then fixed: from
task 1 on, batch-norm runs in eval mode while training (the authors' `train_nobn`: the
running statistics stay those of task 0) and its affine parameters are frozen (they
zero the BN gradients; here the shared `FreezeGuard` also stops weight decay and
momentum), so no earlier task's logits can change. With BN fixed, later tasks train an
unnormalised deep net: on a ResNet-18 with SGD (lr 0.01, momentum 0.9) they diverged or
did not learn. So the shipped default is `task_batchnorm=true` (not in the paper;
Piggyback's and CPG's choice): each task gets its own batch-norm copy, started from the
previous task's, trained with the task and fixed afterwards; `task_batchnorm=false` is the
authors' protocol (meant for ImageNet-pretrained networks). On backbones without batch
norm (the MLPs) the two are identical. The head is one row block per task (the
task's outputs of the shared head).
`prune_ratio=null` gives each task an equal share: ratio 1 - 1/(tasks left).
Supports task-IL only: the task id picks the mask.
"""

from __future__ import annotations

from typing import Optional

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import (
    FreezeGuard, MaskedNet, WeightOwners, batchnorms_eval, epochs, freeze_batchnorms, freeze_other_batchnorms,
    head_params, head_rows_frozen, size_summary, start_task_batchnorms, task_batchnorms,
)
from cl_bench.strategies.base import Strategy


class PackNet(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("task_il",)

    def __init__(self, prune_ratio: Optional[float] = 0.5, retrain_epochs: int = 2, task_batchnorm: bool = True) -> None:
        if prune_ratio is not None and not 0.0 <= prune_ratio < 1.0:
            raise CLBenchError(f"strategy.prune_ratio must be in [0, 1), got {prune_ratio}")
        if retrain_epochs < 0:
            raise CLBenchError(f"strategy.retrain_epochs must be >= 0, got {retrain_epochs}")
        self.prune_ratio = prune_ratio
        self.retrain_epochs = retrain_epochs
        self.task_batchnorm = task_batchnorm

    def setup(self, model, stream, train_cfg, device) -> None:
        net = MaskedNet(model)
        self.norms = task_batchnorms(net.body) if self.task_batchnorm else []
        for bn in self.norms:
            bn.ensure(len(stream))
        super().setup(net.to(device), stream, train_cfg, device)
        self.owners = WeightOwners(self.model.hidden)
        self.task = 0

    def ratio(self, task: Task) -> float:
        if self.prune_ratio is not None:
            return self.prune_ratio
        return 1.0 - 1.0 / (len(self.stream) - task.id)

    def before_task(self, task: Task) -> None:
        self.task = task.id
        self.owners.claim_free(task.id)
        self.model.set_masks(self.owners.visible(task.id))
        self.guard = FreezeGuard()
        for layer, mine in zip(self.model.hidden, self.owners.own(task.id)):
            self.guard.freeze(layer.weight, ~mine)
            if layer.bias is not None:
                self.guard.freeze(layer.bias, task.id > 0)
        for p, frozen in zip((self.model.head.weight, self.model.head.bias), head_rows_frozen(self.model.head, self.stream, task.id)):
            self.guard.freeze(p, frozen)
        if self.norms:
            start_task_batchnorms(self.norms, task.id)
            freeze_other_batchnorms(self.norms, task.id, self.guard)
        elif task.id > 0:
            freeze_batchnorms(self.model.body, self.guard)
        self.optimizer = self.make_optimizer(self.model.parameters())

    def set_training(self, training: bool) -> None:
        self.model.train(training)
        if training and self.task > 0 and not self.norms:
            batchnorms_eval(self.model)

    def train_step(self, batch) -> dict:
        return self._step(batch.x, batch.y)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        loss = self.loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.guard.step(self.optimizer, self.optimizer_step)
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        self.owners.prune(self.model.hidden, task.id, self.ratio(task))
        self.model.set_masks(self.owners.visible(task.id))
        self.set_training(True)
        batch_size = self.train_cfg.batch_size
        batches = self.retrain_epochs * -(-len(task.train) // batch_size)
        with self.progress("retraining after pruning", total=batches) as advance:
            for x, y in epochs(task.train, self.stream, self.retrain_epochs, batch_size):
                self._step(x, y)
                advance()  # batches

    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        self._use(task_id)
        try:
            return self.model(x)
        finally:
            self._use(self.task)

    def _use(self, task_id: int) -> None:
        self.model.set_masks(self.owners.visible(task_id))
        for bn in self.norms:
            bn.task = task_id

    def summary(self) -> dict:
        owner = torch.cat([o.flatten() for o in self.owners.owner])
        counts = torch.bincount(owner.long(), minlength=len(self.stream) + 1).tolist()
        biases = sum(l.bias.numel() for l in self.model.hidden if l.bias is not None)
        used = [sum(counts[1 : t + 2]) + biases + head_params(self.model.head, task)
                for t, task in enumerate(self.stream.tasks[: self.task + 1])]
        return size_summary(
            sum(p.numel() for p in self.model.parameters()), used, owner.numel(),
            weights_per_task=counts[1:], free_weights=counts[0],
        )

    def state_dict(self) -> dict:
        return {"owners": self.owners.state_dict(), "task": self.task}

    def load_state_dict(self, state: dict) -> None:
        self.owners.load_state_dict(state["owners"])
        self.task = state["task"]
        self._use(self.task)
