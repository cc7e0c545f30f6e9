"""End-to-End Incremental Learning (Castro et al. 2018, "End-to-End Incremental Learning").

- Incremental training (Sec. 4.1-4.2): train on the new task's samples joined with the
  stored exemplars with the cross-distilled loss L = L_C + sum_f L_Df (Eq. 1): L_C is
  the cross-entropy over all classes seen so far (old and new logits), and one
  distillation term per earlier incremental step f, the soft-target loss with T = 2
  (Eq. 2-3) between the frozen previous model and the current one on that step's
  logits (the shared `kd_loss`). Eq. 3 is -1/N sum_i sum_j pdist_ij log qdist_ij with no
  T^2 factor, and so is the authors' code (MatConvNet `vl_nnsoftmaxdiff.m`, mode "MI":
  derivative (softmax - c) / T, loss weight 1 in `fork_resnet_distillation.m`), so
  `kd_loss` is called with `t_squared=False`.
- Balanced fine-tuning (Sec. 4.3): after each incremental step, a few epochs at a
  learning rate reduced by `finetune_lr_factor` (the paper: 10x smaller) on a
  class-balanced subset: the old classes' exemplars and as many randomly chosen
  samples of each new class as each old class has. As in the paper, a temporary
  distillation term on the new classes' logits (teacher: the model before this
  fine-tuning) keeps what was learned about them.
- Representative memory (Sec. 3): then the class-balanced memory is updated by
  herding (old classes shrink to their first m exemplars).

Classification (Sec. 4): the softmax over the classification layers of all classes seen
so far; the network grows one layer per step, so a class whose task has not come yet
has no output. Here the head is allocated in full, so `predict` gives those outputs
-inf: the lower triangle of the accuracy matrix is the same with and without
`train.active_classes` (whose losses EEIL already restricts to the seen classes).

The balanced fine-tuning runs inside `after_task` (part of the task's train time).
The paper's extra data augmentation (brightness, contrast, crops) is the stream's
`transform` here, applied to fresh and replayed samples alike. The frozen teachers run
in eval mode (batch-norm running statistics untouched by their forward passes).
class_il only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.data.stream import Split, Task
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy
from cl_bench.strategies.distillation import kd_loss


class EEIL(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il",)

    def __init__(
        self,
        memory_size: int = 200,
        selection: str = "herding",
        temperature: float = 2.0,
        finetune_epochs: int = 10,
        finetune_lr_factor: float = 0.1,
    ) -> None:
        """memory_size: exemplars shared by all classes; selection: herding | random; temperature: T of
        the distillation; finetune_epochs / finetune_lr_factor: the balanced fine-tuning stage."""
        if temperature <= 0:
            raise CLBenchError(f"strategy.temperature must be positive, got {temperature}")
        if finetune_epochs < 0:
            raise CLBenchError(f"strategy.finetune_epochs must be non-negative, got {finetune_epochs}")
        if finetune_lr_factor <= 0:
            raise CLBenchError(f"strategy.finetune_lr_factor must be positive, got {finetune_lr_factor}")
        super().__init__(memory_size, selection, "class", need_memory=True)
        self.temperature, self.finetune_epochs, self.finetune_lr_factor = temperature, finetune_epochs, finetune_lr_factor

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._seen = self.mark_seen(task)
        self._old_steps = [t.outputs for t in self.stream.tasks[: task.id]]
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False) if task.id > 0 else None

    def training_data(self, task: Task) -> Split:
        return self.training_data_with_memory(task)

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.masked_fill(~self._seen, float("-inf")), y)

    def step(self, x: torch.Tensor, y: torch.Tensor, teacher, groups) -> torch.Tensor:
        logits = self.model(x)
        loss = self.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                old_logits = teacher(x)
            for outputs in groups:
                loss = loss + kd_loss(logits, old_logits, self.temperature, outputs, t_squared=False)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        return loss.detach()

    def train_step(self, batch: Batch) -> dict:
        return {"loss": self.step(batch.x, batch.y, self.teacher, self._old_steps)}

    def after_task(self, task: Task) -> None:
        if self.teacher is not None and self.finetune_epochs > 0:
            self.balanced_finetune(task)
        self.teacher = None
        self.remember(task)

    def balanced_finetune(self, task: Task) -> None:
        per_class = min(len(self.memory.indices(label=c)) for c in self.memory.labels())
        new = [
            idx[torch.randperm(len(idx), generator=self.generator)[:per_class].to(idx.device)]
            for idx in ((task.train.y == c).nonzero().flatten() for c in task.outputs)
        ]
        data = Split.cat([self.memory.split(), task.train.subset(torch.cat(new))])
        teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        main_optimizer, self.optimizer = self.optimizer, self.make_optimizer(self.model.parameters())
        for group in self.optimizer.param_groups:
            group["lr"] *= self.finetune_lr_factor
        self.model.train()
        for x, y in self.passes(data, self.finetune_epochs, self.train_cfg.batch_size, "balanced fine-tuning"):
            self.step(x, y, teacher, [task.outputs])
        self.optimizer = main_optimizer  # the fine-tuning optimizer (reduced lr) ends here

    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.over_seen(self.model(x))
