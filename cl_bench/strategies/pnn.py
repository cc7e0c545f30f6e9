"""Progressive Neural Networks (Rusu et al., 2016, arXiv:1606.04671).

One column per task (Sec. 2): when task t starts, the columns of tasks < t are frozen
and a new column t, with lateral adapters from all earlier columns (Eq. 2, see
models/pnn.py), is added and trained. Task k is predicted by column k, so nothing
learned earlier can be overwritten: zero forgetting by construction, at the price of
a model that grows by one column (and its adapters) per task. Columns take the
backbone's MLP shape (`backbone.hidden_sizes`) and dropout; other backbones are refused
in setup. Each column has its own head over the stream's outputs (the task's outputs
are selected by the task-IL restriction). `parameters_per_task` counts what a paper
would print for task k: column k with its task's head rows, plus the hidden layers and
adapters of the earlier columns it reads (not their heads); `parameters_per_column` and
`parameters_total` are the stored sizes. Task-IL only: the task id picks the column.
"""

from __future__ import annotations

from typing import Optional

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.pnn import ProgressiveNet
from cl_bench.strategies.base import Strategy
from cl_bench.models.masked import size_summary


class PNN(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    changes_model_shape = True
    scenarios = ("task_il",)
    lateral = True

    def __init__(self, alpha_init: float = 0.1) -> None:
        if alpha_init < 0:
            raise CLBenchError(f"strategy.alpha_init must be >= 0, got {alpha_init}")
        self.alpha_init = alpha_init

    def setup(self, model, stream, train_cfg, device) -> None:
        net = ProgressiveNet.like(model, stream.input_shape, stream.num_outputs,
                                  lateral=self.lateral, alpha_init=self.alpha_init)
        net.add_column()  # column 0 exists from the start (the random-init evaluation uses it)
        super().setup(net.to(device), stream, train_cfg, device)

    def before_task(self, task: Task) -> None:
        while len(self.model.columns) <= task.id:
            self.model.add_column()
        for k, column in enumerate(self.model.columns):
            column.requires_grad_(k == task.id)
        self.current = task.id
        params = [p for p in self.model.columns[task.id].parameters()]
        self.optimizer = self.make_optimizer(params)

    def train_step(self, batch) -> dict:
        loss = self.loss(self.model(batch.x, self.current), batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach()}

    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        if task_id >= len(self.model.columns):  # no column yet: an untrained task scores uniformly
            return x.new_zeros(len(x), self.stream.num_outputs)
        return self.model(x, task_id)

    def summary(self) -> dict:
        net = self.model
        sizes = [net.column_parameters(k) for k in range(len(net.columns))]
        used = []
        for k in range(len(sizes)):
            own = net.columns[k].used_parameters(self.stream.tasks[k].outputs, with_head=True)
            # task k runs the hidden layers of columns 0..k-1 too (their laterals feed column k)
            earlier = sum(net.columns[j].used_parameters(None, with_head=False) for j in range(k)) if self.lateral else 0
            used.append(own + earlier)
        return size_summary(sum(sizes), used, 0, columns=len(sizes), parameters_per_column=sizes)

    def state_dict(self) -> dict:
        return {"columns": len(self.model.columns)}

    def load_state_dict(self, state: dict) -> None:
        while len(self.model.columns) < state["columns"]:
            self.model.add_column()
