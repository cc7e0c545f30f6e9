"""ER-ACE, Experience Replay with asymmetric cross-entropy (Caccia et al., ICLR 2022,
"New Insights on Reducing Abrupt Representation Change in Online Continual Learning").

The incoming batch and the replay batch get different losses (Sec. 4, Eq. 4):

    L_ACE = CE(y_in, f(x_in) restricted to C_in)  +  CE(y_bf, f(x_bf))

- incoming batch: the softmax runs only over the incoming batch's classes, so its
  gradient never pushes down the logits of old classes (the "abrupt representation
  change" at a task switch comes from those pushes). Exactly which outputs it keeps
  follows the authors' code (github pclucas14/AML, methods/er_ace.py; Mammoth's
  models/er_ace.py is the same): the classes present in the incoming batch *and* every
  class not seen so far; only seen classes absent from the batch are masked. Their code
  unmasks "unseen" classes as the label indices >= the largest seen label, which is that
  set when classes arrive in increasing label order (it also keeps the largest seen label
  when absent); here the seen set is tracked directly, since `dataset.class_order` need
  not be increasing. Masked logits get -inf (theirs -1e9), so they get exactly zero gradient.
- replay batch: plain cross-entropy over the whole head (the authors' `process_re`), so
  the replay loss does reach the old classes' logits.

When: the authors' code runs ER-ACE task-free only (it forces `task_free`): the mask and
replay apply from the first step, replay as soon as the memory holds anything. Mammoth's
default (`task_free: false`) applies both from the second task on. `task_free` chooses.

As in both codes, the memory is a reservoir (Algorithm R, the shared `MemoryBuffer`)
offered every incoming batch, in every epoch (the paper is online, one epoch); the replay
batch has `replay_batch_size` samples (their `buffer_batch_size`/`minibatch_size`; null:
the incoming batch size), drawn uniformly without replacement and augmented like fresh
data, and goes through the network separately from the incoming batch (batch norm: its
own batch statistics, a second running-statistics update per step). Task-IL: both losses
also keep the scenario's masking (`Strategy.loss`, as ER here: each sample's task
outputs); Mammoth instead evaluates its class-IL-trained model with each task's outputs
masked, which is class-IL's task-aware accuracy here (`metrics_task_aware`).
"""

from __future__ import annotations

from typing import Optional

import torch

from cl_bench import CLBenchError
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import ReplayStrategy
from cl_bench.strategies.der import check_replay_batch_size


class ERACE(ReplayStrategy):
    scenarios = ("class_il", "task_il")
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step

    def __init__(self, memory_size: int = 200, replay_batch_size: Optional[int] = None, task_free: bool = True) -> None:
        """memory_size: reservoir slots; replay_batch_size: samples per replay draw (null: the
        batch size); task_free: mask and replay from the first step (the authors) or from task 1."""
        super().__init__(memory_size, "reservoir", "none")
        self.replay_batch_size = check_replay_batch_size(replay_batch_size)
        if not isinstance(task_free, bool):
            raise CLBenchError(f"strategy.task_free must be true or false, got {task_free!r}")
        self.task_free = task_free

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        self.seen_classes = torch.zeros(stream.num_outputs, dtype=torch.bool, device=device)

    def incoming_mask(self, y: torch.Tensor) -> torch.Tensor:
        """Outputs the incoming batch's loss keeps: its present classes and the unseen ones."""
        present = torch.zeros_like(self.seen_classes)
        present[y] = True
        self.seen_classes |= present
        return present | ~self.seen_classes

    def train_step(self, batch: Batch) -> dict:
        keep = self.incoming_mask(batch.y)
        asymmetric = self.task_free or batch.task.id > 0
        logits = self.model(batch.x)
        if asymmetric:
            logits = logits.masked_fill(~keep, float("-inf"))
        loss = self.loss(logits, batch.y)
        if asymmetric and len(self.memory) > 0:
            x, y = self.replay(self.replay_batch_size or len(batch.y))
            loss = loss + self.loss(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        self.memory.add_reservoir(batch.raw, batch.y, batch.task.id, self.generator)
        return {"loss": loss.detach()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen_classes": self.seen_classes.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen_classes.copy_(state["seen_classes"])
