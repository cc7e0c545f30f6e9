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

Pretrained backbones (`pretrained_weights` set). The paper starts from an ImageNet-trained
VGG-16 and first prunes the ImageNet weights, by 50% or by 75% per layer in its
experiments; 50% is the setting the authors' scripts run (arunmallya/packnet:
run_imagenet_pruning.sh prunes with `--prune_perc_per_layer 0.5`, run_all_sequence.sh then
adds CUBS, Cars and Flowers to the `*_pruned_0.5_*` network with ratios 0.75, 0.75). The
pruned weights are free for the first new task; the kept ones belong to "ImageNet", fixed
for ever. clbench does the same at setup: in each body layer the `pretrained_prune_ratio`
(default 0.5, the scripted setting) smallest-magnitude pretrained weights are zeroed and
freed, and the rest are owned by a pseudo-task that every task uses and none trains
(`WeightOwners.keep_pretrained`). The backbone's biases are fixed from the first task on,
and so is its batch-norm with `task_batchnorm=false` (eval mode: the authors' sequence
runs, tag `nobias-nobn`); with `task_batchnorm=true` task 0's batch-norm copy starts from
the pretrained one. The authors retrain the pruned network on ImageNet (10 epochs, lr
1e-4, biases and batch-norm included) before adding tasks; clbench has no ImageNet
training data offline and cannot, so the kept weights are exactly the pretrained ones.
Nothing of this happens without pretrained weights.

`summary()` reports, besides the owner index (`mask_bytes`, one byte per weight for all
tasks), each task's storage as Piggyback's comparison counts it (Mallya et al. 2018:
1 bit per weight per task): a bit-packed binary mask over the body weights, the task's
batch-norm copy and its head rows (`storage_bytes_per_task`, and `storage_vs_copy_per_task`
against a float32 copy of the network). Without pretrained weights the first task also
stores the body (the one network all tasks share); with them that body is
`storage_base_bytes`. Supports task-IL only: the task id picks the mask.
"""

from __future__ import annotations

from typing import Optional

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import (
    PRETRAINED_OWNER, FreezeGuard, MaskedNet, StorageCount, WeightOwners, batchnorms_eval, epochs,
    freeze_batchnorms, freeze_other_batchnorms, head_params, is_pretrained, size_summary,
    start_task_batchnorms, task_batchnorms,
)
from cl_bench.strategies.base import Strategy


class PackNet(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("task_il",)

    def __init__(self, prune_ratio: Optional[float] = 0.5, retrain_epochs: int = 2, task_batchnorm: bool = True,
                 pretrained_prune_ratio: float = 0.5) -> None:
        if prune_ratio is not None and not 0.0 <= prune_ratio < 1.0:
            raise CLBenchError(f"strategy.prune_ratio must be in [0, 1), got {prune_ratio}")
        if not 0.0 <= pretrained_prune_ratio < 1.0:
            raise CLBenchError(f"strategy.pretrained_prune_ratio must be in [0, 1), got {pretrained_prune_ratio}")
        if retrain_epochs < 0:
            raise CLBenchError(f"strategy.retrain_epochs must be >= 0, got {retrain_epochs}")
        self.prune_ratio = prune_ratio
        self.retrain_epochs = retrain_epochs
        self.task_batchnorm = task_batchnorm
        self.pretrained_prune_ratio = pretrained_prune_ratio

    def setup(self, model, stream, train_cfg, device) -> None:
        self.pretrained = is_pretrained(model)
        if self.pretrained and len(stream) >= PRETRAINED_OWNER - 1:
            raise CLBenchError(f"packnet on a pretrained backbone supports at most {PRETRAINED_OWNER - 2} tasks "
                               f"(one byte per weight names its owner), the stream has {len(stream)}")
        net = MaskedNet(model)  # refuses backbones without body and Linear head
        self.storage = StorageCount(model)
        self.norms = task_batchnorms(net.body) if self.task_batchnorm else []
        for bn in self.norms:
            bn.ensure(len(stream))
        super().setup(net.to(device), stream, train_cfg, device)
        self.owners = WeightOwners(self.model.hidden)
        if self.pretrained:  # the kept pretrained weights: PackNet's pruned "ImageNet" task
            self.owners.keep_pretrained(self.model.hidden, self.pretrained_prune_ratio)
        self.task = 0

    def shared_fixed(self, task_id: int) -> bool:
        """Biases and shared batch-norm are fixed while training `task_id`: those of the
        pretrained backbone, or those the first task trained."""
        return self.pretrained or task_id > 0

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
                self.guard.freeze(layer.bias, self.shared_fixed(task.id))
        self.guard.freeze_other_head_rows(self.model.head, self.stream, task.id)
        if self.norms:
            start_task_batchnorms(self.norms, task.id)
            freeze_other_batchnorms(self.norms, task.id, self.guard)
        elif self.shared_fixed(task.id):
            freeze_batchnorms(self.model.body, self.guard)
        self.optimizer = self.make_optimizer(self.model.parameters())

    def set_training(self, training: bool) -> None:
        self.model.train(training)
        if training and self.shared_fixed(self.task) and not self.norms:
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
        counts = torch.bincount(owner.long(), minlength=PRETRAINED_OWNER + 1).tolist()
        biases = sum(l.bias.numel() for l in self.model.hidden if l.bias is not None)
        head, count = self.model.head, self.storage
        kept = counts[PRETRAINED_OWNER]
        used = [kept + sum(counts[1 : t + 2]) + biases + head_params(head, task)
                for t, task in enumerate(self.stream.tasks[: self.task + 1])]
        stored = [count.mask_bytes + (count.bn_bytes if self.norms else 0) + count.head_bytes(head, task)
                  + (count.body_bytes if t == 0 and not self.pretrained else 0)  # the network all tasks share
                  for t, task in enumerate(self.stream.tasks[: self.task + 1])]
        extra = {"pretrained_weights_kept": kept} if self.pretrained else {}
        return size_summary(
            sum(p.numel() for p in self.model.parameters()), used, owner.numel(),
            weights_per_task=counts[1 : len(self.stream) + 1], free_weights=counts[0], **extra,
            **count.summary(stored, [count.mask_bytes] * len(stored), count.body_bytes if self.pretrained else 0),
        )

    def state_dict(self) -> dict:
        return {"owners": self.owners.state_dict(), "task": self.task}

    def load_state_dict(self, state: dict) -> None:
        self.owners.load_state_dict(state["owners"])
        self.task = state["task"]
        self._use(self.task)
