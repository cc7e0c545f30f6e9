"""Dark Experience Replay, DER and DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience
for General Continual Learning: a Strong, Simple Baseline").

A reservoir memory M (Vitter's Algorithm R, as ER's) keeps, next to each stored sample x,
the logits z = h_theta(x) the network produced for it when it was inserted (Alg. 1:
z is the output of the same forward pass that gives the step's loss, taken before the
update, and it is never refreshed afterwards). Each step minimises

    DER   (Eq. 6):  CE(y, f(x)) + alpha * ||z' - h(x')||^2           (x', z') ~ M
    DER++ (Eq. 7):  CE(y, f(x)) + alpha * ||z' - h(x')||^2 + beta * CE(y'', f(x''))
                                                                    (x', z'), (x'', y'') ~ M

with two independent memory draws for DER++. As in the authors' code (Mammoth,
models/der.py and derpp.py): the squared distance is `F.mse_loss` over the whole
output vector (mean over samples and outputs, in every scenario); each replay batch
has `replay_batch_size` samples (Mammoth's `minibatch_size`; null: the incoming batch
size), drawn without replacement and augmented like fresh data; the stored logits are
those of the augmented incoming batch (the network saw that view), the stored sample
is raw. The incoming batch and each replay batch go through the network *separately*,
in training mode, so batch norm normalises each with its own statistics and its running
statistics take one update per forward (two per step for DER, three for DER++, the last
from a replay batch), unlike ER here, which forwards the union once.

The authors' code offers every incoming batch to the reservoir, in every epoch; so does
this one (with several epochs a later pass's sample can replace an earlier one, logits
and all; a slot's logits change only when its sample is replaced). CE terms use the
scenario's masking (`Strategy.loss`, as ER here: in task-IL each sample's loss and
prediction cover its task's outputs, the shared-head form of a head per task). The paper
reports Task-IL differently: the class-IL-trained model evaluated with each task's outputs
masked, which is class-IL's task-aware accuracy here (`metrics_task_aware`). `alpha=0` (and `beta=0`) drop their term with its forward pass, so DER
with alpha=0, DER++ with alpha=beta=0 and memory_size=0 are finetune bit for bit (the
memory's generator never draws from the global RNG); DER++ with alpha=0 is replay of
labels through a separate forward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.strategies.base import Batch
from cl_bench.strategies.buffer import MemoryBuffer, ReplayStrategy


def check_weight(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise CLBenchError(f"strategy.{name} must be a non-negative finite number, got {value}")
    return float(value)


def check_replay_batch_size(value: Optional[int]) -> Optional[int]:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise CLBenchError(f"strategy.replay_batch_size must be a positive integer or null, got {value}")
    return value


class LogitMemory(MemoryBuffer):
    """A reservoir memory that also stores, per slot, the logits of its sample at insertion.

    `add` is Algorithm R exactly as `MemoryBuffer.add_reservoir` draws it (the same
    generator draws, slots and within-batch overwrites), writing the logits with the sample.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, "none", "reservoir")
        self.logits: Optional[torch.Tensor] = None

    def add(
        self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, task_id: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Offer a batch with its logits; returns (slots written, the batch rows they got)."""
        slot, row = self.add_reservoir(x, y, task_id, generator)
        if not len(slot) and self.x is None:
            return slot, row
        if self.logits is None or len(self.logits) < len(self.x):
            grown = logits.new_zeros((len(self.x), logits.shape[1]), dtype=torch.float32)
            if self.logits is not None:
                grown[: len(self.logits)] = self.logits
            self.logits = grown
        self.logits[slot] = logits[row].detach().float()
        return slot, row

    @property
    def nbytes(self) -> int:
        extra = 0 if self.logits is None else self.size * self.logits.shape[1] * self.logits.element_size()
        return super().nbytes + extra

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.logits is not None:
            state.update(logits=self.logits[: self.size], logits_rows=len(self.logits))
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.logits = None
        if "logits" in state:
            stored = state["logits"]
            self.logits = stored.new_zeros((state["logits_rows"], stored.shape[1]))
            self.logits[: self.size] = stored


class DER(ReplayStrategy):
    scenarios = ("class_il", "task_il", "domain_il")
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step

    def __init__(self, memory_size: int = 200, alpha: float = 0.2, replay_batch_size: Optional[int] = None) -> None:
        """memory_size: reservoir slots (samples + logits); alpha: weight of the logit
        matching term (Eq. 6); replay_batch_size: samples per replay draw (null: the batch size)."""
        super().__init__(memory_size, "reservoir", "none")
        self.alpha = check_weight("alpha", alpha)
        self.replay_batch_size = check_replay_batch_size(replay_batch_size)
        self.memory = LogitMemory(memory_size)

    def logit_term(self, n: int) -> torch.Tensor:
        """alpha * MSE between the network's logits on a replay draw and the stored ones (Eq. 6)."""
        index = self.memory.sample(n, self.generator)
        x, _ = self.replay(n, index)
        return self.alpha * F.mse_loss(self.model(x).float(), self.memory.logits[index])

    def replay_loss(self, n: int) -> Optional[torch.Tensor]:
        """The replay terms of the step (None when every weight is 0: no draw, no forward)."""
        return self.logit_term(n) if self.alpha > 0 else None

    def train_step(self, batch: Batch) -> dict:
        logits = self.model(batch.x)
        loss = self.loss(logits, batch.y)
        if len(self.memory) > 0:
            replayed = self.replay_loss(self.replay_batch_size or len(batch.y))
            if replayed is not None:
                loss = loss + replayed
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        self.memory.add(batch.raw, batch.y, logits.detach(), batch.task.id, self.generator)
        return {"loss": loss.detach()}


class DERpp(DER):
    def __init__(
        self, memory_size: int = 200, alpha: float = 0.2, beta: float = 1.0, replay_batch_size: Optional[int] = 128
    ) -> None:
        """beta: weight of the cross-entropy on a second, independent replay draw's labels (Eq. 7)."""
        super().__init__(memory_size, alpha, replay_batch_size)
        self.beta = check_weight("beta", beta)

    def replay_loss(self, n: int) -> Optional[torch.Tensor]:
        terms = [self.logit_term(n)] if self.alpha > 0 else []
        if self.beta > 0:
            x, y = self.replay(n)  # a second draw, independent of the first (Eq. 7)
            terms.append(self.beta * self.loss(self.model(x), y))
        return sum(terms[1:], terms[0]) if terms else None
