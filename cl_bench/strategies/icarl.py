"""iCaRL (Rebuffi et al. 2017, "iCaRL: Incremental Classifier and Representation Learning").

- Representation update (Alg. 3): train on the new task's samples joined with the
  stored exemplars with a sigmoid (binary cross-entropy) loss per output: for the new
  classes the target is the one-hot label, for the old classes it is the previous
  model's sigmoid output (distillation; the shared `sigmoid_targets`). The previous
  model is a frozen copy taken at task start, in eval mode (its forward passes never
  update batch-norm running statistics).
- `loss_reduction` (which outputs the loss covers and how it is reduced):
  - ``"mean"`` (the default): the authors' code. Their Theano version
    (`main_cifar_100_theano.py`) takes `binary_crossentropy(prediction, target).mean()`
    and their TensorFlow version `reduce_mean(sigmoid_cross_entropy_with_logits(...))`,
    both over batch x ALL outputs of the fixed 100-way head, later classes with target 0.
    Their learning rate (2.0, momentum 0.9, weight decay 1e-5) is tuned for this scale.
    With `train.active_classes=true` the mean runs over the classes seen so far.
  - ``"sum"``: Alg. 3 as printed: the sum over the classes seen so far, mean over the
    batch. Each output's term has weight 1 here and 1 / (all outputs) under "mean", so
    the same learning rate takes steps up to that many times larger (10x on Split
    Digits, 100x on CIFAR-100); with "mean" the authors' lr 2.0 is the reference point.
- Exemplar management (Alg. 2, 4, 5): a memory of K samples shared by all classes seen
  so far, m = floor(K / classes seen) per class (the authors' code rounds up and can go
  over K; the floor keeps the budget); old classes are cut to their first m exemplars
  and each new class gets m exemplars chosen by herding on L2-normalised features (the
  shared buffer's class-balanced herding).
- Classification (Alg. 1): nearest mean of exemplars. mu_y is the mean of the
  normalised features of class y's exemplars, re-normalised as in the authors' code;
  `predict` returns -||phi(x) - mu_y|| for each class with a mean and -inf for the
  rest (classes not trained yet have no exemplars), so the runner's argmax is the NME
  rule. Before any mean exists (the untrained baseline row) it falls back to the
  network's outputs. The authors also average horizontally flipped exemplars into mu_y;
  here means use un-augmented samples.

A class-incremental method: it needs no task id and supports class_il only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.data.stream import Split, Task
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy
from cl_bench.strategies.distillation import sigmoid_targets

LOSS_REDUCTIONS = ("mean", "sum")


class ICaRL(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il",)

    def __init__(self, memory_size: int = 200, selection: str = "herding", loss_reduction: str = "mean") -> None:
        """memory_size: K, exemplars shared by all classes; selection: herding (paper) | random;
        loss_reduction: mean (authors' code, over batch x all outputs) | sum (Alg. 3, over seen classes)."""
        if loss_reduction not in LOSS_REDUCTIONS:
            raise CLBenchError(
                f"strategy.loss_reduction={loss_reduction!r} is not one of {', '.join(LOSS_REDUCTIONS)}"
            )
        super().__init__(memory_size, selection, "class", need_memory=True)
        self.loss_reduction = loss_reduction
        self.teacher = None
        self.class_means = None  # (num_outputs, feature_dim), rows without exemplars are NaN

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        seen = self.mark_seen(task)
        self._old = torch.tensor(self.seen_outputs(task, include_current=False), dtype=torch.long, device=self.device)
        # the outputs the loss covers: all (authors' code) unless the classes seen so far only
        only_seen = self.loss_reduction == "sum" or self.train_cfg.active_classes
        self._loss_outputs = seen.nonzero().flatten() if only_seen else None
        self.teacher = None
        if len(self._old):
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)

    def training_data(self, task: Task) -> Split:
        return self.training_data_with_memory(task)

    def train_step(self, batch: Batch) -> dict:
        logits = self.model(batch.x)
        old_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                old_logits = self.teacher(batch.x)
        target = sigmoid_targets(batch.y, logits.shape[1], old_logits, self._old)
        if self._loss_outputs is not None:
            logits, target = logits[:, self._loss_outputs], target[:, self._loss_outputs]
        per_output = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = per_output.mean() if self.loss_reduction == "mean" else per_output.sum(1).mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        self.teacher = None
        self.remember(task)
        self.class_means = self.exemplar_means()

    def exemplar_means(self) -> torch.Tensor:
        features = F.normalize(self.embed(self.memory.x[: len(self.memory)]), dim=1)
        labels = self.memory.y[: len(self.memory)]
        sums = features.new_zeros(self.stream.num_outputs, features.shape[1]).index_add_(0, labels, features)
        counts = torch.bincount(labels, minlength=self.stream.num_outputs).unsqueeze(1)
        means = F.normalize(sums / counts.clamp_min(1), dim=1)
        return means.masked_fill(counts == 0, float("nan"))

    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        if self.class_means is None:
            return self.model(x)
        features = F.normalize(self.model.features(x), dim=1)
        known = ~self.class_means.isnan().any(1)
        scores = torch.full((len(x), len(known)), float("-inf"), device=x.device)
        scores[:, known] = -torch.cdist(features, self.class_means[known])
        return scores

    def validation_scores(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        """The network's logits: during a task its new classes have no exemplar mean yet, so
        the nearest-mean scores would make every validation loss infinite."""
        return self.model(x)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "class_means": self.class_means}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.class_means = state["class_means"]
