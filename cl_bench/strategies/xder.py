"""X-DER (Boschini, Bonicelli, Buzzega, Porrello, Calderara, TPAMI 2022, "Class-Incremental
Continual Learning into the eXtended DER-verse"), following the authors' code (Mammoth,
`models/xder.py`, `utils/buffer.py`, `utils/simclrloss.py`) where the paper leaves a choice open.

The output layer is split into heads, one per task (here: each task's `outputs`, so
class orders and a larger first task work). During task t the step minimises

    L = CE_t(f(x), y)                              present head only: the CE over task t's outputs
      + alpha * MSE(f(x'), z')                     DER: all outputs of a replayed sample vs its stored logits z'
      + beta * CE_<t(f(x''), y'')                  DER++: labels of replayed samples, over the past heads
      + lambd * L_SupCon(future heads)             future preparation (t < last task)
      + eta * L_FC                                 future constraint (t < last task)
      [+ eta * L_PC                                past constraint, off by default as in the code]

- The memory (the code's `end_task`): nothing is written during a task; at the
  end of task t each old class keeps its first floor(memory_size / classes seen) samples,
  and the rest of the budget goes to the new classes, split evenly, the remainder one each
  to randomly chosen new classes; their samples are drawn at random (the code takes the
  first ones of a shuffled loader). After the first task the memory is full (if the data
  allows) and class-balanced. (The code has no reservoir phase: the first task's samples
  enter at its end, class-balanced, like every later task's.)
- Stored logits (DER) are the model's responses when a sample enters the memory, computed
  as the code does: training mode with batch statistics, running statistics untouched
  (`bn_track_stats(False)`), on an augmented view. Their past heads (tasks < t) are
  rescaled (below); the sample's own head and the future heads are stored as they are.
- Past-logit update ("rewriting the past", `update_logits`): at the end of task t, every
  stored sample of an older task gets the outputs of heads t, t+1, ... (the current head
  and the future ones) replaced by the current model's responses, and, as the code does
  online, whenever a sample is replayed during task t, each time with probability 1/n for
  its n-th replay in the task (a reservoir over its responses). Replaced logits r are
  rescaled so they do not exceed the stored ground-truth logit z_y:
      r <- r * gamma * z_y / max(r)     where max(r) > z_y, else unchanged
  (max over the whole replaced block; the same rule caps the past heads of entering
  samples). As in the code, a negative z_y gives a negative factor (signs flip); the
  rule is taken as written. A slot of head j of a sample of task k < j is thus rewritten
  until the end of task j and never after; the slots of heads <= k never change.
- Future preparation: each future head's outputs (tasks > t), L2-normalised,
  are the embedding of a supervised contrastive loss (Khosla et al. 2020, the code's
  `SupConLoss` with temperature = base temperature = `simclr_temp`) on `simclr_num_aug`
  views of the stream batch joined with `simclr_batch_size` memory samples; the mean over
  heads and samples. The future heads are their own projection heads, so no extra module
  is needed. The code draws the views with a strong SimCLR-style augmentation (random
  resized crop at scale 0.2-1, colour jitter, grey-scale, flip); here the views come from
  the stream's own training augmentation (crop and flip on CIFAR/SVHN, none on the digit
  and MNIST streams, where the views coincide and the loss only clusters classes).
- Future constraint L_FC: max(future logits) + m - max(own-head logits), the mean of its
  positive values over the stream batch (own head = current) and the replayed samples (own
  head = their task's). The past constraint (`past_constraint`, off in the code's
  defaults) is the same on the softmax over the seen classes, the past heads' maximum
  detached, on the stream batch.
- Batch-norm alignment (`align_bn`, the code's default): from the second task, the running
  statistics are updated only by the first replay batch, joined with
  floor(batch / t) stream samples; the other forward passes use batch statistics without
  updating them (SupCon's views: always). With an empty memory (memory_size=0) the stream
  batch updates them, as finetune's does (the code would freeze them from task 2).
- Both replay batches have `replay_batch_size` samples (the code's minibatch_size; null:
  the stream batch's size, the code's default); replayed samples get the stream's training
  augmentation from the strategy's seeded generator, which also draws the memory, the
  online-update coins and SupCon's views (the global RNG is never drawn from).

Not implemented: the distance-preserving term (`dp_weight`: 0 in the code's argument
defaults and in utils/best_args.py; a later Mammoth dataset config sets 3000).
Training is the same in both scenarios (the paper reports the class-IL and task-IL
accuracy of one run). Prediction: in class-IL the outputs of classes not trained yet are
-inf (the code takes the argmax over the seen classes); in task-IL the runner scores among
the task's outputs. With memory_size=0, lambd=0 and eta=0 the step is finetune's task-IL
step exactly (the present-head CE is task-IL's masked CE), in either scenario; class-IL
finetune's CE covers all outputs, so no setting reduces X-DER to it (tests/test_xder.py).
`train.active_classes` changes nothing in training: each term picks its heads by design.

Hyperparameters (conf/strategy/xder.yaml): the paper has no S-MNIST or S-CIFAR-10 results;
the defaults are the authors' Split CIFAR-100 values for a 500-sample memory
(Mammoth `utils/best_args.py`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import MemoryBuffer, ReplayStrategy
from cl_bench.strategies.der import check_replay_batch_size


def rescale_to_ground_truth(responses: torch.Tensor, gt_logit: torch.Tensor, gamma: float) -> torch.Tensor:
    """X-DER's logit transplant rule (the code's `update_logits`): rows whose maximum exceeds
    the ground-truth logit are multiplied by gamma * gt / max; the others are unchanged."""
    top = responses.max(1).values
    scaled = responses * (gamma * gt_logit / top).unsqueeze(1)
    return torch.where((top > gt_logit).unsqueeze(1), scaled, responses)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, Eq. 2; the 'all' mode of the authors'
    SupConLoss, base temperature = temperature) per sample, averaged over its views:
    `features` (N, V, D), already normalised; returns (N,)."""
    n, v, _ = features.shape
    flat = features.transpose(0, 1).reshape(n * v, -1)  # view-major, as torch.cat(torch.unbind(., 1))
    sim = flat @ flat.T / temperature
    sim = sim - sim.max(1, keepdim=True).values.detach()
    ids = labels.repeat(v)
    self_mask = torch.eye(n * v, dtype=torch.bool, device=features.device)
    positive = (ids.unsqueeze(0) == ids.unsqueeze(1)) & ~self_mask
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
    mean_pos = (log_prob * positive).sum(1) / positive.sum(1)
    return -mean_pos.view(v, n).mean(0)


