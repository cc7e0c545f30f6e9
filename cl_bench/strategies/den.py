"""DEN: Dynamically Expandable Networks (Yoon, Yang, Lee & Hwang, ICLR 2018).

Task 0: the network is trained with an L1 penalty mu ||W||_1 (Eq. 1), so it is sparse.
Task t > 0 (Alg. 1):
 * selective retraining (Alg. 2): only task t's output weights are trained, with L1,
   then a breadth-first search from the task's outputs along non-zero weights selects
   the units S the task depends on; only the weights and biases of S are retrained,
   with lambda ||W_S - W_S^{t-1}||^2 + lambda ||b_S - b_S^{t-1}||^2 (the drift penalty
   of Eq. 4, on weights and biases as in the authors' code, folded into the Eq. 2
   retraining so the drift below is what a split has to repair);
 * dynamic expansion (Alg. 3): if the training loss stays above `loss_threshold`,
   every hidden layer gets `expand_units` units, trained (with the task's outputs) under
   L1 and the group lasso gamma sum_g ||W_g||_2 per new unit (Eq. 3); new units whose
   group is driven to zero are removed. Only the new units' weights and biases train:
   the biases of existing units stay fixed;
 * split/duplication (Alg. 4): a selected unit whose incoming weights drifted by more
   than `split_threshold` (L2) is duplicated: the copy keeps the new weights for task
   t and later, the original gets its old weights and bias back and serves earlier
   tasks. As in the authors' code (`np.argsort(drifts)[:ex_k]`) at most `expand_units`
   units are split per layer and task (the paper's Alg. 4 leaves the number open; their
   code reuses the expansion size k); here the most drifted ones (their code keeps the
   least drifted of those above the threshold, which leaves the largest drifts unrepaired).
   Drifted units beyond the cap keep their new weights: the semantic drift that the
   Eq. 4 penalty bounds, as in the paper.
Units carry timestamps (the task that added them, the task from which a split copy
replaced them); task k runs only the units alive at k, so later units never touch
earlier tasks. Sparsity penalties are applied as proximal steps (soft-thresholding),
as in the authors' code, so zeros are exact. Task-IL only (the task id picks the
units); growth needs a backbone whose layers connect unit to unit (mlp): others are
refused in setup.
"""

from __future__ import annotations

from typing import Optional

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import FreezeGuard, MaskedNet, epochs, head_rows_frozen, size_summary
from cl_bench.strategies.base import Strategy

NEVER = 1 << 30


