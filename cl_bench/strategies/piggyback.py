"""Piggyback (Mallya, Davis & Lazebnik, ECCV 2018): adapting one fixed network to many
tasks by learning a binary mask over its weights per task.

The backbone is fixed: loaded from `pretrained` (a state_dict of the backbone) when the
user has weights, otherwise trained normally on the first task (which then uses the
plain backbone). For every other task t, real-valued scores m^t (one per body weight,
initialised to `mask_init`) are thresholded into a binary mask,
    M^t = 1[m^t > threshold],  effective weight W * M^t                      (Sec. 3)
and trained with the straight-through estimator: dL/dm^t_ji = dL/d(W M^t)_ji * W_ji.
Only the scores, the task's head rows and (with `task_batchnorm`) a per-task copy of
each batch-norm layer are trained; after the task the binary mask (1 bit per weight)
is stored and the scores discarded. Defaults follow the authors' code (mask_init 1e-2,
threshold 5e-3, Adam on the scores); `mask_lr` defaults to 1e-3 instead of their 1e-4
because CI-sized protocols take tens of steps per task, not thousands. Biases stay
those of the backbone. Earlier tasks' logits never change, with any optimizer: from
the first masked task on, the body's weights and biases are out of the optimizer, each
task's batch-norm copy (or, with `task_batchnorm=false`, the shared batch-norm, kept in
eval mode) runs only for its own task, and other tasks' head rows are frozen through
the shared `FreezeGuard` (tested with SGD momentum + weight decay and AdamW on a
batch-norm ResNet). Any backbone with `body` and a Linear `head` works (MaskedNet
refuses others in setup). Task-IL only: the task id picks the mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import (
    FreezeGuard, MaskedNet, binarize, bit_bytes, head_params, head_rows_frozen, size_summary, task_batchnorms,
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
        net = MaskedNet(model)
        self.norms = task_batchnorms(net.body) if self.task_batchnorm else []
        for bn in self.norms:
            bn.ensure(len(stream))
        super().setup(net.to(device), stream, train_cfg, device)
        self.first_masked = 0 if self.pretrained else 1  # tasks before it use the plain backbone
        self.masks: list[Optional[list[torch.Tensor]]] = []
        self.task = 0

    def use_task(self, task_id: int) -> None:
        for bn in self.norms:
            bn.task = task_id
        masks = self.masks[task_id] if task_id < len(self.masks) else None
        self.model.set_masks(None if masks is None else [m.float() for m in masks])

    def before_task(self, task: Task) -> None:
        self.task = task.id
        self.use_task(task.id)
        head, self.guard = self.model.head, FreezeGuard()
        for p, frozen in zip((head.weight, head.bias), head_rows_frozen(head, self.stream, task.id)):
            self.guard.freeze(p, frozen)
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
            bn.norms[task.id].load_state_dict(bn.norms[0].state_dict())
            bn.norms[task.id].requires_grad_(True)
            trainable += list(bn.norms[task.id].parameters())
        self.optimizer = self.make_optimizer(trainable)

    def set_training(self, training: bool) -> None:
        self.model.train(training)
        if training and self.task >= self.first_masked and not self.norms:
            self.model.body.eval()  # shared batch-norm statistics stay those of the backbone

    def train_step(self, batch) -> dict:
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
        head = self.model.head
        body = sum(p.numel() for p in self.model.body.parameters())
        biases = sum(l.bias.numel() for l in self.model.hidden if l.bias is not None)
        norms = sum(p.numel() for bn in self.norms for p in bn.norms[0].parameters())
        used, mask_bytes = [], 0
        for t, task in enumerate(self.stream.tasks[: self.task + 1]):
            masks = self.masks[t] if t < len(self.masks) else None
            if masks is None:
                used.append(body - norms * max(len(self.stream) - 1, 0) + head_params(head, task))
            else:
                used.append(sum(int(m.sum()) for m in masks) + biases + norms + head_params(head, task))
                mask_bytes += sum(bit_bytes(m.numel()) for m in masks)
        density = [round(sum(int(m.sum()) for m in ms) / sum(m.numel() for m in ms), 4)
                   for ms in self.masks if ms is not None]
        return size_summary(sum(p.numel() for p in self.model.parameters()), used, mask_bytes, mask_density=density)

    def state_dict(self) -> dict:
        return {"masks": self.masks, "task": self.task}

    def load_state_dict(self, state: dict) -> None:
        self.masks = [None if ms is None else [m.to(self.device) for m in ms] for ms in state["masks"]]
        self.task = state["task"]
