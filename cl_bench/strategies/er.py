"""Experience Replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

Each step trains on the incoming batch B joined with an equally large batch B_M drawn
uniformly from the episodic memory M, one SGD step on the mean loss over B ∪ B_M
(the paper's Alg. 1, "ER"); the memory is then updated with B. The memory is filled
by reservoir sampling (Alg. 3, the paper's best-performing and default writer), so
every sample seen so far is in M with equal probability. Replayed samples are stored
raw and augmented like fresh data.

The paper's other writers are available as `selection`: `random` (a class-balanced
memory rebuilt at task end, like its ring buffer) and `herding` (class-balanced by
iCaRL's herding, close to its "mean of features" writer). The paper is single-epoch;
with several epochs the reservoir sees each sample once, in the task's first epoch.
In domain-IL, where labels repeat across tasks, the balanced writers balance tasks.

B and B_M go through the network as one batch in training mode (Alg. 1 takes one step
on their union), so batch norm normalises them together. `memory_size=0` switches
replay off and gives `finetune`'s steps and matrix exactly (the memory's generator is
seeded without drawing from the global RNG).
"""

from __future__ import annotations

import torch

from cl_bench.data.stream import Task
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy


class ER(ReplayStrategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il", "task_il", "domain_il")

    def __init__(self, memory_size: int = 200, selection: str = "reservoir") -> None:
        """memory_size: total stored samples; selection: reservoir | random | herding."""
        super().__init__(memory_size, selection, "none" if selection == "reservoir" else "class")

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        if stream.scenario == "domain_il" and self.memory.balance == "class":
            self.memory.balance = "task"

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._offered = 0  # samples of this task offered to the reservoir

    def train_step(self, batch: Batch) -> dict:
        x, y = batch.x, batch.y
        replayed = self.replay(len(y))
        if replayed is not None:
            x, y = torch.cat([x, replayed[0]]), torch.cat([y, replayed[1]])
        loss = self.loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        if self.memory.selection == "reservoir" and self._offered < len(batch.task.train):
            take = min(len(batch.y), len(batch.task.train) - self._offered)
            self.memory.add_reservoir(batch.raw[:take], batch.y[:take], batch.task.id, self.generator)
            self._offered += take
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        if self.memory.selection != "reservoir":
            self.remember(task)