class DEN(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    changes_model_shape = True
    scenarios = ("task_il",)

    def __init__(self, l1: float = 3e-3, drift_penalty: float = 0.1, select_epochs: int = 1,
                 loss_threshold: float = 0.05, expand_units: int = 16, expand_epochs: int = 2,
                 group_lasso: float = 1e-3, split_threshold: float = 0.05) -> None:
        for key, value in dict(l1=l1, drift_penalty=drift_penalty, select_epochs=select_epochs,
                               expand_units=expand_units, expand_epochs=expand_epochs,
                               group_lasso=group_lasso, split_threshold=split_threshold).items():
            if value < 0:
                raise CLBenchError(f"strategy.{key} must be >= 0, got {value}")
        self.l1, self.drift_penalty, self.select_epochs = l1, drift_penalty, select_epochs
        self.loss_threshold, self.expand_units, self.expand_epochs = loss_threshold, expand_units, expand_epochs
        self.group_lasso, self.split_threshold = group_lasso, split_threshold

    def setup(self, model, stream, train_cfg, device) -> None:
        net = MaskedNet(model)
        if not net.growable:
            raise CLBenchError(f"DEN adds and splits units, which needs a backbone whose layers connect unit to unit "
                               f"(backbone=mlp); {type(model).__name__} does not")
        super().setup(net.to(device), stream, train_cfg, device)
        hidden = self.model.hidden
        self.born = [torch.zeros(l.out_units, dtype=torch.long, device=device) for l in hidden]
        self.retired = [torch.full((l.out_units,), NEVER, dtype=torch.long, device=device) for l in hidden]
        self.task, self.expanded, self.splits = 0, [], []

    def alive(self, k: int) -> list[torch.Tensor]:
        return [(b <= k) & (r > k) for b, r in zip(self.born, self.retired)]

    def use_task(self, k: int) -> None:
        self.model.set_gates([a.float() for a in self.alive(k)])

    # ----- one optimisation phase: which entries train, and the penalties -------------
    def _phase(self, trainable: list[torch.Tensor], units: list[torch.Tensor], sparse: bool = True,
               groups: Optional[list] = None) -> None:
        """trainable[l]: bool mask of hidden layer l's weights that may change; units[l]: its units
        whose bias may change; `sparse`: L1 on the weights and on the task's output weights;
        `groups`: (layer, rows) under the group lasso."""
        self.guard, self.train_masks, self.groups, self.sparse = FreezeGuard(), trainable, groups, sparse
        self.bias_masks = units
        for layer, mask, rows in zip(self.model.hidden, trainable, units):
            self.guard.freeze(layer.weight, ~mask)
            if layer.bias is not None:
                self.guard.freeze(layer.bias, ~rows)
        hw, hb = head_rows_frozen(self.model.head, self.stream, self.task)
        self.head_mask = ~hw
        self.guard.freeze(self.model.head.weight, hw)
        self.guard.freeze(self.model.head.bias, hb)
        self.optimizer = self.make_optimizer(self.model.parameters())

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.loss(self.model(x), y)
        if self.old is not None and self.drift_penalty > 0:
            loss = loss + self.drift_penalty * sum(
                ((l.weight[:, : o.shape[1]][: o.shape[0]] - o) * m[: o.shape[0], : o.shape[1]]).pow(2).sum()
                for l, o, m in zip(self.model.hidden, self.old, self.train_masks))
            loss = loss + self.drift_penalty * sum(
                ((l.bias[: len(b)] - b) * m[: len(b)]).pow(2).sum()
                for l, b, m in zip(self.model.hidden, self.old_bias, self.bias_masks) if l.bias is not None)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        if not self.guard.step(self.optimizer, self.optimizer_step):
            return loss.detach()  # fp16: a skipped step (inf/NaN gradients) skips the proximal steps too
        with torch.no_grad():  # proximal steps for the L1 and group-lasso penalties
            shrink = self.train_cfg.lr * self.l1 * self.sparse
            for w, m in [(l.weight, m) for l, m in zip(self.model.hidden, self.train_masks)] + [(self.model.head.weight, self.head_mask)]:
                w.copy_(torch.where(m, w.sign() * (w.abs() - shrink).clamp_min(0), w))
            for layer, rows in self.groups or []:
                norm = layer.weight[rows].flatten(1).norm(dim=1).clamp_min(1e-12)
                scale = (1 - self.train_cfg.lr * self.group_lasso / norm).clamp_min(0)
                layer.weight[rows] *= scale.view(-1, *[1] * (layer.weight.dim() - 1))
        return loss.detach()

    def train_step(self, batch) -> dict:
        return {"loss": self._step(batch.x, batch.y)}

    def _train(self, task: Task, n: int, description: str) -> None:
        """`n` epochs of the current phase, shown as `description` on the progress display."""
        self.set_training(True)
        batch_size = self.train_cfg.batch_size
        with self.progress(description, total=n * -(-len(task.train) // batch_size)) as advance:
            for x, y in epochs(task.train, self.stream, n, batch_size):
                self._step(x, y)
                advance()  # batches

    # ----- the task loop -----------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        self.task, self.old = task.id, None
        self.use_task(task.id)
        hidden = self.model.hidden
        if task.id == 0:
            self._phase([torch.ones_like(l.weight, dtype=torch.bool) for l in hidden],
                        [torch.ones(l.out_units, dtype=torch.bool, device=self.device) for l in hidden])
            return
        self.old = [l.weight.detach().clone() for l in hidden]
        self.old_bias = [l.bias.detach().clone() if l.bias is not None else None for l in hidden]
        self._phase([torch.zeros_like(l.weight, dtype=torch.bool) for l in hidden],  # outputs only
                    [torch.zeros(l.out_units, dtype=torch.bool, device=self.device) for l in hidden])
        self._train(task, self.select_epochs, "unit selection")
        # breadth-first search from the task's outputs along non-zero weights
        rows = torch.tensor(task.outputs, device=self.device)
        need = (self.model.head.weight[rows] != 0).any(0)
        self.selected = [None] * len(hidden)
        for l in reversed(range(len(hidden))):
            self.selected[l] = need & self.alive(task.id)[l]
            w = hidden[l].weight.detach().flatten(2).abs().sum(2) if hidden[l].weight.dim() > 2 else hidden[l].weight.detach()
            need = (w[self.selected[l]] != 0).any(0)
        masks = []
        for l, layer in enumerate(hidden):
            ins = self.selected[l - 1] if l > 0 else torch.ones(layer.in_units, dtype=torch.bool, device=self.device)
            m = self.selected[l][:, None] & ins[None, :]
            masks.append(m.view(*m.shape, *[1] * (layer.weight.dim() - 2)).expand_as(layer.weight).clone())
        self._phase(masks, [s.clone() for s in self.selected], sparse=False)  # Eq. 2: L2 (here: drift) only

    @torch.no_grad()
    def _loss(self, task: Task) -> float:
        self.set_training(False)
        x, y = self.stream.transform(task.train.x), task.train.y
        return float(self.loss(self.model(x), y))

    def after_task(self, task: Task) -> None:
        if task.id == 0:
            return
        hidden, n = self.model.hidden, self.expand_units
        added = 0
        if self._loss(task) > self.loss_threshold and n > 0:
            for l in range(len(hidden)):
                self.model.grow(l, n)
                self.born[l] = torch.cat([self.born[l], self.born[l].new_full((n,), task.id)])
                self.retired[l] = torch.cat([self.retired[l], self.retired[l].new_full((n,), NEVER)])
            hidden = self.model.hidden
            self.use_task(task.id)
            masks, units, groups = [], [], []
            for l, layer in enumerate(hidden):
                new_rows = torch.zeros_like(layer.weight, dtype=torch.bool)
                new_rows[-n:] = True
                if l > 0:
                    new_rows[:, -n:] = True  # outgoing weights of the previous layer's new units
                masks.append(new_rows)
                units.append(torch.arange(layer.out_units, device=self.device) >= layer.out_units - n)
                groups.append((layer, torch.arange(layer.out_units - n, layer.out_units, device=self.device)))
            self._phase(masks, units, groups=groups)
            self._train(task, self.expand_epochs, "dynamic expansion")
            for l in range(len(hidden)):  # drop new units the group lasso switched off
                layer = self.model.hidden[l]
                dead = (layer.weight.detach().flatten(1) == 0).all(1) & (self.born[l] == task.id)
                keep = torch.nonzero(~dead).flatten()
                added += int((~dead & (self.born[l] == task.id)).sum())
                if dead.any():
                    self.model.keep_units(l, keep)
                    self.born[l], self.retired[l] = self.born[l][keep], self.retired[l][keep]
        self.expanded.append(added)
        self._split(task)
        self.use_task(task.id)

    @torch.no_grad()
    def _split(self, task: Task) -> None:
        splits = 0
        for l in range(len(self.model.hidden)):
            layer, old, old_b = self.model.hidden[l], self.old[l], self.old_bias[l]
            n_old, in_old = old.shape[0], old.shape[1]
            drift = (layer.weight[:n_old, :in_old] - old).flatten(1).norm(dim=1)
            drift = drift.masked_fill(~self.selected[l][:n_old], 0.0)
            k = min(int((drift > self.split_threshold).sum()), self.expand_units)
            if k == 0:
                continue
            units = drift.topk(k).indices.sort().values  # the k most drifted (the cap of the authors' code)
            nxt = self.model.layers[l + 1]
            rows, cols = layer.weight[units].clone(), nxt.weight[:, units].clone()
            bias = layer.bias[units].clone() if layer.bias is not None else None
            layer.weight[units, :in_old] = old[units]
            if layer.bias is not None:
                layer.bias[units] = old_b[units]  # the original serves earlier tasks with its old bias too
            self.model.grow(l, len(units), rows=rows, cols=cols)
            if bias is not None:
                self.model.hidden[l].bias[-len(units):] = bias
            self.retired[l][units] = task.id
            self.born[l] = torch.cat([self.born[l], self.born[l].new_full((len(units),), task.id)])
            self.retired[l] = torch.cat([self.retired[l], self.retired[l].new_full((len(units),), NEVER)])
            splits += len(units)
        self.splits.append(splits)

    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        self.use_task(task_id)
        try:
            return self.model(x)
        finally:
            self.use_task(self.task)

    def summary(self) -> dict:
        used = []
        for k, task in enumerate(self.stream.tasks[: self.task + 1]):
            alive, n, ins = self.alive(k), 0, None
            for layer, a in zip(self.model.layers, alive + [None]):
                w = layer.weight.detach() if a is None else layer.weight.detach()[a]
                if a is None:
                    w = w[torch.tensor(task.outputs, device=w.device)]
                if ins is not None:
                    w = w[:, ins]
                n += int((w != 0).sum()) + (len(w) if layer.bias is not None else 0)
                ins = a
            used.append(n)
        units = sum(len(b) for b in self.born)
        return size_summary(sum(p.numel() for p in self.model.parameters()), used, 4 * units,
                            units=[len(b) for b in self.born], units_added=list(self.expanded), units_split=list(self.splits))

    def state_dict(self) -> dict:
        return {"born": self.born, "retired": self.retired, "task": self.task,
                "expanded": self.expanded, "splits": self.splits}

    def load_state_dict(self, state: dict) -> None:
        for l, born in enumerate(state["born"]):
            extra = len(born) - self.model.hidden[l].out_units
            if extra > 0:
                self.model.grow(l, extra)
        self.born = [b.to(self.device) for b in state["born"]]
        self.retired = [r.to(self.device) for r in state["retired"]]
        self.task, self.expanded, self.splits = state["task"], state["expanded"], state["splits"]
