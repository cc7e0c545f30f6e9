"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

At the end of each task a frozen copy of the model is kept. While training the next
task, the old model's outputs on the *new* data are the soft targets of a distillation
term (Eq. 2 with T = 2: the shared `kd_loss`, scaled by T^2).

Two ways of weighting the two terms (`weighting`):

- ``"sum"`` (the default; Li & Hoiem, Eq. 3 without the weight decay): L = L_new +
  alpha * sum over old tasks of L_old, with alpha = lambda_o = 1 in the paper.
- ``"task_ratio"`` (van de Ven & Tolias, "Three scenarios for continual learning", 2019,
  Sec. 4 and their code, train.py / encoder.py): L = (1/t) L_new + (1 - 1/t) alpha *
  mean over old tasks of L_old, where t is the number of tasks seen including the
  current one. In task-IL this is the "sum" loss divided by t (the same optimum; Adam
  hardly sees the scale). In class-IL, where all old classes form one term, it weighs
  distillation t - 1 times more than "sum" does; on new data whose old-class targets are
  padded with zeros this holds the new classes' scores below the old ones, so the model
  keeps task 0 and hardly learns the later tasks (measured: final accuracies about
  0.99 / 0.4 / 0.4 / 0 / 0 on Split Digits). `scripts/reproduce_split_mnist.py` uses it
  to reproduce that paper's LwF row.

Which outputs each term covers, by scenario:

