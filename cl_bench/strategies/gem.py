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
(their margin, 0.5 by default), which pushes g~ strictly into the feasible cone. The QP
runs only on steps with a violation (checked in float32, one host sync per step); G G^T,
G g and G^T v + g are formed in float64 as in the authors' code, but by torch on the
run's device and threads (numpy's BLAS starts its own threads, which on a busy machine
cost more than the rest of the step), and only the t x t system goes to the solver.

The per-step cost is one forward/backward per past task plus the QP. The passes stay one
per task: a single batched pass over all memories would change batch norm (each memory
batch has its own statistics) and, measured on the CPU, torch.func.vmap over tasks or
`is_grads_batched` cost more than the loop. The gradients land in preallocated flat
buffers: the rows of G, and g, whose slices are the parameters' `.grad`, so the
optimizer steps with what is written there. Without augmentation the memories' model
inputs are computed once per task. `summary()` reports how many steps needed a
projection, and the runner's train time gives the overhead against `finetune`. Memory
gradients use the augmented stored samples; in task-IL each task's loss is restricted
to its own outputs.

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

from typing import Optional

import numpy as np
import quadprog
import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import BatchTransform, Task
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient of `loss` w.r.t. `params` as one flat vector (zeros where unused), written into `out` if given."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    return torch.cat(flat, out=out)


class FlatGradient:
    """A flat buffer laid out like `params`, whose slices become the parameters' `.grad`."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        sizes = [p.numel() for p in params]
        self.views = [v.view_as(p) for v, p in zip(self.flat.split(sizes), params)]

    def fits(self, params: list[torch.Tensor]) -> bool:
        return len(params) == len(self.params) and all(p is q for p, q in zip(params, self.params))

    def assign(self) -> None:
        """Make the buffer the parameters' gradient (the optimizer reads `.grad`)."""
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                p.grad = view


def project_to_cone(g: torch.Tensor, G: torch.Tensor, margin: float, eps: float = 1e-3,
                    work: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GEM's projection (Eq. 11): solve the dual QP for v, return G^T v + g in float64.
    `work`: an optional float64 (len(G) + 1, len(g)) buffer to compute in (no allocations)."""
    t = len(G)
    work = G.new_empty((t + 1, len(g)), dtype=torch.float64) if work is None else work
    G64, g64 = work[:t], work[t]
    G64.copy_(G)
    g64.copy_(g)
    products = (work @ G64.T).cpu().numpy()  # rows: G G^T, then (G g)^T; one transfer to the solver
    P = 0.5 * (products[:t] + products[:t].T) + eps * np.eye(t)
    # quadprog: min 1/2 v^T P v - a^T v  s.t.  C^T v >= b
    v = quadprog.solve_qp(P, -products[t], np.eye(t), np.full(t, margin))[0]
    return g64.addmv_(G64.T, torch.from_numpy(v).to(work.device))


class GEM(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il", "task_il", "domain_il")

    def __init__(self, memory_size: int = 200, memory_strength: float = 0.5, selection: str = "random") -> None:
        """memory_size: total stored samples, split over past tasks; memory_strength: the QP margin;
        selection: random | herding (which samples of a finished task are stored)."""
        if memory_strength < 0:
            raise CLBenchError(f"strategy.memory_strength must be non-negative, got {memory_strength}")
        super().__init__(memory_size, selection, "task")
        self.memory_strength = memory_strength
        self._grad: Optional[FlatGradient] = None  # g, whose slices are the parameters' .grad
        self._memory_grads: Optional[torch.Tensor] = None  # G: one row g_k per past task
        self._work: Optional[torch.Tensor] = None  # G and g in float64 for the QP

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._past = [self.memory.indices(task=k) for k in self.memory.tasks() if k != task.id]
        self._inputs: Optional[list] = None  # the memories' (x, y) when the transform draws nothing
        self._steps, self._projected = 0, 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self._grad is None or not self._grad.fits(params):
            self._grad = FlatGradient(params)
        shape = (len(self._past), len(self._grad.flat))
        if self._memory_grads is None or self._memory_grads.shape != shape:
            self._memory_grads = self._grad.flat.new_empty(shape)
            self._work = self._grad.flat.new_empty((shape[0] + 1, shape[1]), dtype=torch.float64)

    def memory_inputs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each past task's memory as (model input, labels); recomputed per step only when
        the transform augments (its random draws then stay in the same order)."""
        if self._inputs is not None:
            return self._inputs
        inputs = [self.replay(len(index), index=index) for index in self._past]
        transform = self.stream.transform
        if isinstance(transform, BatchTransform) and transform.augment is None:
            self._inputs = inputs
        return inputs

    def train_step(self, batch: Batch) -> dict:
        params, G = self._grad.params, self._memory_grads
        for row, (x, y) in zip(G, self.memory_inputs()):
            flat_grad(self.scaled(self.loss(self.model(x), y)), params, out=row)
        loss = self.loss(self.model(batch.x), batch.y)
        g = flat_grad(self.scaled(loss), params, out=self._grad.flat)
        self._grad.assign()
        # fp16: G and g back to true gradients first (the QP's eps * I is not scale-free)
        finite = self.unscale() and self.unscale_tensors(G)
        if finite and len(G) and bool((G @ g < 0).any()):
            g.copy_(project_to_cone(g, G, self.memory_strength, work=self._work))
            self._projected += 1
        self._steps += 1
        self.optimizer_step()
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        self.remember(task)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._inputs = None

    # A training step changes only the counters and the replay generator (the memory is written at task ends);
    # the buffers above are scratch space and stay out of mid-task snapshots.
    def task_state(self) -> dict:
        return {"steps": self._steps, "projected": self._projected, "generator": self.generator.get_state()}

    def load_task_state(self, state: dict) -> None:
        self._steps, self._projected = state["steps"], state["projected"]
        self.generator.set_state(state["generator"].cpu())

    def summary(self) -> dict:
        return {**super().summary(), "steps": self._steps, "projected_steps": self._projected}
