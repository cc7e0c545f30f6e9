"""BiC (Wu et al. 2019, "Large Scale Incremental Learning"): bias correction of new-class logits.

- Stage 1 (Sec. 4.1): train on the new task's samples joined with the stored exemplars,
  minus a held-out validation part, with L = lambda L_d + (1 - lambda) L_c (Eq. 4):
  L_c the cross-entropy over all classes seen so far, L_d the soft-target distillation
  with T = 2 (Eq. 1-2) between the previous model (bias-corrected, frozen at task
  start) and the current one on the old classes' logits, lambda = n / (n + m) for n old
  and m new classes. Eq. 2 has no T^2 factor, so the shared `kd_loss` runs with
  `t_squared=False`.
- Stage 2 (Sec. 4.2, Eq. 5): with the network frozen, fit a two-parameter linear layer
  q_k = alpha o_k + beta on the new classes' logits (old classes untouched) by
  minimising the cross-entropy over all seen classes on the validation set, full batch.
  Each task keeps its own (alpha, beta); earlier ones stay fixed and, as in FACIL's
  implementation, are part of the forward pass in later training and at test time.
- Validation split (Sec. 4.2): per old class, the last `val_fraction` of its exemplars
  in herding order (the paper's 9:1 exemplar split); per new class, as many randomly
  chosen samples, held out of stage 1. The memory is then updated with herding on all
  of the task's samples (the authors select exemplars by herding as in iCaRL).

Classification: the bias-corrected softmax over the classes seen so far (the authors'
head grows by the new classes each step); the head here is allocated in full, so
`predict` gives the outputs of classes not trained yet -inf, and the lower triangle of
the accuracy matrix does not depend on `train.active_classes`.

The teacher and the network during the bias fit run in eval mode (batch-norm running
statistics untouched); (alpha, beta) are plain tensors outside the optimizer, so stage 1
(with any optimizer, weight decay included) never changes them, and stage 2 changes only
the current task's pair.

class_il only. The first task has no old classes: plain cross-entropy, no correction.
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


class BiC(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il",)

    def __init__(
        self,
        memory_size: int = 200,
        selection: str = "herding",
        temperature: float = 2.0,
        val_fraction: float = 0.1,
        bias_epochs: int = 200,
        bias_lr: float = 0.01,
    ) -> None:
        """memory_size: exemplars shared by all classes; selection: herding | random; temperature: T;
        val_fraction: share of each class held out to fit the bias layer; bias_epochs / bias_lr: its fit."""
        for key, value in (("temperature", temperature), ("bias_lr", bias_lr)):
            if value <= 0:
                raise CLBenchError(f"strategy.{key} must be positive, got {value}")
        if not 0 < val_fraction < 1:
            raise CLBenchError(f"strategy.val_fraction must be in (0, 1), got {val_fraction}")
        if bias_epochs < 1:
            raise CLBenchError(f"strategy.bias_epochs must be positive, got {bias_epochs}")
        super().__init__(memory_size, selection, "class", need_memory=True)
        self.temperature, self.val_fraction = temperature, val_fraction
        self.bias_epochs, self.bias_lr = bias_epochs, bias_lr

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        self.alpha = torch.ones(len(stream), device=device)
        self.beta = torch.zeros(len(stream), device=device)
        self._output_task = torch.zeros(stream.num_outputs, dtype=torch.long, device=device)
        for task in stream.tasks:
            self._output_task[task.outputs] = task.id

    def corrected(self, logits: torch.Tensor, alpha=None, beta=None) -> torch.Tensor:
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        return logits * alpha[self._output_task] + beta[self._output_task]

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._seen = self.mark_seen(task)
        self._old = self.seen_outputs(task, include_current=False)
        self.teacher, self._train, self._val = None, task.train, None
        if task.id == 0:
            return
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self._teacher_bias = (self.alpha.clone(), self.beta.clone())
        train_parts, val_parts = [], []
        n_val = 1
        for c in self._old:
            idx = self.memory.indices(label=c)
            idx = idx[self.memory.rank[idx].argsort()]
            n_val = max(1, round(self.val_fraction * len(idx)))
            train_parts.append(self.memory.split(idx[:-n_val]))
            val_parts.append(self.memory.split(idx[-n_val:]))
        for c in task.outputs:
            idx = (task.train.y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=self.generator).to(idx.device)]
            train_parts.append(task.train.subset(idx[n_val:]))
            val_parts.append(task.train.subset(idx[:n_val]))
        self._train, self._val = Split.cat(train_parts), Split.cat(val_parts)

    def training_data(self, task: Task) -> Split:
        return self._train

    def train_step(self, batch: Batch) -> dict:
        logits = self.corrected(self.model(batch.x))  # earlier tasks' fixed corrections are part of the net
        loss = F.cross_entropy(logits.masked_fill(~self._seen, float("-inf")), batch.y)
        if self.teacher is not None:
            with torch.no_grad():
                old_logits = self.corrected(self.teacher(batch.x), *self._teacher_bias)
            distill = kd_loss(logits, old_logits, self.temperature, self._old, t_squared=False)
            lam = len(self._old) / int(self._seen.sum())
            loss = lam * distill + (1 - lam) * loss
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        if self._val is not None:
            self.fit_bias(task)
        self.teacher, self._train, self._val = None, None, None
        self.remember(task)

    def fit_bias(self, task: Task) -> None:
        self.model.eval()
        with torch.no_grad():
            logits = self.model(self.stream.transform(self._val.x))
        self.model.train()
        params = torch.tensor([1.0, 0.0], device=self.device, requires_grad=True)
        optimizer = torch.optim.Adam([params], lr=self.bias_lr)
        with self.progress("bias correction", total=self.bias_epochs) as advance:  # full-batch epochs
            for _ in range(self.bias_epochs):
                alpha, beta = self.alpha.clone(), self.beta.clone()
                alpha[task.id], beta[task.id] = params[0], params[1]
                scores = self.corrected(logits, alpha, beta).masked_fill(~self._seen, float("-inf"))
                loss = F.cross_entropy(scores, self._val.y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                advance()
        self.alpha[task.id], self.beta[task.id] = params.detach()

    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.over_seen(self.corrected(self.model(x)))

    def summary(self) -> dict:
        return {**super().summary(), "alpha": self.alpha.tolist(), "beta": self.beta.tolist()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "alpha": self.alpha, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.alpha.copy_(state["alpha"])
        self.beta.copy_(state["beta"])
