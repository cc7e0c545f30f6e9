"""HAT: Hard Attention to the Task (Serra, Suris, Miron & Karatzoglou, ICML 2018).

Each hidden layer l has a task embedding e_l^t; its units are gated by
    a_l^t = sigmoid(s * e_l^t)                                              (Eq. 1)
(the gate multiplies the layer's output, which for Linear -> ReLU equals gating the
activation). During training s is annealed over the batches b = 1..B of each epoch,
    s = 1/s_max + (s_max - 1/s_max) (b - 1)/(B - 1),                        (Eq. 3)
and s = s_max at test, where the gate is taken as the step function that sigmoid(s_max e)
approximates, a = 1[sigmoid(s_max e) > 0.5] = 1[e > 0]: the paper uses the sigmoid
itself, whose few gates still in (0, 1) after short training leave their units' weights
partly trainable under Eq. 2 (factor in (0, 1)), so earlier tasks' outputs would keep
moving; with binary test gates a^{<t} is binary and earlier tasks exactly fixed. After
task t the cumulative attention a^{<=t} = max(a^{<t}, a^t) is kept; gradients of later
tasks are conditioned on it,
    g'_{l,ij} = (1 - min(a_{l,i}^{<t}, a_{l-1,j}^{<t})) g_{l,ij},            (Eq. 2)
so weights between units earlier tasks use are frozen. The embedding gradients are
compensated for the annealing,
    q'_{l,i} = s_max [cosh(s e_{l,i}) + 1] / (s [cosh(e_{l,i}) + 1]) q_{l,i}, (Eq. 6)
and the loss carries the attention-sparsity regulariser
    L_r = c * sum_l sum_i a_{l,i}^t (1 - a_{l,i}^{<t}) / sum_l sum_i (1 - a_{l,i}^{<t}).  (Eq. 5)
As in the authors' code: embeddings start N(0, 1), s*e is clamped to +-50 inside cosh,
embeddings are clamped to +-6 after each step, the first layer's inputs count as
used, and the per-task head (the task's rows of the shared head) is not conditioned.

Any optimizer: the paper conditions the gradient of plain SGD. Here the Eq. 2 factor
multiplies each weight's whole update (through the shared `FreezeGuard.scale`), which
is the paper's rule for plain SGD and also covers momentum and (decoupled) weight
decay, which otherwise move weights earlier tasks use: a weight whose factor is 0 (both
its units fully used) never moves. The embeddings of other tasks and the head rows of
other tasks are frozen the same way. The embeddings get no weight decay (it would pull
every e towards 0, i.e. every gate towards undecided; the paper trains them with plain SGD).

Backbones: Eq. 2 assumes each layer's input is exactly the previous layer's gated
output, so that a closed unit feeds zeros. That holds for MLPs and plain conv stacks.
With batch-norm after a gated layer a closed unit outputs BN's shift, not 0, and
residual connections feed a layer from several earlier layers; there (ResNets) the
conservative rule is used: the factor of every incoming weight (and bias) of unit i is
1 - a_i^{<t}, whatever its input. Batch-norm is per task (each task trains and keeps its
own copy of every BN layer, started from the previous task's, as Piggyback and CPG do;
the paper and the authors' AlexNet have no batch-norm): freezing BN after the first
task instead (PackNet's choice) leaves later tasks training unnormalised deep nets,
which diverged at lr 0.01 with SGD momentum 0.9 on a ResNet-18. With these, every
quantity an earlier task's output depends on is frozen.
Task-IL only: the task id picks the embedding.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import (
    FreezeGuard, MaskedNet, bit_bytes, freeze_other_batchnorms, size_summary, start_task_batchnorms,
    task_batchnorms,
)
from cl_bench.strategies.base import Strategy

EMBEDDING_CLAMP = 6.0
COSH_CLAMP = 50.0


class HAT(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("task_il",)

    def __init__(self, s_max: float = 400.0, c: float = 0.75) -> None:
        if s_max <= 1:
            raise CLBenchError(f"strategy.s_max must be > 1, got {s_max}")
        if c < 0:
            raise CLBenchError(f"strategy.c must be >= 0, got {c}")
        self.s_max, self.c = s_max, c

    def setup(self, model, stream, train_cfg, device) -> None:
        net = MaskedNet(model)
        self.norms = task_batchnorms(net.body)
        for bn in self.norms:
            bn.ensure(len(stream))
        net.task_embeddings = nn.ModuleList(nn.Embedding(len(stream), l.out_units) for l in net.hidden)
        for emb in net.task_embeddings:
            nn.init.normal_(emb.weight, 0.0, 1.0)
        super().setup(net.to(device), stream, train_cfg, device)
        self.used = [torch.zeros(l.out_units, device=device) for l in net.hidden]  # a^{<t}
        self.task = 0

    def gates(self, task_id: int, s: float) -> list[torch.Tensor]:
        return [torch.sigmoid(s * emb.weight[task_id]) for emb in self.model.task_embeddings]

    def test_gates(self, task_id: int) -> list[torch.Tensor]:
        """The binary gates sigmoid(s_max e) > 0.5 of task `task_id` (what it runs at test)."""
        return [(emb.weight[task_id] > 0).to(emb.weight.dtype) for emb in self.model.task_embeddings]

    def before_task(self, task: Task) -> None:
        self.task, self.batch_index = task.id, 0
        self.batches = math.ceil(len(task.train) / self.train_cfg.batch_size)
        # Eq. 2 factors for this task (or the conservative rule), fixed while it trains
        self.guard, pre = FreezeGuard(), None
        for layer, post in zip(self.model.hidden, self.used):
            if not self.model.is_chain:
                red = post[:, None]
            else:
                pre_units = torch.ones_like(post[:1]).expand(layer.in_units) if pre is None else \
                    pre.repeat_interleave(layer.in_units // pre.numel())  # conv -> flatten -> linear
                red = torch.minimum(post[:, None], pre_units[None, :])
            self.guard.scale(layer.weight, (1 - red).view(*red.shape, *[1] * (layer.weight.dim() - 2)))
            if layer.bias is not None:
                self.guard.scale(layer.bias, 1 - post)
            pre = post
        for emb in self.model.task_embeddings:
            rows = torch.ones(len(emb.weight), 1, dtype=torch.bool, device=emb.weight.device)
            rows[task.id] = False
            self.guard.freeze(emb.weight, rows.expand_as(emb.weight).clone())
        head = self.model.head
        self.guard.freeze_other_head_rows(head, self.stream, task.id)
        start_task_batchnorms(self.norms, task.id)
        freeze_other_batchnorms(self.norms, task.id, self.guard)
        # no weight decay on the embeddings: it would pull e towards 0, i.e. every gate towards 0.5
        embeddings = {id(p) for p in self.model.task_embeddings.parameters()}
        self.optimizer = self.make_optimizer([
            {"params": [p for p in self.model.parameters() if id(p) not in embeddings]},
            {"params": list(self.model.task_embeddings.parameters()), "weight_decay": 0.0},
        ])

    def use_task(self, task_id: int, gates: list[torch.Tensor]) -> list[torch.Tensor]:
        for bn in self.norms:
            bn.task = task_id
        self.model.set_gates(gates)
        return gates

    def train_step(self, batch) -> dict:
        b, B = self.batch_index % self.batches, self.batches
        self.batch_index += 1
        s = 1 / self.s_max + (self.s_max - 1 / self.s_max) * b / max(B - 1, 1)
        gates = self.use_task(self.task, self.gates(self.task, s))
        loss = self.loss(self.model(batch.x), batch.y)
        num = sum((a * (1 - u)).sum() for a, u in zip(gates, self.used))
        den = sum((1 - u).sum() for u in self.used)
        loss = loss + self.c * num / den.clamp_min(1e-8)  # all units used: num is 0 too
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)  # the compensation below only multiplies gradients: fine while scaled
        with torch.no_grad():
            for emb in self.model.task_embeddings:
                e = emb.weight[self.task]
                num = torch.cosh((s * e).clamp(-COSH_CLAMP, COSH_CLAMP)) + 1
                emb.weight.grad[self.task] *= self.s_max / s * num / (torch.cosh(e) + 1)
        self.guard.step(self.optimizer, self.optimizer_step)
        with torch.no_grad():
            for emb in self.model.task_embeddings:
                emb.weight.clamp_(-EMBEDDING_CLAMP, EMBEDDING_CLAMP)
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        with torch.no_grad():
            self.used = [torch.maximum(u, a) for u, a in zip(self.used, self.test_gates(task.id))]

    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        self.use_task(task_id, self.test_gates(task_id))
        return self.model(x)

    def summary(self) -> dict:
        units = []
        params = []
        for t, task in enumerate(self.stream.tasks[: self.task + 1]):
            active = [a > 0.5 for a in self.test_gates(t)]
            units.append([int(a.sum()) for a in active])
            n, pre = 0, None
            for layer, a in zip(self.model.hidden, active):
                fan_in = layer.in_units if pre is None else int(pre.sum()) * (layer.in_units // pre.numel())
                n += int(a.sum()) * (fan_in * layer.weight[0, 0].numel() + (layer.bias is not None))
                pre = a if self.model.is_chain else None  # without the chain, every input counts
            head = self.model.head
            n += len(task.outputs) * ((head.in_units if pre is None else int(pre.sum())) + (head.bias is not None))
            params.append(n)
        total = sum(p.numel() for p in self.model.parameters())
        mask_bytes = (self.task + 1) * sum(bit_bytes(u.numel()) for u in self.used)
        return size_summary(total, params, mask_bytes, units_per_task=units,
                            units_used=[int((u > 0.5).sum()) for u in self.used])

    def state_dict(self) -> dict:
        return {"used": [u.clone() for u in self.used], "task": self.task}

    def load_state_dict(self, state: dict) -> None:
        self.used = [u.to(self.device) for u in state["used"]]
        self.task = state["task"]
