"""Feature extraction: a fixed feature extractor and one classifier per task.

The fixed-feature baseline of Li & Hoiem, "Learning without Forgetting" (ECCV 2016 /
TPAMI 2017, Sec. 1 and Figs. 1-2, "Feature Extraction": the shared parameters theta_s of
an ImageNet-trained network and the old tasks' theta_o stay unchanged, and only the new
task's parameters theta_n are trained on its features) and
Piggyback's "Classifier Only" row (Mallya et al. 2018, Table 1: only the classifier of
an ImageNet-trained network is trained per dataset). With a pretrained backbone (its
`pretrained_weights` is set) that is exactly what happens on every task, the first
included: the body never enters the optimizer and stays in eval mode (batch-norm keeps
the pretrained statistics). Without pretrained weights there are no features to start
from, so the whole network is trained on the first task and the body is fixed from then
on (later tasks reuse the first task's features). Each task owns its rows of the shared
head (its outputs); rows of other tasks are kept exactly fixed through the shared
`FreezeGuard` (weight decay and momentum cannot move them), so earlier tasks' logits
never change. `summary()` reports the storage each task adds (its head rows, float32;
the first task also stores the body when it trained it) against a float32 copy of the
network, as Piggyback counts storage. Needs a backbone with a Linear `head` (all of
conf/backbone/). Task-IL only (heads are picked by the task id through the task-IL
restriction).
"""

from __future__ import annotations

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import FreezeGuard, StorageCount, head_params, is_pretrained, size_summary
from cl_bench.strategies.base import Strategy


class FeatureExtraction(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("task_il",)

    def setup(self, model, stream, train_cfg, device) -> None:
        if not isinstance(getattr(model, "head", None), torch.nn.Linear):
            raise CLBenchError(f"feature_extraction needs a backbone with a Linear head; {type(model).__name__} has none")
        self.pretrained = is_pretrained(model)
        self.storage = StorageCount(model) if hasattr(model, "body") else None
        super().setup(model, stream, train_cfg, device)

    def trains_body(self, task_id: int) -> bool:
        return task_id == 0 and not self.pretrained

    def before_task(self, task: Task) -> None:
        self.task = task.id
        head = self.model.head
        body = [p for n, p in self.model.named_parameters() if not n.startswith("head.")]
        for p in body:
            p.requires_grad_(self.trains_body(task.id))
        self.guard = FreezeGuard()
        self.guard.freeze_other_head_rows(head, self.stream, task.id)
        trainable = body + list(head.parameters()) if self.trains_body(task.id) else list(head.parameters())
        self.optimizer = self.make_optimizer(trainable)

    def set_training(self, training: bool) -> None:
        # frozen features: batch-norm statistics stay the pretrained ones, or those of the first task
        self.model.train(training and self.trains_body(getattr(self, "task", 0)))

    def train_step(self, batch) -> dict:
        loss = self.loss(self.model(batch.x), batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.guard.step(self.optimizer, self.optimizer_step)
        return {"loss": loss.detach()}

    def summary(self) -> dict:
        head = self.model.head
        total = sum(p.numel() for p in self.model.parameters())
        body = total - sum(p.numel() for p in head.parameters())
        tasks = self.stream.tasks[: self.task + 1]
        used = [body + head_params(head, t) for t in tasks]
        count, extra = self.storage, {}
        if count is not None:
            stored = [count.head_bytes(head, t) + (count.body_bytes if self.trains_body(t.id) else 0) for t in tasks]
            extra = count.summary(stored, [0] * len(stored), count.body_bytes if self.pretrained else 0)
        return size_summary(total, used, 0, **extra)

    def state_dict(self) -> dict:
        return {"task": getattr(self, "task", 0)}

    def load_state_dict(self, state: dict) -> None:
        self.task = state["task"]
