"""Feature extraction: train the whole network on the first task, then freeze the
backbone and train only each new task's classifier.

The fixed-feature baseline of Li & Hoiem, "Learning without Forgetting" (TPAMI 2017,
Sec. 3 "Feature Extraction") and Piggyback's "Classifier Only" row (Mallya et al.
2018, Table 1). Each task owns its rows of the shared head (its outputs); rows of
other tasks are kept exactly fixed, so earlier tasks cannot be forgotten, but later
tasks can only reuse the first task's features. From task 1 on the body is out of the
optimizer and in eval mode (batch-norm statistics stay those of the first task) and the
other tasks' head rows are frozen through the shared `FreezeGuard` (weight decay and
momentum cannot move them), so earlier tasks' logits never change. Needs a backbone
with a Linear `head` (all of conf/backbone/). Task-IL only (heads are picked by the
task id through the task-IL restriction).
"""

from __future__ import annotations

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import FreezeGuard, head_params, size_summary
from cl_bench.strategies.base import Strategy


class FeatureExtraction(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("task_il",)

    def setup(self, model, stream, train_cfg, device) -> None:
        if not isinstance(getattr(model, "head", None), torch.nn.Linear):
            raise CLBenchError(f"feature_extraction needs a backbone with a Linear head; {type(model).__name__} has none")
        super().setup(model, stream, train_cfg, device)

    def before_task(self, task: Task) -> None:
        self.task = task.id
        head = self.model.head
        body = [p for n, p in self.model.named_parameters() if not n.startswith("head.")]
        for p in body:
            p.requires_grad_(task.id == 0)
        self.guard = FreezeGuard()
        rows = torch.ones(head.out_features, dtype=torch.bool, device=head.weight.device)
        rows[torch.tensor(task.outputs, device=rows.device)] = False
        self.guard.freeze(head.weight, rows[:, None].expand_as(head.weight).clone())
        if head.bias is not None:
            self.guard.freeze(head.bias, rows)
        trainable = body + list(head.parameters()) if task.id == 0 else list(head.parameters())
        self.optimizer = self.make_optimizer(trainable)

    def set_training(self, training: bool) -> None:
        # frozen features: batch-norm statistics stay those of the first task
        self.model.train(training and getattr(self, "task", 0) == 0)

    def train_step(self, batch) -> dict:
        loss = self.loss(self.model(batch.x), batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.guard.step(self.optimizer, self.optimizer_step)
        return {"loss": loss.detach()}

    def summary(self) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        body = total - sum(p.numel() for p in self.model.head.parameters())
        used = [body + head_params(self.model.head, t) for t in self.stream.tasks[: self.task + 1]]
        return size_summary(total, used, 0)

    def state_dict(self) -> dict:
        return {"task": getattr(self, "task", 0)}

    def load_state_dict(self, state: dict) -> None:
        self.task = state["task"]
