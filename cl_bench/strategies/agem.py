"""Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

A-GEM replaces GEM's one constraint per past task with a single one on the average
memory loss (Eq. 5): with g the current batch's gradient and g_ref the gradient of
the loss on a batch drawn at random from the episodic memory of all past tasks,
the update is g itself when <g, g_ref> >= 0 and otherwise its projection

    g~ = g - (<g, g_ref> / <g_ref, g_ref>) g_ref          (Eq. 11)

(a closed form, no QP). The memory is the shared buffer, balanced over past tasks and
filled at each task's end as in the authors' code; the reference batch has
`sample_size` samples (256 in the paper's experiments), fewer while the memory holds
fewer. One reference gradient per step; g and g_ref are written into preallocated flat
buffers (g's slices are the parameters' `.grad`, so the optimizer steps with what is
written there), and the projection is applied branch-free, in place (the coefficient
is 0 when <g, g_ref> >= 0), so a step costs no device synchronisation; `summary()`
reports how many steps were projected.

The reference gradient is computed in training mode, as in the authors' code (the
reference-gradient pass is fed `train_phase: True`), so batch norm uses the memory
batch's statistics. The run's optimizer steps with the projected gradient (momentum and
weight decay on top; the paper uses plain SGD). `memory_size=0` turns the memory off and
gives `finetune`'s steps exactly.
"""

from __future__ import annotations

from typing import Optional

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy
from cl_bench.strategies.gem import FlatGradient, flat_grad


class AGEM(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il", "task_il", "domain_il")

    def __init__(self, memory_size: int = 200, sample_size: int = 256, selection: str = "random") -> None:
        """memory_size: total stored samples over past tasks; sample_size: reference batch size;
        selection: random | herding."""
        if sample_size < 1:
            raise CLBenchError(f"strategy.sample_size must be positive, got {sample_size}")
        super().__init__(memory_size, selection, "task")
        self.sample_size = sample_size
        self._grad: Optional[FlatGradient] = None
        self._reference: Optional[torch.Tensor] = None  # g_ref, then the step subtracted from g

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._steps, self._projected = 0, torch.zeros((), dtype=torch.long, device=self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self._grad is None or not self._grad.fits(params):
            self._grad = FlatGradient(params)
            self._reference = torch.empty_like(self._grad.flat)

    def train_step(self, batch: Batch) -> dict:
        params = self._grad.params
        loss = self.loss(self.model(batch.x), batch.y)
        g = flat_grad(self.scaled(loss), params, out=self._grad.flat)
        self._grad.assign()
        finite = self.unscale()  # fp16: true gradients before the projection (its 1e-12 floor is not scale-free)
        replayed = self.replay(self.sample_size)
        if replayed is not None:
            g_ref = flat_grad(self.scaled(self.loss(self.model(replayed[0]), replayed[1])), params, out=self._reference)
            if self.unscale_tensors(g_ref) and finite:
                dot = g @ g_ref
                g.sub_(g_ref.mul_(dot.clamp(max=0) / (g_ref @ g_ref).clamp_min(1e-12)))
                self._projected += dot < 0
        self._steps += 1
        self.optimizer_step()
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        self.remember(task)

    # A training step changes only the counters and the replay generator (the memory is written at task ends);
    # the gradient buffers are scratch space and stay out of mid-task snapshots.
    def task_state(self) -> dict:
        return {"steps": self._steps, "projected": self._projected.clone(), "generator": self.generator.get_state()}

    def load_task_state(self, state: dict) -> None:
        self._steps, self._projected = state["steps"], state["projected"].to(self.device)
        self.generator.set_state(state["generator"].cpu())

    def summary(self) -> dict:
        return {**super().summary(), "steps": self._steps, "projected_steps": int(self._projected)}