def _positive_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of the positive entries (0 when none): the code's `loss[loss > 0].mean()`,
    without a host sync."""
    positive = values > 0
    return torch.where(positive, values, 0.0).sum() / positive.sum().clamp_min(1)


@contextmanager
def batch_statistics(model: nn.Module, frozen: bool = True, no_dropout: bool = False):
    """Batch-norm layers use batch statistics without updating their running ones (the
    authors' `bn_track_stats(model, False)`); `no_dropout`: dropout layers off as well."""
    if not frozen:
        yield
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)] if no_dropout else []
    states = [m.training for m in drops]
    for m in norms:
        m.track_running_stats = False
    for m in drops:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
        for m, state in zip(drops, states):
            m.train(state)


class BalancedLogitMemory(MemoryBuffer):
    """The class-balanced memory with each sample's stored logits and its replay counter."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, balance="class", selection="random")
        self.logits: Optional[torch.Tensor] = None  # (size, num_outputs) float32
        self.counter: Optional[torch.Tensor] = None  # replays in the current task (online update)

    def rebuild(self, keep: torch.Tensor, x: torch.Tensor, y: torch.Tensor, task_id: int, logits: torch.Tensor) -> None:
        """The slots `keep` (in order), then the new samples with their logits."""
        if self.x is None:
            old = (x[:0], y[:0], y[:0], y[:0], logits[:0])
        else:
            old = (self.x[keep], self.y[keep], self.task[keep], self.rank[keep], self.logits[keep])
        new_rank = torch.arange(len(y), device=y.device)
        self.x = torch.cat([old[0], x])
        self.y = torch.cat([old[1], y])
        self.task = torch.cat([old[2], torch.full_like(y, task_id)])
        self.rank = torch.cat([old[3], new_rank])
        self.logits = torch.cat([old[4], logits.float()])
        self.counter = torch.zeros(len(self.y), device=y.device)
        self.size = len(self.y)
        self.seen += len(y)
        self.groups |= set(y.unique().tolist())

    @property
    def nbytes(self) -> int:
        extra = 0 if self.logits is None else self.size * (self.logits.shape[1] + 1) * self.logits.element_size()
        return super().nbytes + extra

    def state_dict(self) -> dict:
        return {**super().state_dict(), "logits": self.logits, "counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.logits, self.counter = state["logits"], state["counter"]
        if self.x is not None:  # storage exactly `size` rows, as rebuild leaves it
            self.x, self.y, self.task, self.rank = (t[: self.size] for t in (self.x, self.y, self.task, self.rank))


class XDER(ReplayStrategy):
    scenarios = ("class_il", "task_il")
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step

    def __init__(
        self,
        memory_size: int = 200,
        alpha: float = 0.3,
        beta: float = 0.8,
        gamma: float = 0.85,
        lambd: float = 0.05,
        eta: float = 0.001,
        margin: float = 0.7,
        simclr_temp: float = 5.0,
        simclr_batch_size: int = 64,
        simclr_num_aug: int = 2,
        align_bn: bool = True,
        past_constraint: bool = False,
        replay_batch_size: Optional[int] = None,
    ) -> None:
        """See conf/strategy/xder.yaml for each value's meaning and source."""
        for key, value in (("alpha", alpha), ("beta", beta), ("lambd", lambd), ("eta", eta), ("margin", margin)):
            if not (math.isfinite(value) and value >= 0):
                raise CLBenchError(f"strategy.{key} must be a finite value >= 0, got {value}")
        if not (0 < gamma <= 1):
            raise CLBenchError(
                f"strategy.gamma must be in (0, 1] (rewritten logits stay <= gamma x the true class logit), got {gamma}"
            )
        if not (math.isfinite(simclr_temp) and simclr_temp > 0):
            raise CLBenchError(f"strategy.simclr_temp must be positive, got {simclr_temp}")
        if simclr_batch_size < 0:
            raise CLBenchError(f"strategy.simclr_batch_size must be >= 0, got {simclr_batch_size}")
        if simclr_num_aug < 2:
            raise CLBenchError(
                f"strategy.simclr_num_aug must be at least 2 (a view's positives: its other views), got {simclr_num_aug}"
            )
        replay_batch_size = check_replay_batch_size(replay_batch_size)
        super().__init__(memory_size, "random", "class")
        self.replay_batch_size = replay_batch_size
        self.memory = BalancedLogitMemory(memory_size)
        self.alpha, self.beta, self.gamma, self.lambd, self.eta, self.margin = alpha, beta, gamma, lambd, eta, margin
        self.simclr_temp, self.simclr_batch_size, self.simclr_num_aug = simclr_temp, simclr_batch_size, simclr_num_aug
        self.align_bn, self.past_constraint = align_bn, past_constraint

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        self._output_task = torch.zeros(stream.num_outputs, dtype=torch.long, device=device)
        for task in stream.tasks:
            self._output_task[task.outputs] = task.id
        if 0 < self.memory.capacity < stream.num_outputs:
            self.warn(
                f"strategy.memory_size={self.memory.capacity} is less than one sample per class for the "
                f"{stream.num_outputs} classes: once more than {self.memory.capacity} classes are seen, old "
                "classes keep none (floor(memory_size / classes seen) each, as the authors' code)"
            )

    def _cols(self, first: int, last: Optional[int] = None) -> torch.Tensor:
        """The outputs of tasks first..last (inclusive; last: the stream's last)."""
        tasks = self.stream.tasks[first : (len(self.stream) if last is None else last + 1)]
        return torch.tensor(sorted(o for t in tasks for o in t.outputs), dtype=torch.long, device=self.device)

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.mark_seen(task)
        t, n = task.id, self.stream.num_outputs
        self._t = t
        self._current = torch.zeros(n, dtype=torch.bool, device=self.device)
        self._current[task.outputs] = True
        self._past = self._output_task < t
        self._future = self._output_task > t
        self._from_current = self._cols(t)
        self._future_heads = [torch.tensor(k.outputs, device=self.device) for k in self.stream.tasks[t + 1 :]]

    def _own_head_max(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        own = self._output_task.unsqueeze(0) == self._output_task[y].unsqueeze(1)
        return logits.masked_fill(~own, float("-inf")).max(1).values

    def train_step(self, batch: Batch) -> dict:
        model, memory, t = self.model, self.memory, self._t
        x, y = batch.x, batch.y
        has_memory = len(memory) > 0
        align = self.align_bn and has_memory and t > 0
        with batch_statistics(model, frozen=align):
            outputs = model(x)
        loss = F.cross_entropy(outputs.masked_fill(~self._current, float("-inf")), y)
        out = {"ce": loss.detach()}
        replay_logits, replay_y = outputs[:0], y[:0]
        if has_memory:
            n = self.replay_batch_size or len(y)
            idx1 = memory.sample(n, self.generator)
            x1 = self.stream.transform(memory.x[idx1], train=True, generator=self.generator)
            if align:  # the running statistics see the replayed samples and 1/t of the stream batch
                x1 = torch.cat([x1, x[: n // t]])
            out1 = model(x1)[: len(idx1)]
            der = self.alpha * F.mse_loss(out1, memory.logits[idx1])
            idx2 = memory.sample(n, self.generator)
            x2 = self.stream.transform(memory.x[idx2], train=True, generator=self.generator)
            with batch_statistics(model, frozen=self.align_bn):
                out2 = model(x2)
            derpp = self.beta * F.cross_entropy(out2.masked_fill(~self._past, float("-inf")), memory.y[idx2])
            loss = loss + der + derpp
            out.update(der=der.detach(), derpp=derpp.detach())
            idx, replay_logits = torch.cat([idx1, idx2]), torch.cat([out1, out2])
            first = torch.full((memory.size,), len(idx), dtype=torch.long, device=idx.device)
            first = first.scatter_reduce(0, idx, torch.arange(len(idx), device=idx.device), "amin")
            unique = first[idx] == torch.arange(len(idx), device=idx.device)
            idx, replay_logits = idx[unique], replay_logits[unique]
            replay_y = memory.y[idx]
            self._update_online(idx, replay_logits.detach(), replay_y)
        if self._future_heads:
            if self.lambd > 0:
                cons = self.lambd * self._future_supcon(batch)
                loss = loss + cons
                out["supcon"] = cons.detach()
            if self.eta > 0:
                logits = torch.cat([outputs, replay_logits])
                labels = torch.cat([y, replay_y])
                bad = logits.masked_fill(~self._future, float("-inf")).max(1).values
                fc = self.eta * _positive_mean(bad + self.margin - self._own_head_max(logits, labels))
                loss = loss + fc
                out["future_constraint"] = fc.detach()
        if self.past_constraint and self.eta > 0 and t > 0:
            seen = self._past | self._current
            probs = F.softmax(outputs.masked_fill(~seen, float("-inf")), 1)
            good = probs.masked_fill(~self._current, float("-inf")).max(1).values
            bad = probs.masked_fill(~self._past, float("-inf")).max(1).values.detach()
            pc = self.eta * _positive_mean(bad + self.margin - good)
            loss = loss + pc
            out["past_constraint"] = pc.detach()
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        out["loss"] = loss.detach()
        return out

    @torch.no_grad()
    def _update_online(self, idx: torch.Tensor, responses: torch.Tensor, y: torch.Tensor) -> None:
        """The code's online "update future past logits": a replayed sample of an older task
        takes the current responses of heads t, t+1, ... with probability 1/(its replays so far)."""
        memory = self.memory
        old = self._output_task[y] < self._t
        memory.counter[idx[old]] += 1
        coin = torch.rand(len(idx), generator=self.generator).to(idx.device)
        chosen = old & (coin * memory.counter[idx] < 1)
        self._transplant(idx[chosen], responses[chosen])

    def _transplant(self, slots: torch.Tensor, responses: torch.Tensor) -> None:
        """Stored logits of `slots` on heads t, t+1, ...: `responses` there, rescaled."""
        memory, cols = self.memory, self._from_current
        gt = memory.logits[slots, memory.y[slots]]
        memory.logits[slots.unsqueeze(1), cols] = rescale_to_ground_truth(responses[:, cols].float(), gt, self.gamma)

    def _future_supcon(self, batch: Batch) -> torch.Tensor:
        raw, labels = batch.raw, batch.y
        if len(self.memory) and self.simclr_batch_size:
            idx = self.memory.sample(self.simclr_batch_size, self.generator)
            raw, labels = torch.cat([self.memory.x[idx], raw]), torch.cat([self.memory.y[idx], labels])
        views = raw.repeat_interleave(self.simclr_num_aug, 0)
        views = self.stream.transform(views, train=True, generator=self.generator)
        with batch_statistics(self.model, frozen=self.align_bn):
            logits = self.model(views)
        logits = logits.view(len(labels), self.simclr_num_aug, -1)
        losses = [
            supcon_loss(F.normalize(logits[:, :, head], dim=2), labels, self.simclr_temp) for head in self._future_heads
        ]
        return torch.stack(losses).mean()

    # ----- task end: memory and stored logits ---------------------------------------------------
    @torch.no_grad()
    def _responses(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's outputs on augmented views of `raw`, as the code computes them at a task's
        end: training mode, batch statistics, running statistics untouched (dropout off)."""
        model, step = self.model, self.train_cfg.batch_size
        was_training = model.training
        model.train()
        bounds = list(range(0, len(raw), step))
        if len(bounds) > 1 and len(raw) - bounds[-1] == 1:  # no batch of one (batch norm needs two)
            bounds.pop()
        ends = bounds[1:] + [len(raw)]
        out = []
        with batch_statistics(model, no_dropout=True):
            for a, b in zip(bounds, ends):
                out.append(model(self.stream.transform(raw[a:b], train=True, generator=self.generator)).float())
        model.train(was_training)
        return torch.cat(out)

    def after_task(self, task: Task) -> None:
        memory = self.memory
        if memory.capacity == 0:
            return
        t = task.id
        with torch.no_grad():
            keep = torch.empty(0, dtype=torch.long, device=self.device)
            if len(memory):  # old classes: their first floor(K / classes seen) samples
                quota = memory.capacity // len(self.seen_outputs(task))
                y_old = memory.y[: memory.size]
                position = torch.zeros_like(y_old)
                for c in y_old.unique().tolist():
                    members = (y_old == c).nonzero().flatten()
                    position[members] = torch.arange(len(members), device=y_old.device)
                keep = (position < quota).nonzero().flatten()
            room = memory.capacity - len(keep)
            classes = sorted(set(task.train.y.unique().tolist()))
            share = torch.full((len(classes),), room // len(classes), dtype=torch.long)
            share[torch.randperm(len(classes), generator=self.generator)[: room % len(classes)]] += 1
            chosen = []
            for c, m in zip(classes, share.tolist()):
                members = (task.train.y == c).nonzero().flatten()
                chosen.append(members[torch.randperm(len(members), generator=self.generator)[:m].to(members.device)])
            chosen = torch.cat(chosen)
            x_new, y_new = task.train.x[chosen].to(self.device), task.train.y[chosen].to(self.device)
            logits = self._responses(x_new)
            if t > 0:  # entering samples: past heads capped below gamma x their ground-truth logit
                past = self._cols(0, t - 1)
                gt = logits[torch.arange(len(y_new), device=self.device), y_new]
                logits[:, past] = rescale_to_ground_truth(logits[:, past], gt, self.gamma)
            memory.rebuild(keep, x_new, y_new, t, logits)
            # older samples: heads t, t+1, ... from the model at the end of task t
            order = torch.randperm(memory.size, generator=self.generator).to(self.device)
            responses = torch.empty_like(memory.logits)
            responses[order] = self._responses(memory.x[order])
            older = (memory.task[: memory.size] < t).nonzero().flatten()
            self._transplant(older, responses[older])
            memory.counter.zero_()

    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        logits = self.model(x)  # task-IL: the runner scores among the task's outputs
        return self.over_seen(logits) if self.stream.scenario == "class_il" else logits
