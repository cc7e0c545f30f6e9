"""Joint training: at task t, train on the union of the training data of tasks 0..t.

The usual upper bound (De Lange et al., TPAMI 2021, Sec. 6 "Joint"; "JOINT" in
Mammoth, "Joint" in FACIL, which also retrains incrementally from the previous model
rather than from scratch; we do the same). It is not a continual learner: it stores
all data. In task-IL each sample's loss is restricted to its own task's outputs.
"""

from __future__ import annotations

from cl_bench.data.stream import Split, Task
from cl_bench.strategies.base import Strategy


class Joint(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    def training_data(self, task: Task) -> Split:
        return Split.cat([t.train for t in self.stream.tasks[: task.id + 1]])
