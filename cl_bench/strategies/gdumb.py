"""GDumb (Prabhu, Torr & Dokania 2020, "GDumb: A Simple Approach that Questions Our Progress
in Continual Learning").

- Greedy class-balanced sampler (Sec. 3, Alg. 1): the stream is only stored, never trained
  on. A sample (x, y) enters the memory of k slots if the memory is not full; else, if its
  class holds fewer than k / |Y| samples (Y: the classes seen so far, y included), a randomly
  chosen sample of the class with the most samples is evicted to make room; otherwise it is
  dropped. Ties for the largest class go to the lowest label (Alg. 1 takes an argmax without
  saying which); the evicted sample is drawn with the strategy's seeded generator. Each
  sample is offered once: in the task's first pass over its data (later epochs of
  `train.epochs` offer nothing; the runner's steps on the stream make no gradient step and
  no forward pass).
- Learner (Sec. 3): at every evaluation point (here each task's end, `after_task`) the
  network is re-initialised and trained from scratch on the memory alone. The
  re-initialisation restores the weights the runner built the model with (seeded by the
  run's seed, captured at `setup`; no draw from any RNG), so the network at every task end is
  a function of the memory, that initial state and the strategy's generator only; a
  resumed run rebuilds the same initial state from the same seed.
- Training on the memory, as the authors' code (`src/main.py`, `src/opts.py`): SGD with
  momentum 0.9 and weight decay 1e-6, batch 16, gradient-norm clipping at 10, `epochs`
  passes over the memory (the paper's scripts: 128 on MNIST, 256 on CIFAR/SVHN); learning
  rate: the first pass at lr / 10 (warm start), the second at lr, then SGDR (Loshchilov &
  Hutter 2017, CosineAnnealingWarmRestarts with T_0 = 1, T_mult = 2, eta_min = min_lr)
  stepped once per pass, lr 0.05 -> min_lr 0.0005. The cross-entropy covers the whole head
  (the authors' `nn.CrossEntropyLoss` over all classes of the run; with
  `train.active_classes` in class-IL, the classes seen so far). `cutmix` (Yun et al. 2019),
  as their `cutmix_data`: with probability `cutmix_prob` per batch, lambda ~ Beta(alpha,
  alpha), a box of area ratio 1 - lambda pasted from a shuffled copy of the batch, the loss
  mixed by the exact pasted area. Off by default as in their `opts.py` (and their MNIST
  runs); their CIFAR, SVHN and TinyImageNet runs pass `--regularization cutmix`.
  Replayed samples get the stream's own augmentation, drawn from the seeded generator.
- Inference (Sec. 3): the network's softmax scores, masked to the classes it can know. In
  class-IL and domain-IL the classes present in memory; in task-IL the runner additionally
  restricts each prediction to its task's classes (the authors' `class_mask` at test time).

The runner's optimizer, `train.lr`, `train.batch_size` (of the stream pass), schedule and
`train.clip_grad_norm` play no part: the memory training is the strategy's own phase.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import MemoryBuffer, ReplayStrategy


class GreedyBalancedMemory(MemoryBuffer):
    """A MemoryBuffer filled online by GDumb's greedy class-balanced sampler (Alg. 1)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, "class", "random")
        self._labels: list[int] = []  # host mirror of y[:size], slot by slot

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for label in self._labels:
            out[label] = out.get(label, 0) + 1
        return out

    def add_greedy(self, x: torch.Tensor, y: torch.Tensor, task_id: int, generator: torch.Generator) -> None:
        """Offer a batch to the memory, sample by sample in order."""
        if self.capacity == 0 or len(y) == 0:
            return
        self._reserve(x, self.size + len(y))
        counts = self.counts()
        writes: dict[int, int] = {}  # slot -> source row (a later sample overwrites an earlier one)
        for i, label in enumerate(y.tolist()):
            self.groups.add(label)
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
                self._labels.append(label)
            elif counts.get(label, 0) < self.capacity / len(self.groups):
                largest = max(counts.values())
                victim_class = min(c for c, n in counts.items() if n == largest)
                members = [s for s, c in enumerate(self._labels) if c == victim_class]
                slot = members[int(torch.randint(len(members), (1,), generator=generator))]
                counts[victim_class] -= 1
                self._labels[slot] = label
            else:
                continue
            counts[label] = counts.get(label, 0) + 1
            writes[slot] = i
        self.seen += len(y)
        if writes:
            slots = torch.tensor(list(writes), dtype=torch.long, device=self.y.device)
            source = torch.tensor(list(writes.values()), dtype=torch.long, device=y.device)
            self.x[slots], self.y[slots] = x[source], y[source].to(self.y.device)
            self.task[slots], self.rank[slots] = task_id, 0

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._labels = self.y[: self.size].tolist()


def sgdr_lr(epoch: int, lr: float, min_lr: float) -> float:
    """The authors' per-pass learning rate: lr/10, lr, then CosineAnnealingWarmRestarts
    (T_0=1, T_mult=2, eta_min=min_lr) after `epoch - 1` scheduler steps."""
    if epoch == 0:
        return lr * 0.1
    t_cur, t_i = epoch - 1, 1
    while t_cur >= t_i:
        t_cur, t_i = t_cur - t_i, t_i * 2
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


