"""Gradient Episodic Memory (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning").

GEM keeps an episodic memory M_k per past task k (here: the shared buffer, balanced
over tasks, filled at each task's end) and only takes steps that do not increase any
past task's memory loss. With g the gradient of the current batch and g_k the gradient
of the loss on M_k, a violation is <g, g_k> < 0 for some k (Eq. 7-8). Then g is
replaced by the closest g~ in L2 with <g~, g_k> >= 0, obtained from the dual of that
QP (Eq. 10-11):

    min_v  1/2 v^T G G^T v + g^T G^T v   s.t.  v >= 0,        g~ = G^T v + g,

with G the rows g_k. As in the authors' code, the dual is solved with `quadprog`,
G G^T gets eps=1e-3 on its diagonal, and the bound v >= 0 becomes v >= memory_strength
(their margin, 0.5 by default), which pushes g~ strictly into the feasible cone.

The per-step cost is one forward/backward per past task plus a small QP on the CPU;
`summary()` reports how many steps needed a projection, and the runner's train time
gives the overhead against `finetune`. Memory gradients use the augmented stored
samples; in task-IL each task's loss is restricted to its own outputs.

Training mode and optimizers: the memory forward passes run in training mode, as in the
authors' code (model/gem.py, `observe`: the past tasks' memories go through the same
network in `train()` mode as the current batch), so batch-norm layers normalise each
memory batch with its own statistics and their running statistics see memory batches
too. The projected g~ is written into `.grad` and the run's optimizer steps with it, so
momentum and (coupled or decoupled) weight decay act on top of the projection; the
authors use plain SGD, where the two coincide. `memory_size=0` is the protection-off
switch: no past task, no projection, the same steps (and matrix) as `finetune`.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of `loss` w.r.t. `params` as one flat vector (zeros where unused)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def assign_grad(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat gradient vector into the parameters' .grad fields."""
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start : start + n].view_as(p).clone()
        start += n


def project_to_cone(g: torch.Tensor, G: torch.Tensor, margin: float, eps: float = 1e-3) -> torch.Tensor:
    """GEM's projection (Eq. 11): solve the dual QP for v, return G^T v + g."""
    G_np = G.detach().double().cpu().numpy()
    g_np = g.detach().double().cpu().numpy()
    t = G_np.shape[0]
    P = G_np @ G_np.T
    P = 0.5 * (P + P.T) + eps * np.eye(t)
    # quadprog: min 1/2 v^T P v - a^T v  s.t.  C^T v >= b
    v = quadprog.solve_qp(P, -(G_np @ g_np), np.eye(t), np.full(t, margin))[0]
    return torch.from_numpy(G_np.T @ v + g_np).to(g.device, g.dtype)


class GEM(ReplayStrategy):
    scenarios = ("class_il", "task_il", "domain_il")

    def __init__(self, memory_size: int = 200, memory_strength: float = 0.5, selection: str = "random") -> None:
        """memory_size: total stored samples, split over past tasks; memory_strength: the QP margin;
        selection: random | herding (which samples of a finished task are stored)."""
        if memory_strength < 0:
            raise CLBenchError(f"strategy.memory_strength must be non-negative, got {memory_strength}")
        super().__init__(memory_size, selection, "task")
        self.memory_strength = memory_strength

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._past = [self.memory.indices(task=k) for k in self.memory.tasks() if k != task.id]
        self._steps, self._projected = 0, 0

    def train_step(self, batch: Batch) -> dict:
        params = [p for p in self.model.parameters() if p.requires_grad]
        memory_grads = []
        for index in self._past:
            x, y = self.replay(len(index), index=index)
            memory_grads.append(flat_grad(self.loss(self.model(x), y), params))
        loss = self.loss(self.model(batch.x), batch.y)
        g = flat_grad(loss, params)
        if memory_grads:
            G = torch.stack(memory_grads)
            if bool((G @ g < 0).any()):
                g = project_to_cone(g, G, self.memory_strength)
                self._projected += 1
        self._steps += 1
        assign_grad(params, g)
        self.optimizer.step()
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        self.remember(task)

    def summary(self) -> dict:
        return {**super().summary(), "steps": self._steps, "projected_steps": self._projected}