- task-IL: L_new on the current task's outputs; one L_old per old task on that task's
  outputs (the paper's old heads).
- class-IL: the authors' code restricts both terms to the classes seen so far (their
  "active classes"; unseen classes' outputs take no part). L_old compares the student's
  distribution over *all* seen classes with the old model's distribution over the old
  classes padded with zeros for the current task's classes (`class_il_targets="padded"`),
  so distillation also keeps the new classes from taking over the old classes' inputs;
  ``"old"`` distils over the old classes' logits only, on both sides, which leaves the
  new classes free to win everywhere and ends near fine-tuning in class-IL.
- domain-IL: one L_old on the shared head.

Prediction in class-IL: LwF's network grows a head per task (Li & Hoiem, Sec. 3), and
van de Ven & Tolias's class-IL LwF predicts over the active classes; the head here is
allocated in full, so `predict` gives the outputs of classes whose task has not been
trained yet -inf. Training already ignores them, so the accuracy matrix is the same with
and without `train.active_classes`, and `alpha=0` equals finetune run with
`train.active_classes=true` (in task-IL and domain-IL: finetune as it is).

The old model is a frozen copy in eval mode: its forward passes never update batch-norm
running statistics.

Warm-up (`warmup_epochs`, Li & Hoiem TPAMI 2017, Sec. 3, "Training": "we first freeze
theta_s and theta_o and train theta_n to convergence, then jointly train all weights"):
before each task after the first, the new task's head rows alone are trained for
`warmup_epochs` epochs with the new-task loss (the body in eval mode, so batch-norm
statistics and dropout stay put, and every other head row kept exactly fixed through
`FreezeGuard`, whatever the optimizer's momentum or weight decay), with the run's
optimizer settings and `warmup_lr` (null: `train.lr`). Then the joint phase runs as
usual. Off by default (0), as in van de Ven & Tolias's and FACIL's implementations; the
paper's own protocol (`experiment=lwf_imagenet_to_x`) turns it on. Task-IL and class-IL
only (a domain-IL head is shared, there is no new head to warm up).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.data.stream import Task, output_columns
from cl_bench.models.masked import FreezeGuard, epochs
from cl_bench.strategies.base import Batch, Strategy, loss_diverged
from cl_bench.strategies.distillation import kd_loss
from cl_bench.strategies.importance import check_positive

WEIGHTINGS = ("sum", "task_ratio")
CLASS_IL_TARGETS = ("padded", "old")


class LwF(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    def __init__(
        self,
        alpha: float = 1.0,
        temperature: float = 2.0,
        weighting: str = "sum",
        class_il_targets: str = "padded",
        warmup_epochs: int = 0,
        warmup_lr: Optional[float] = None,
    ) -> None:
        check_positive("alpha", alpha, allow_zero=True)
        if warmup_epochs < 0:
            raise CLBenchError(f"strategy.warmup_epochs must be >= 0, got {warmup_epochs}")
        if warmup_lr is not None:
            check_positive("warmup_lr", warmup_lr)
        self.warmup_epochs, self.warmup_lr = int(warmup_epochs), warmup_lr
        check_positive("temperature", temperature)
        if weighting not in WEIGHTINGS:
            raise CLBenchError(f"strategy.weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if class_il_targets not in CLASS_IL_TARGETS:
            raise CLBenchError(
                f"strategy.class_il_targets={class_il_targets!r} is not one of {', '.join(CLASS_IL_TARGETS)}"
            )
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.weighting, self.class_il_targets = weighting, class_il_targets
        self.old_model = None
        self.tasks_seen = 0

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        seen = self.stream.tasks[: task.id + 1]
        old = self.stream.tasks[: self.tasks_seen]
        columns = lambda tasks: output_columns([o for t in tasks for o in t.outputs], self.device)  # noqa: E731
        self.active = None  # outputs the losses cover; None = all (task-IL masks per sample instead)
        self.position = None  # label -> position among the active outputs; None: the label itself
        if self.stream.scenario == "task_il":
            self.groups = [(columns([t]), columns([t])) for t in old]
        elif self.stream.scenario == "class_il":
            self.active = columns(seen)
            if not (isinstance(self.active, slice) and self.active.start == 0):
                active = torch.arange(self.stream.num_outputs, device=self.device)[self.active]
                self.position = torch.full((self.stream.num_outputs,), -1, dtype=torch.long, device=self.device)
                self.position[active] = torch.arange(len(active), device=self.device)
            old_outputs = columns(old)
            student = self.active if self.class_il_targets == "padded" else old_outputs
            self.groups = [(student, old_outputs)] if old else []
        else:
            self.groups = [(slice(None), slice(None))] if old else []
        t = task.id + 1
        self.new_weight = 1.0 / t if self.weighting == "task_ratio" else 1.0
        if self.warmup_epochs and self.old_model is not None:
            self._warm_up(task)

    def setup(self, model, stream, train_cfg, device) -> None:
        if self.warmup_epochs:
            if stream.scenario == "domain_il":
                raise CLBenchError("strategy.warmup_epochs trains a new task's own head; domain_il has one shared "
                                   "head (set strategy.warmup_epochs=0)")
            if not isinstance(getattr(model, "head", None), torch.nn.Linear):
                raise CLBenchError(f"strategy.warmup_epochs needs a backbone with a Linear head; "
                                   f"{type(model).__name__} has none")
        super().setup(model, stream, train_cfg, device)

    def _warm_up(self, task: Task) -> None:
        """The paper's warm-up: the new task's head rows alone, the rest exactly fixed."""
        head = self.model.head
        guard = FreezeGuard()
        guard.freeze_other_head_rows(head, self.stream, task.id)
        grads = {p: p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = [p for p in head.parameters()]
        for p in params:
            p.requires_grad_(True)
        optimizer = self.make_optimizer(params)
        if self.warmup_lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.warmup_lr
        self.model.eval()
        data = self.training_data(task)
        per_epoch = -(-len(data) // self.train_cfg.batch_size)
        batches, losses = per_epoch * self.warmup_epochs, []
        try:
            with self.progress("LwF warm-up (new head)", total=batches) as advance:
                for x, y in epochs(data, self.stream, self.warmup_epochs, self.train_cfg.batch_size):
                    with self.autocast():
                        loss = self._new_loss(self.model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    self.backward(loss)
                    guard.step(optimizer, lambda: self.optimizer_step(optimizer))
                    losses.append(loss.detach())
                    advance()
        finally:
            for p, flag in grads.items():
                p.requires_grad_(flag)
            self.model.train()
        # the runner's divergence rule (train.max_loss) on the warm-up's last epoch, and finite weights
        last = float(torch.stack(losses[-per_epoch:]).float().mean()) if losses else 0.0
        if loss_diverged(last, self.train_cfg.max_loss) or not all(torch.isfinite(p).all() for p in params):
            lr = self.warmup_lr if self.warmup_lr is not None else self.train_cfg.lr
            raise CLBenchError(f"LwF's warm-up diverged in task {task.id} (last epoch's loss {last:.4g}); "
                               f"lower strategy.warmup_lr (the warm-up ran at {lr})")

    def _new_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.active is not None:  # class-IL: only the classes seen so far compete
            return F.cross_entropy(logits[:, self.active], y if self.position is None else self.position[y])
        return self.loss(logits, y)

    def _distillation(self, logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        terms = [kd_loss(logits[:, student], old_logits[:, teacher], self.temperature)
                 for student, teacher in self.groups]  # class-IL, padded: the teacher covers the old classes only
        total = sum(terms[1:], terms[0])  # terms[0] + terms[1] + ..., in order
        return total / len(terms) if self.weighting == "task_ratio" else total

    def train_step(self, batch: Batch) -> dict:
        # Weights of exactly 1 are not multiplied in (nor a zero distillation term added):
        # the same values and gradients, fewer operations per step.
        logits = self.model(batch.x)
        total = new_loss = self._new_loss(logits, batch.y)
        if self.new_weight != 1.0:
            total = self.new_weight * new_loss
        distill = None
        if self.old_model is not None and self.alpha > 0 and self.groups:
            with torch.no_grad():
                old_logits = self.old_model(batch.x)
            distill = self._distillation(logits, old_logits)
            old_weight = ((1.0 - self.new_weight) if self.weighting == "task_ratio" else 1.0) * self.alpha
            total = total + (distill if old_weight == 1.0 else old_weight * distill)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(total)
        self.optimizer_step()
        return {"loss": total.detach()}

    def _freeze_copy(self) -> torch.nn.Module:
        old = copy.deepcopy(self.model).eval()
        for p in old.parameters():
            p.requires_grad_(False)
        return old

    def after_task(self, task: Task) -> None:
        self.old_model = self._freeze_copy()
        self.tasks_seen = task.id + 1

    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        scores = self.model(x)
        if self.stream.scenario != "class_il" or self.tasks_seen == 0:
            return scores  # before any task (the untrained baseline row) every output competes
        unseen = torch.ones(self.stream.num_outputs, dtype=torch.bool, device=scores.device)
        unseen[[o for t in self.stream.tasks[: self.tasks_seen] for o in t.outputs]] = False
        return scores.masked_fill(unseen, float("-inf"))

    def summary(self) -> dict:
        return {"old_model": self.old_model is not None, "distilled_tasks": self.tasks_seen}

    def state_dict(self) -> dict:
        return {
            "tasks_seen": self.tasks_seen,
            "old_model": self.old_model.state_dict() if self.old_model is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.tasks_seen = state["tasks_seen"]
        self.old_model = None
        if state["old_model"] is not None:
            self.old_model = self._freeze_copy()
            self.old_model.load_state_dict(state["old_model"])
