"""Piggyback (Mallya, Davis & Lazebnik, ECCV 2018): adapting one fixed network to many
tasks by learning a binary mask over its weights per task.

The backbone is fixed. In the paper (and the authors' code, arunmallya/piggyback) it is
an ImageNet-trained VGG-16, ResNet-50 or DenseNet-121 from torchvision, and every new
task, the first one included, learns a mask over it; the plain network never trains.
clbench does the same whenever the backbone is pretrained: built with pretrained weights
(its `pretrained_weights` is set, e.g. `backbone.pretrained=...`) or loaded from
`strategy.pretrained` (a state_dict of the backbone). Without pretrained weights the
backbone is first trained normally on the first task (which then uses the plain
backbone) and fixed from then on. For every masked task t, real-valued scores m^t (one
per body weight, initialised to `mask_init`) are thresholded into a binary mask,
    M^t = 1[m^t > threshold],  effective weight W * M^t                      (Sec. 3)
and trained with the straight-through estimator: dL/dm^t_ji = dL/d(W M^t)_ji * W_ji.
Only the scores, the task's head rows and (with `task_batchnorm`) the task's copy of
each batch-norm layer are trained; after the task the binary mask (1 bit per weight)
is stored and the scores discarded. Defaults follow the authors' code (mask_init 1e-2,
threshold 5e-3, Adam on the scores); `mask_lr` defaults to 1e-3 instead of their 1e-4
because CI-sized protocols take tens of steps per task, not thousands. Biases stay
those of the backbone.

Batch-norm, the paper's two settings (the authors' `--train_bn` flag): with
`task_batchnorm=true` every task trains its own copy of each batch-norm layer (affine
parameters and running statistics), started from the backbone's; copy 0 is the
backbone's own and, on a pretrained backbone, is never trained. With
`task_batchnorm=false` batch-norm keeps the backbone's values: eval mode while training
(the authors' `train_nobn`) and out of the optimizer (they zero its gradients; here it
never reaches the optimizer, so weight decay and momentum cannot move it either). Earlier
tasks' logits never change, with any optimizer: from the first masked task on, the
body's weights and biases are out of the optimizer, each task's batch-norm copy runs
only for its own task, and other tasks' head rows are frozen through the shared
`FreezeGuard` (tested with SGD momentum + weight decay and AdamW on a batch-norm ResNet:
tests/test_isolation.py, and on a pretrained one with both batch-norm settings:
tests/test_pretrained_isolation.py).

`summary()` reports each task's mask density (one entry per masked task) and its storage
as the paper counts it (abstract: masks "incur a low overhead of 1 bit per network
parameter, per task", against a float32 copy of the network per task for individual
networks): per task the bit-packed mask, the task's batch-norm copy and head
rows (`storage_bytes_per_task`, `storage_vs_copy_per_task`; a task that trained the
plain backbone stores the whole body), and `storage_base_bytes`, the pretrained backbone
shared by all. Any backbone with `body` and a Linear `head` works (MaskedNet refuses
others in setup). Task-IL only: the task id picks the mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import (
    FreezeGuard, MaskedNet, StorageCount, binarize, head_params, is_pretrained, size_summary,
    task_batchnorms,
)
from cl_bench.strategies.base import Strategy


class Piggyback(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("task_il",)

    def __init__(self, mask_init: float = 1e-2, threshold: float = 5e-3, mask_lr: float = 1e-3,
                 task_batchnorm: bool = True, pretrained: Optional[str] = None) -> None:
        if mask_lr <= 0:
            raise CLBenchError(f"strategy.mask_lr must be positive, got {mask_lr}")
        if mask_init <= threshold:
            raise CLBenchError(f"strategy.mask_init ({mask_init}) must exceed strategy.threshold ({threshold})")
        self.mask_init, self.threshold, self.mask_lr = mask_init, threshold, mask_lr
        self.task_batchnorm, self.pretrained = task_batchnorm, pretrained

    def setup(self, model, stream, train_cfg, device) -> None:
        if self.pretrained:
            try:
                model.load_state_dict(torch.load(self.pretrained, map_location="cpu"))
            except Exception as exc:
                raise CLBenchError(f"strategy.pretrained: cannot load backbone weights ({exc})") from None
        self.fixed_backbone = bool(self.pretrained) or is_pretrained(model)
        self.first_masked = 0 if self.fixed_backbone else 1  # tasks before it use the plain backbone
        # batch-norm copy k + bn_offset serves task k; copy 0 is the backbone's (task 0's when it trains it)
        self.bn_offset = 1 - self.first_masked
        net = MaskedNet(model)  # refuses backbones without body and Linear head
        self.storage = StorageCount(model)
        self.norms = task_batchnorms(net.body) if self.task_batchnorm else []
        for bn in self.norms:
            bn.ensure(len(stream) + self.bn_offset)
        super().setup(net.to(device), stream, train_cfg, device)
        self.masks: list[Optional[list[torch.Tensor]]] = []
        self.task = 0

    def use_task(self, task_id: int) -> None:
        for bn in self.norms:
            bn.task = task_id + self.bn_offset
        if task_id == self.task and getattr(self, "scores", None) is not None:  # mid-task (validation): its mask so far
            self.model.set_masks([(s.detach() > self.threshold).float() for s in self.scores])
            return
        masks = self.masks[task_id] if task_id < len(self.masks) else None
        self.model.set_masks(None if masks is None else [m.float() for m in masks])

    def before_task(self, task: Task) -> None:
        self.task = task.id
        self.use_task(task.id)
        head, self.guard = self.model.head, FreezeGuard()
        self.guard.freeze_other_head_rows(head, self.stream, task.id)
        self.scores = None
        if task.id < self.first_masked:
            self.mask_optimizer = None
            self.optimizer = self.make_optimizer(self.model.parameters())
            return
        self.model.body.requires_grad_(False)
        self.scores = nn.ParameterList(nn.Parameter(torch.full_like(l.weight, self.mask_init)) for l in self.model.hidden)
        self.mask_optimizer = torch.optim.Adam(self.scores, lr=self.mask_lr)
        trainable = list(head.parameters())
        for bn in self.norms:  # the task's batch-norm starts from the backbone's
            norm = bn.norms[task.id + self.bn_offset]
            norm.load_state_dict(bn.norms[0].state_dict())
            norm.requires_grad_(True)
            trainable += list(norm.parameters())
        self.optimizer = self.make_optimizer(trainable)

    def set_training(self, training: bool) -> None:
        self.model.train(training)
        if training and self.task >= self.first_masked and not self.norms:
            self.model.body.eval()  # shared batch-norm statistics stay those of the backbone

    @property
    def scheduled_optimizers(self) -> list:
        """The mask optimizer follows `train.scheduler` as the run's optimizer does (runner._set_lr),
        as the authors decay both (Piggyback's main.py: lr_mask_decay_every, lr_classifier_decay_every)."""
        return [self.mask_optimizer] if getattr(self, "mask_optimizer", None) is not None else []

    def train_step(self, batch) -> dict:
        for bn in self.norms:  # a prediction in between (validation) may have picked another task's copy
            bn.task = self.task + self.bn_offset
        if self.scores is not None:
            self.model.set_masks([binarize(s, self.threshold) for s in self.scores])
        loss = self.loss(self.model(batch.x), batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.mask_optimizer is not None:
            self.mask_optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        optimizers = (self.optimizer,) if self.mask_optimizer is None else (self.mask_optimizer, self.optimizer)
        self.guard.step(self.optimizer, lambda: self.optimizer_step(*optimizers))
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        while len(self.masks) <= task.id:
            self.masks.append(None)
        if self.scores is not None:
            self.masks[task.id] = [(s.detach() > self.threshold) for s in self.scores]
        self.scores = self.mask_optimizer = None
        self.use_task(task.id)

    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        self.use_task(task_id)
        return self.model(x)

    def summary(self) -> dict:
        head, count = self.model.head, self.storage
        body = sum(p.numel() for p in self.model.body.parameters())
        biases = sum(l.bias.numel() for l in self.model.hidden if l.bias is not None)
        norms = sum(p.numel() for bn in self.norms for p in bn.norms[0].parameters())
        extra_copies = len(self.norms[0].norms) - 1 if self.norms else 0
        used, stored, mask_bytes, masks_per_task = [], [], 0, []
        for t, task in enumerate(self.stream.tasks[: self.task + 1]):
            masks = self.masks[t] if t < len(self.masks) else None
            if masks is None:  # the task trained the plain backbone: it stores the whole body
                used.append(body - norms * extra_copies + head_params(head, task))
                stored.append(count.body_bytes + count.head_bytes(head, task))
                masks_per_task.append(0)
            else:
                used.append(sum(int(m.sum()) for m in masks) + biases + norms + head_params(head, task))
                stored.append(count.mask_bytes + (count.bn_bytes if self.norms else 0) + count.head_bytes(head, task))
                mask_bytes += count.mask_bytes
                masks_per_task.append(count.mask_bytes)
        density = [round(sum(int(m.sum()) for m in ms) / sum(m.numel() for m in ms), 4)
                   for ms in self.masks if ms is not None]
        base = count.body_bytes if self.fixed_backbone else 0
        return size_summary(sum(p.numel() for p in self.model.parameters()), used, mask_bytes, mask_density=density,
                            **count.summary(stored, masks_per_task, base))

    def state_dict(self) -> dict:
        return {"masks": self.masks, "task": self.task}

    def load_state_dict(self, state: dict) -> None:
        self.masks = [None if ms is None else [m.to(self.device) for m in ms] for ms in state["masks"]]
        self.task = state["task"]
