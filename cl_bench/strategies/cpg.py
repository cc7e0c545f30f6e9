"""CPG: Compacting, Picking and Growing (Hung et al., NeurIPS 2019, "Compacting,
Picking and Growing for Unforgetting Continual Learning").

For task t (Sec. 3, Alg. 1), on a body whose weights are each owned by one task:
 * pick: a real-valued mask over the frozen weights of tasks < t, thresholded with the
   straight-through estimator as in Piggyback, is learned together with the free
   weights, which task t claims;
 * grow: while the accuracy is below the goal `target_acc` (on the task's validation
   split when there is one, else its training split), every hidden layer gets
   `grow_units` new units (at most `max_grow` times), trained for `grow_epochs`;
 * compact: task t's own weights are gradually pruned to `prune_ratio` with the cubic
   schedule of Zhu & Gupta (2017), s_i = s_f (1 - (1 - i/n)^3), one epoch of retraining
   after each of the n = `prune_steps` steps; as in the paper, pruning stops (and the
   last step is undone) when the accuracy falls below the goal. The pruned weights are
   released (zeroed, free for later tasks), the kept ones frozen.
Task k is predicted with its own weights plus the weights it picked: nothing it uses
is ever updated again. Batch-norm is per task, as in the authors' code (which stores
each task's BN weight, bias, running mean and variance in `shared_layer_info[task]` and
restores them to evaluate it): task t's copy of every BN layer starts from task t-1's
and is the only one trained (and updating running statistics) during task t. As in
PackNet (whose code CPG builds on) layer biases are trained with the first task only
(the authors' code keeps them per task too; the backbones with batch-norm here have no
conv biases); head rows are per task. Growing needs a backbone whose layers connect
unit to unit (mlp): on others (ResNets) CPG runs without growing and says so in a
warning. Task-IL only.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import (
    FreezeGuard, MaskedNet, WeightOwners, accuracy, binarize, bit_bytes, epochs, head_params,
    freeze_other_batchnorms, size_summary, start_task_batchnorms, task_batchnorms,
)
from cl_bench.strategies.base import Strategy


class CPG(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    changes_model_shape = True
    scenarios = ("task_il",)

    def __init__(self, prune_ratio: float = 0.5, prune_steps: int = 3, target_acc: float = 0.98,
                 grow_units: int = 32, max_grow: int = 2, grow_epochs: int = 2,
                 mask_init: float = 1e-2, threshold: float = 5e-3, mask_lr: float = 1e-3) -> None:
        if not 0.0 <= prune_ratio < 1.0:
            raise CLBenchError(f"strategy.prune_ratio must be in [0, 1), got {prune_ratio}")
        for key, value in dict(prune_steps=prune_steps, grow_units=grow_units, max_grow=max_grow,
                               grow_epochs=grow_epochs).items():
            if value < 0:
                raise CLBenchError(f"strategy.{key} must be >= 0, got {value}")
        if mask_init <= threshold or mask_lr <= 0:
            raise CLBenchError("strategy.mask_init must exceed strategy.threshold and strategy.mask_lr be positive")
        self.prune_ratio, self.prune_steps, self.target_acc = prune_ratio, prune_steps, target_acc
        self.grow_units, self.max_grow, self.grow_epochs = grow_units, max_grow, grow_epochs
        self.mask_init, self.threshold, self.mask_lr = mask_init, threshold, mask_lr

    def setup(self, model, stream, train_cfg, device) -> None:
        net = MaskedNet(model)
        self.norms = task_batchnorms(net.body)
        for bn in self.norms:
            bn.ensure(len(stream))
        super().setup(net.to(device), stream, train_cfg, device)
        if not net.growable and self.grow_units > 0 and self.max_grow > 0:
            self.warn(f"CPG cannot grow {type(model).__name__} (its layers do not connect unit to unit): it runs "
                      "without the growing step; set strategy.max_grow=0 to silence this")
            self.max_grow = 0
        self.owners = WeightOwners(self.model.hidden)
        self.picks: list[Optional[list[torch.Tensor]]] = []
        self.grown = [0] * len(stream)
        self.task, self.scores = 0, None

    # ----- masks -----------------------------------------------------------------------
    def train_masks(self) -> list[torch.Tensor]:
        own, earlier = self.owners.own(self.task), self.owners.visible(self.task - 1)
        if self.scores is None:
            return [o.float() for o in own]
        return [o + e * binarize(s, self.threshold) for o, e, s in zip(own, earlier, self.scores)]

    def test_masks(self, task_id: int) -> list[torch.Tensor]:
        own = self.owners.own(task_id)
        picks = self.picks[task_id] if task_id < len(self.picks) else None
        return [(o | p).float() for o, p in zip(own, picks)] if picks else [o.float() for o in own]

    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        for bn in self.norms:
            bn.task = task_id
        if task_id == self.task and self.scores is not None:
            self.model.set_masks([m.detach() for m in self.train_masks()])
        else:
            self.model.set_masks(self.test_masks(task_id))
        return self.model(x)

    # ----- training --------------------------------------------------------------------
    def _optimizers(self) -> None:
        t, head, self.guard = self.task, self.model.head, FreezeGuard()
        for layer, own in zip(self.model.hidden, self.owners.own(t)):
            self.guard.freeze(layer.weight, ~own)
            if layer.bias is not None:
                self.guard.freeze(layer.bias, t > 0)
        self.guard.freeze_other_head_rows(head, self.stream, t)
        freeze_other_batchnorms(self.norms, t, self.guard)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.mask_optimizer = torch.optim.Adam(self.scores, lr=self.mask_lr) if self.scores is not None else None

    def before_task(self, task: Task) -> None:
        self.task = task.id
        self.owners.claim_free(task.id)
        start_task_batchnorms(self.norms, task.id)
        self.scores = None
        if task.id > 0:
            self.scores = nn.ParameterList(nn.Parameter(torch.full_like(l.weight, self.mask_init)) for l in self.model.hidden)
        self._optimizers()

    @property
    def scheduled_optimizers(self) -> list:
        """The mask optimizer follows `train.scheduler` as the run's optimizer does (runner._set_lr),
        as the authors decay both (Piggyback's main.py: lr_mask_decay_every, lr_classifier_decay_every)."""
        return [self.mask_optimizer] if getattr(self, "mask_optimizer", None) is not None else []

    def train_step(self, batch) -> dict:
        return self._step(batch.x, batch.y)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        for bn in self.norms:
            bn.task = self.task
        self.model.set_masks(self.train_masks())
        loss = self.loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.mask_optimizer is not None:
            self.mask_optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        optimizers = (self.optimizer,) if self.mask_optimizer is None else (self.mask_optimizer, self.optimizer)
        self.guard.step(self.optimizer, lambda: self.optimizer_step(*optimizers))
        return {"loss": loss.detach()}

    def _train(self, task: Task, n_epochs: int, advance) -> None:
        self.set_training(True)
        for x, y in epochs(task.train, self.stream, n_epochs, self.train_cfg.batch_size):
            self._step(x, y)
            advance()  # batches

    def _batches(self, task: Task, n_epochs: int) -> int:
        return n_epochs * -(-len(task.train) // self.train_cfg.batch_size)

    def _accuracy(self, task: Task) -> float:
        return accuracy(self.predict, task.val if task.val is not None else task.train, self.stream, task.id)

    def _grow(self) -> None:
        n, t = self.grow_units, self.task
        for l, layer in enumerate(self.model.hidden):
            self.model.grow(l, n)
            self.owners.pad(l, 0, n, t + 1)
            nxt = l + 1 < len(self.owners.owner)
            if nxt:
                self.owners.pad(l + 1, 1, n, t + 1)
            for picks in filter(None, self.picks):
                picks[l] = torch.cat([picks[l], picks[l].new_zeros(n, *picks[l].shape[1:])], 0)
                if nxt:
                    picks[l + 1] = torch.cat([picks[l + 1], picks[l + 1].new_zeros(picks[l + 1].shape[0], n, *picks[l + 1].shape[2:])], 1)
        if self.scores is not None:
            self.scores = nn.ParameterList(
                nn.Parameter(nn.functional.pad(s.detach(), [0, 0] * (s.dim() - 2) + [0, l.in_units - s.shape[1], 0, l.out_units - s.shape[0]], value=self.mask_init))
                for s, l in zip(self.scores, self.model.hidden))
        self.grown[t] += n

    def after_task(self, task: Task) -> None:
        self.set_training(False)
        acc, grows = self._accuracy(task), 0
        # The bars' totals are the most each stage can take: growing ends once the goal is
        # met, pruning at the first step that falls below it.
        if acc < self.target_acc and self.max_grow > 0 and self.grow_units > 0:
            with self.progress("growing", total=self._batches(task, self.max_grow * self.grow_epochs)) as advance:
                while acc < self.target_acc and grows < self.max_grow:
                    self._grow()
                    self._optimizers()
                    self._train(task, self.grow_epochs, advance)
                    acc, grows = self._accuracy(task), grows + 1
        done = 0.0
        with self.progress("pruning and retraining", total=self._batches(task, self.prune_steps)) as advance:
            for i in range(1, self.prune_steps + 1):
                goal = self.prune_ratio * (1 - (1 - i / self.prune_steps) ** 3)
                snapshot = (self.owners.state_dict(), [l.weight.detach().clone() for l in self.model.hidden],
                            [copy.deepcopy(bn.norms[task.id].state_dict()) for bn in self.norms])
                self.owners.prune(self.model.hidden, task.id, (goal - done) / (1 - done))
                self._optimizers()
                self._train(task, 1, advance)
                if self._accuracy(task) < min(self.target_acc, acc):
                    self.owners.load_state_dict(snapshot[0])
                    with torch.no_grad():
                        for layer, w in zip(self.model.hidden, snapshot[1]):
                            layer.weight.copy_(w)
                    for bn, state in zip(self.norms, snapshot[2]):
                        bn.norms[task.id].load_state_dict(state)
                    break
                done = goal
        while len(self.picks) <= task.id:
            self.picks.append(None)
        if self.scores is not None:
            self.picks[task.id] = [e & (s.detach() > self.threshold)
                                   for e, s in zip(self.owners.visible(task.id - 1), self.scores)]
        self.scores = self.mask_optimizer = None

    def summary(self) -> dict:
        owner = torch.cat([o.flatten() for o in self.owners.owner])
        counts = torch.bincount(owner.long(), minlength=len(self.stream) + 1).tolist()
        biases = sum(l.bias.numel() for l in self.model.hidden if l.bias is not None)
        used, mask_bytes = [], owner.numel()
        for t, task in enumerate(self.stream.tasks[: self.task + 1]):
            picks = self.picks[t] if t < len(self.picks) else None
            picked = sum(int(p.sum()) for p in picks) if picks else 0
            mask_bytes += sum(bit_bytes(p.numel()) for p in picks) if picks else 0
            used.append(counts[t + 1] + picked + biases + head_params(self.model.head, task))
        return size_summary(sum(p.numel() for p in self.model.parameters()), used, mask_bytes,
                            weights_per_task=counts[1:], free_weights=counts[0], units_grown=list(self.grown))

    def state_dict(self) -> dict:
        return {"owners": self.owners.state_dict(), "picks": self.picks, "task": self.task, "grown": self.grown,
                "widths": [l.out_units for l in self.model.hidden]}

    def load_state_dict(self, state: dict) -> None:
        for l, width in enumerate(state["widths"]):
            if width > self.model.hidden[l].out_units:
                self.model.grow(l, width - self.model.hidden[l].out_units)
        self.owners.load_state_dict(state["owners"])
        self.picks = [None if p is None else [m.to(self.device) for m in p] for p in state["picks"]]
        self.task, self.grown = state["task"], state["grown"]