class GDumb(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il", "task_il", "domain_il")

    def __init__(
        self,
        memory_size: int = 200,
        epochs: int = 128,
        lr: float = 0.05,
        min_lr: float = 0.0005,
        batch_size: int = 16,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        clip: float = 10.0,
        cutmix: bool = False,
        cutmix_prob: float = 0.5,
        cutmix_alpha: float = 1.0,
    ) -> None:
        """memory_size: k, slots shared by all classes; epochs: passes over the memory at each
        task end; lr / min_lr: SGDR's range; batch_size, momentum, weight_decay, clip (gradient
        norm): the memory training; cutmix, cutmix_prob, cutmix_alpha: CutMix regularisation."""
        checks = (
            ("epochs", epochs, epochs >= 1, "a positive integer"),
            ("lr", lr, lr > 0, "positive"),
            ("min_lr", min_lr, 0 <= min_lr <= lr, "in [0, strategy.lr]"),
            ("batch_size", batch_size, batch_size >= 1, "a positive integer"),
            ("momentum", momentum, 0 <= momentum < 1, "in [0, 1)"),
            ("weight_decay", weight_decay, weight_decay >= 0, "non-negative"),
            ("clip", clip, clip > 0, "positive"),
            ("cutmix_prob", cutmix_prob, 0 <= cutmix_prob <= 1, "in [0, 1]"),
            ("cutmix_alpha", cutmix_alpha, cutmix_alpha > 0, "positive"),
        )
        for key, value, ok, what in checks:
            if not ok:
                raise CLBenchError(f"strategy.{key} must be {what}, got {value}")
        super().__init__(memory_size, "random", "class", need_memory=True)
        self.memory = GreedyBalancedMemory(memory_size)
        self.epochs, self.lr, self.min_lr, self.batch_size = epochs, lr, min_lr, batch_size
        self.momentum, self.weight_decay, self.clip = momentum, weight_decay, clip
        self.cutmix, self.cutmix_prob, self.cutmix_alpha = cutmix, cutmix_prob, cutmix_alpha

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        if self.cutmix and len(stream.input_shape) != 3:
            raise CLBenchError(
                f"strategy.cutmix needs image inputs (C, H, W); this stream's samples have shape {stream.input_shape}"
            )
        # the from-scratch state every memory training starts from: the runner's seeded initialisation
        self._initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._known: Optional[torch.Tensor] = None  # classes present in memory at the last task end

    def before_task(self, task: Task) -> None:
        self.optimizer = None  # no optimizer on the stream: GDumb only stores it
        self._offered = 0

    def train_step(self, batch: Batch) -> dict:
        if self._offered < len(batch.task.train):
            take = min(len(batch.y), len(batch.task.train) - self._offered)
            self.memory.add_greedy(batch.raw[:take], batch.y[:take], batch.task.id, self.generator)
            self._offered += take
        return {"loss": torch.zeros((), device=batch.y.device)}

    def after_task(self, task: Task) -> None:
        self.fit_memory()
        self._known = torch.zeros(self.stream.num_outputs, dtype=torch.bool, device=self.device)
        self._known[self.memory.labels()] = True

    # ----- the learner ------------------------------------------------------------------------
    def fit_memory(self) -> None:
        """Re-initialise the network and train it on the memory alone (the authors' protocol)."""
        model = self.model
        model.load_state_dict(self._initial_state)
        model.train()
        optimizer = torch.optim.SGD(
            model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        def schedule(epoch: int) -> None:
            for group in optimizer.param_groups:
                group["lr"] = sgdr_lr(epoch, self.lr, self.min_lr)

        for x, y in self.passes(self.memory.split(), self.epochs, self.batch_size, "training on memory", schedule):
            with self.autocast():  # this is all of GDumb's training: the run's precision
                loss = self.memory_loss(x, y)
            optimizer.zero_grad(set_to_none=True)
            self.backward(loss)
            if self.unscale(optimizer):  # fp16: clip the true gradients
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
            self.optimizer_step(optimizer)
        optimizer.zero_grad(set_to_none=True)  # the stream's steps hold no gradient

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.inactive is not None:  # class-IL with train.active_classes
            logits = logits.masked_fill(self.inactive, float("-inf"))
        return F.cross_entropy(logits, y)

    def memory_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cutmix and float(torch.rand((), generator=self.generator)) < self.cutmix_prob:
            x, y_b, lam = self.cut_and_mix(x, y)
            logits = self.model(x)
            return lam * self.cross_entropy(logits, y) + (1 - lam) * self.cross_entropy(logits, y_b)
        return self.cross_entropy(self.model(x), y)

    def cut_and_mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """CutMix as the authors' `cutmix_data`/`rand_bbox`: (mixed x, partner labels, lambda
        adjusted to the pasted area). Every draw comes from the strategy's generator."""
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        lam = float(np.random.default_rng(seed).beta(self.cutmix_alpha, self.cutmix_alpha))
        partner = torch.randperm(len(y), generator=self.generator).to(y.device)
        h, w = x.shape[-2], x.shape[-1]
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * cut), int(w * cut)
        cy = int(torch.randint(h, (1,), generator=self.generator))
        cx = int(torch.randint(w, (1,), generator=self.generator))
        y1, y2 = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
        x1, x2 = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
        x = x.clone()
        x[..., y1:y2, x1:x2] = x[partner][..., y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
        return x, y[partner], lam

    # ----- inference ------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        logits = self.model(x)
        return logits if self._known is None else logits.masked_fill(~self._known, float("-inf"))

    def validation_scores(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        """The network's logits: during a task its new classes are not in the mask yet."""
        return self.model(x)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "known": self._known}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._known = state["known"]
