"""HAT: Hard Attention to the Task (Serra, Suris, Miron & Karatzoglou, ICML 2018).

Each hidden layer l has a task embedding e_l^t; its units are gated by
    a_l^t = sigmoid(s * e_l^t)                                              (Eq. 1)
(the gate multiplies the layer's output, which for Linear -> ReLU equals gating the
activation). During training s is annealed over the batches b = 1..B of each epoch,
    s = 1/s_max + (s_max - 1/s_max) (b - 1)/(B - 1),                        (Eq. 3)
and s = s_max at test. After task t the cumulative attention a^{<=t} = max(a^{<t}, a^t)
is kept; gradients of later tasks are conditioned on it,
    g'_{l,ij} = (1 - min(a_{l,i}^{<t}, a_{l-1,j}^{<t})) g_{l,ij},            (Eq. 2)
so weights between units earlier tasks use are frozen. The embedding gradients are
compensated for the annealing,
    q'_{l,i} = s_max [cosh(s e_{l,i}) + 1] / (s [cosh(e_{l,i}) + 1]) q_{l,i}, (Eq. 6)
and the loss carries the attention-sparsity regulariser
    L_r = c * sum_l sum_i a_{l,i}^t (1 - a_{l,i}^{<t}) / sum_l sum_i (1 - a_{l,i}^{<t}).  (Eq. 5)
As in the authors' code: embeddings start N(0, 1), s*e is clamped to +-50 inside cosh,
embeddings are clamped to +-6 after each step, the first layer's inputs count as
used, and the per-task head (the task's rows of the shared head) is not conditioned.
Task-IL only: the task id picks the embedding.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.masked import MaskedNet, bit_bytes, size_summary
from cl_bench.strategies.base import Strategy

EMBEDDING_CLAMP = 6.0
COSH_CLAMP = 50.0


class HAT(Strategy):
    scenarios = ("task_il",)

    def __init__(self, s_max: float = 400.0, c: float = 0.75) -> None:
        if s_max <= 1:
            raise CLBenchError(f"strategy.s_max must be > 1, got {s_max}")
        if c < 0:
            raise CLBenchError(f"strategy.c must be >= 0, got {c}")
        self.s_max, self.c = s_max, c

    def setup(self, model, stream, train_cfg, device) -> None:
        net = MaskedNet(model)
        net.task_embeddings = nn.ModuleList(nn.Embedding(len(stream), l.out_units) for l in net.hidden)
        for emb in net.task_embeddings:
            nn.init.normal_(emb.weight, 0.0, 1.0)
        super().setup(net.to(device), stream, train_cfg, device)
        self.used = [torch.zeros(l.out_units, device=device) for l in net.hidden]  # a^{<t}
        self.task = 0

    def gates(self, task_id: int, s: float) -> list[torch.Tensor]:
        return [torch.sigmoid(s * emb.weight[task_id]) for emb in self.model.task_embeddings]

    def before_task(self, task: Task) -> None:
        self.task, self.batch_index = task.id, 0
        self.batches = math.ceil(len(task.train) / self.train_cfg.batch_size)
        self.optimizer = self.make_optimizer(self.model.parameters())
        # Eq. 2 factors for this task, fixed while it trains
        self.keep = []
        pre = None
        for layer, post in zip(self.model.hidden, self.used):
            pre_units = torch.ones_like(post[:1]).expand(layer.in_units) if pre is None else \
                pre.repeat_interleave(layer.in_units // pre.numel())  # conv -> flatten -> linear
            red = torch.minimum(post[:, None], pre_units[None, :])
            red = red.view(*red.shape, *[1] * (layer.weight.dim() - 2)).expand_as(layer.weight)
            self.keep.append(((1 - red).clone(), 1 - post))
            pre = post

    def train_step(self, batch) -> dict:
        b, B = self.batch_index % self.batches, self.batches
        self.batch_index += 1
        s = 1 / self.s_max + (self.s_max - 1 / self.s_max) * b / max(B - 1, 1)
        gates = self.gates(self.task, s)
        self.model.set_gates(gates)
        loss = self.loss(self.model(batch.x), batch.y)
        num = sum((a * (1 - u)).sum() for a, u in zip(gates, self.used))
        den = sum((1 - u).sum() for u in self.used)
        loss = loss + self.c * num / den
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for layer, (keep_w, keep_b) in zip(self.model.hidden, self.keep):
                layer.weight.grad.mul_(keep_w)
                if layer.bias is not None:
                    layer.bias.grad.mul_(keep_b)
            for emb in self.model.task_embeddings:
                e = emb.weight[self.task]
                num = torch.cosh((s * e).clamp(-COSH_CLAMP, COSH_CLAMP)) + 1
                emb.weight.grad[self.task] *= self.s_max / s * num / (torch.cosh(e) + 1)
        self.optimizer.step()
        with torch.no_grad():
            for emb in self.model.task_embeddings:
                emb.weight.clamp_(-EMBEDDING_CLAMP, EMBEDDING_CLAMP)
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        with torch.no_grad():
            self.used = [torch.maximum(u, a) for u, a in zip(self.used, self.gates(task.id, self.s_max))]

    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        self.model.set_gates(self.gates(task_id, self.s_max))
        return self.model(x)

    def summary(self) -> dict:
        units = []
        params = []
        for t, task in enumerate(self.stream.tasks[: self.task + 1]):
            active = [a > 0.5 for a in self.gates(t, self.s_max)]
            units.append([int(a.sum()) for a in active])
            n, pre = 0, None
            for layer, a in zip(self.model.hidden, active):
                fan_in = layer.in_units if pre is None else int(pre.sum()) * (layer.in_units // pre.numel())
                n += int(a.sum()) * (fan_in * layer.weight[0, 0].numel() + (layer.bias is not None))
                pre = a
            head = self.model.head
            n += len(task.outputs) * (int(pre.sum()) + (head.bias is not None))
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
