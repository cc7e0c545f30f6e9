"""WA (Zhao, Xiao, Gan, Zhang & Xia 2020, "Maintaining Discrimination and Fairness in Class
Incremental Learning"): distillation for discrimination within the old classes, weight
aligning for fairness between old and new ones.

- Training (Sec. 3.2): on the new task's samples joined with the stored exemplars,
  L = (1 - lambda) L_CE + lambda L_KD, lambda = C_old / (C_old + C_new) (the classes of the
  earlier tasks and of this one; `kd_lambda` fixes it instead). L_CE is the cross-entropy over
  the classes seen so far (the authors' FC layer grows with each task; PyCIL's `wa.py` the
  same); L_KD the soft-target cross-entropy with T = 2 between the frozen previous model and
  the current one on the old classes' logits, -1/N sum p_T log q_T with no T^2 factor
  (PyCIL's `_KD_loss`; DER's WA re-implementation uses the KL divergence, same gradient), the
  shared `kd_loss` with `t_squared=False`. The previous model is the aligned network at the
  end of the last task, frozen and in eval mode (its forward passes leave batch-norm
  statistics alone).
- Weight clipping (Sec. 3.3): after every optimisation step the FC layer's weights are
  clipped at 0 from below, so that the logits' scale is governed by the weight norms that
  aligning equalises (`clip_weights`; DER's WA re-implementation clamps the classifier after
  each step the same way, PyCIL's `wa.py` does not).
- Weight aligning (Sec. 3.3, Eq. 8-9): after the task's training, the new classes' weight
  vectors are rescaled by gamma = Mean(||W_old||) / Mean(||W_new||), norms of the head's
  rows (old: every class of the earlier tasks; new: this task's), so both groups end with
  the same mean norm. Old rows and the biases are untouched (PyCIL's `weight_align` scales
  the weight rows only; the paper's logits are W^T phi(x)). The first task has no old
  classes: plain cross-entropy, no aligning.
- Memory (Sec. 4): class-balanced herding as iCaRL (the shared buffer), filled after
  aligning; m = floor(memory_size / classes seen) per class.

Classification: the softmax over the classes seen so far (the head is allocated in full
here, so `predict` gives the classes not trained yet -inf, as EEIL and BiC).

Reductions: with `align=false`, `kd_lambda=0`, `clip_weights=false` and `memory_size=0` the
loss is the cross-entropy over the classes seen so far on the task's own data, i.e.
`finetune` with `train.active_classes=true`, step for step.

class_il only (the paper's setting). Defaults: memory 200 here (the paper: 2000 on CIFAR-100
and ImageNet-100, 20000 on ImageNet-1000).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Split, Task
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy
from cl_bench.strategies.distillation import kd_loss


class WA(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il",)

    def __init__(
        self,
        memory_size: int = 200,
        selection: str = "herding",
        temperature: float = 2.0,
        kd_lambda: Optional[float] = None,
        align: bool = True,
        clip_weights: bool = True,
    ) -> None:
        """memory_size: exemplars shared by all classes; selection: herding | random; temperature: T;
        kd_lambda: the distillation weight (null: C_old / (C_old + C_new)); align: weight aligning after
        each task; clip_weights: FC weights clipped at 0 after every step."""
        if temperature <= 0:
            raise CLBenchError(f"strategy.temperature must be positive, got {temperature}")
        if kd_lambda is not None and not 0 <= kd_lambda <= 1:
            raise CLBenchError(f"strategy.kd_lambda must be in [0, 1] or null (adaptive), got {kd_lambda}")
        super().__init__(memory_size, selection, "class")
        self.temperature, self.kd_lambda, self.align, self.clip_weights = temperature, kd_lambda, align, clip_weights
        self.teacher = None
        self.gamma: list[float] = []  # the aligning factor of each task after the first

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear):
            raise CLBenchError(
                f"strategy WA aligns the weight vectors of a linear FC head (model.head); this backbone's head is "
                f"{type(head).__name__}"
            )

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._seen = self.mark_seen(task)
        self._old = self.seen_outputs(task, include_current=False)
        self._lambda = len(self._old) / int(self._seen.sum()) if self.kd_lambda is None else self.kd_lambda
        self.teacher = None
        if self._old and self._lambda > 0:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)

    def training_data(self, task: Task) -> Split:
        return self.training_data_with_memory(task)

    def train_step(self, batch: Batch) -> dict:
        logits = self.model(batch.x)
        loss = F.cross_entropy(logits.masked_fill(~self._seen, float("-inf")), batch.y)
        if self.teacher is not None:
            with torch.no_grad():
                old_logits = self.teacher(batch.x)
            distill = kd_loss(logits, old_logits, self.temperature, self._old, t_squared=False)
            loss = (1 - self._lambda) * loss + self._lambda * distill
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        if self.clip_weights:
            with torch.no_grad():
                self.model.head.weight.clamp_(min=0)
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        self.teacher = None
        if self.align and self._old:
            self.gamma.append(self.align_weights(self._old, task.outputs))
        self.remember(task)

    @torch.no_grad()
    def align_weights(self, old, new) -> float:
        """Eq. 8-9: scale the new classes' weight rows so their mean norm is the old classes'."""
        weight = self.model.head.weight
        old_norm = weight[old].norm(dim=1).mean()
        new_norm = weight[new].norm(dim=1).mean()
        if not float(new_norm) > 0:
            self.warn("WA: the new classes' weight vectors are all zero (clipped); weight aligning skipped")
            return 1.0
        gamma = old_norm / new_norm
        weight[new] = weight[new] * gamma
        return float(gamma)

    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.over_seen(self.model(x))

    def summary(self) -> dict:
        return {**super().summary(), "gamma": list(self.gamma)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "gamma": list(self.gamma)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.gamma = list(state["gamma"])
