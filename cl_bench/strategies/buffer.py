"""The episodic memory every replay strategy shares, and the base class built on it.

`MemoryBuffer` holds at most `capacity` stored samples (raw uint8 images, as the stream
keeps them) with their labels and task ids, as tensors on the training device, so a
replay batch is one index operation. Two ways to fill it:

- `balance="none"`, `selection="reservoir"`: reservoir sampling over the stream
  (Vitter 1985, Algorithm R), as ER uses it (Chaudhry et al. 2019, Alg. 1/3): after
  n samples seen, each one is in memory with probability capacity/n.
- `balance="class"` or `"task"`, `selection="random"` or `"herding"`: at a task's
  end the memory is split evenly over the classes (iCaRL, EEIL, BiC) or tasks (GEM,
  A-GEM) seen so far, m = capacity // groups each (iCaRL Alg. 2: m = K/t). Each group
  keeps its samples in a priority order (`rank`), so shrinking a group to m keeps its
  first m, exactly iCaRL's ReduceExemplarSet (Alg. 5). Herding (iCaRL Alg. 4) ranks a
  class's samples greedily so the running mean of the L2-normalised features of the
  chosen ones stays closest to the class mean; random ranks them by a random
  permutation. A task group interleaves its classes' orders, so any prefix of it is
  class-balanced within the task.

`ReplayStrategy` wires the buffer into a Strategy: validation of `memory_size` and
`selection`, a seeded generator (its state checkpointed) for replay draws and
augmentation of replayed samples, features for herding, and the memory facts that
`summary()` reports (exemplars stored, bytes).
"""

from __future__ import annotations

import math

from typing import Callable, Optional

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Split, Task, iterate_batches
from cl_bench.strategies.base import PhaseProgress, Strategy

BALANCES = ("none", "class", "task")
SELECTIONS = ("reservoir", "random", "herding")


def herding_order(features: torch.Tensor, count: int) -> torch.Tensor:
    """iCaRL's herding (Alg. 4) on L2-normalised features: the indices of `count` samples,
    each chosen so the mean of those chosen so far is closest to the class mean."""
    feats = torch.nn.functional.normalize(features.double(), dim=1)
    target = feats.mean(0)
    running = torch.zeros_like(target)
    taken = torch.zeros(len(feats), dtype=torch.bool, device=feats.device)
    order = []
    for k in range(1, min(count, len(feats)) + 1):
        dist = (target - (running + feats) / k).norm(dim=1).masked_fill(taken, float("inf"))
        i = int(dist.argmin())
        order.append(i)
        taken[i] = True
        running += feats[i]
    return torch.tensor(order, dtype=torch.long, device=features.device)


class MemoryBuffer:
    """A fixed-size memory of raw samples, labels and task ids on the training device."""

    def __init__(self, capacity: int, balance: str = "none", selection: str = "reservoir") -> None:
        if capacity < 0:
            raise CLBenchError(f"strategy.memory_size must be non-negative, got {capacity}")
        if selection not in SELECTIONS:
            raise CLBenchError(f"strategy.selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if balance not in BALANCES:
            raise CLBenchError(f"memory balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        if (selection == "reservoir") != (balance == "none"):
            raise CLBenchError(
                f"strategy.selection={selection} does not fit a {balance}-balanced memory: reservoir "
                "sampling fills an unbalanced memory online, random and herding fill a balanced one at task end"
            )
        self.capacity, self.balance, self.selection = capacity, balance, selection
        self.size = 0  # slots 0..size-1 are filled
        self.seen = 0  # samples offered to the memory so far
        self.groups: set[int] = set()  # classes or tasks that have a share of a balanced memory
        self.x: Optional[torch.Tensor] = None
        self.y = self.task = self.rank = torch.empty(0, dtype=torch.long)

    # ----- storage -----------------------------------------------------------------
    def _reserve(self, like: torch.Tensor, needed: int) -> None:
        """Storage for at least min(capacity, needed) samples like `like`, grown by doubling:
        a memory larger than what a run can ever offer it (e.g. memory_size=10**12) holds
        everything it is offered instead of failing to allocate `capacity` rows up front."""
        rows = min(self.capacity, needed)
        if self.x is not None and len(self.x) >= rows:
            return
        if self.x is not None:
            rows = min(self.capacity, max(rows, 2 * len(self.x)))
        x = like.new_zeros((rows, *like.shape[1:]))
        y, task, rank = (torch.zeros(rows, dtype=torch.long, device=like.device) for _ in range(3))
        if self.x is not None:
            n = len(self.x)
            x[:n], y[:n], task[:n], rank[:n] = self.x, self.y, self.task, self.rank
        self.x, self.y, self.task, self.rank = x, y, task, rank

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        if self.x is None:
            return 0
        per_slot = math.prod(self.x.shape[1:]) * self.x.element_size() + 3 * self.y.element_size()
        return self.size * per_slot

    def split(self, index: Optional[torch.Tensor] = None) -> Split:
        """The stored samples (all, or those at `index`) as a Split of raw x and labels."""
        if self.x is None:
            raise CLBenchError("the memory is empty")
        index = torch.arange(self.size, device=self.y.device) if index is None else index
        return Split(self.x[index], self.y[index])

    def indices(self, task: Optional[int] = None, label: Optional[int] = None) -> torch.Tensor:
        keep = torch.ones(self.size, dtype=torch.bool, device=self.y.device)
        if task is not None:
            keep &= self.task[: self.size] == task
        if label is not None:
            keep &= self.y[: self.size] == label
        return keep.nonzero().flatten()

    def tasks(self) -> list[int]:
        return sorted(self.task[: self.size].unique().tolist())

    def labels(self) -> list[int]:
        return sorted(self.y[: self.size].unique().tolist())

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` distinct slot indices drawn uniformly (all of them if the memory holds fewer)."""
        pick = torch.randperm(self.size, generator=generator)[:n]
        return pick.to(self.y.device)

    # ----- filling -------------------------------------------------------------------
    def add_reservoir(
        self, x: torch.Tensor, y: torch.Tensor, task_id: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Offer a batch to the reservoir (Algorithm R, vectorised over the batch); returns the
        slots written and the batch rows they got (DER keeps those rows' logits alongside)."""
        if self.capacity == 0 or len(y) == 0:
            empty = torch.empty(0, dtype=torch.long, device=y.device)
            return empty, empty
        self._reserve(x, self.seen + len(y))
        n = self.seen + torch.arange(len(y), dtype=torch.float64)
        draws = (torch.rand(len(y), generator=generator, dtype=torch.float64) * (n + 1)).floor().long()
        slots = torch.where(n < self.capacity, n.long(), draws)
        source = torch.arange(len(y))
        keep = slots < self.capacity
        slots, source = slots[keep], source[keep]
        # Within one batch, a later sample overwrites an earlier one in the same slot.
        last = torch.full((len(self.x),), -1, dtype=torch.long).scatter_reduce(0, slots, source, "amax")
        wins = last[slots] == source
        slots, source = slots[wins].to(self.y.device), source[wins].to(self.y.device)
        self.x[slots], self.y[slots] = x[source], y[source]
        self.task[slots], self.rank[slots] = task_id, 0
        self.seen += len(y)
        self.size = min(self.capacity, self.seen)
        return slots, source

    def update(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        task_id: int,
        generator: torch.Generator,
        features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        progress: Optional[Callable[..., PhaseProgress]] = None,
    ) -> None:
        """Task end: shrink the stored groups to the new quota, then add the new groups.

        `x`, `y` are the finished task's training samples; `features(x)` embeds raw
        samples (needed for herding); `progress` (a `Strategy.progress`) shows herding,
        class by class, counted in samples.
        """
        if self.capacity == 0:
            return
        self._reserve(x, self.size)
        labels = y.unique().tolist()
        self.groups |= set(labels) if self.balance == "class" else {task_id}
        quota = self.capacity // len(self.groups)
        old_keep = ((self.rank[: self.size] < quota) & (self.task[: self.size] != task_id)).nonzero().flatten()
        if self.balance == "class":
            old_keep = old_keep[~torch.isin(self.y[old_keep], y.unique())]
        herding = progress is not None and self.selection == "herding"
        with (progress("herding exemplars", total=len(y)) if herding else PhaseProgress()) as advance:
            orders = [self._order(x, y, c, quota, generator, features, advance) for c in labels]
        if self.balance == "class":
            new_idx = torch.cat(orders)
            new_rank = torch.cat([torch.arange(len(o), device=y.device) for o in orders])
        else:  # interleave the classes so every prefix of the task's group is class-balanced
            pos = torch.cat([torch.arange(len(o), device=y.device) * len(orders) + j for j, o in enumerate(orders)])
            keep = pos.argsort()[:quota]
            new_idx, new_rank = torch.cat(orders)[keep], torch.arange(min(quota, len(pos)), device=y.device)
        kept = [t[old_keep].clone() for t in (self.x, self.y, self.task, self.rank)]
        n_old, n_new = len(old_keep), len(new_idx)
        self._reserve(x, n_old + n_new)
        self.x[:n_old], self.y[:n_old], self.task[:n_old], self.rank[:n_old] = kept
        self.x[n_old : n_old + n_new], self.y[n_old : n_old + n_new] = x[new_idx], y[new_idx]
        self.task[n_old : n_old + n_new], self.rank[n_old : n_old + n_new] = task_id, new_rank
        self.size = n_old + n_new
        self.seen += len(y)

    def _order(self, x, y, label, count, generator, features, advance=lambda n: None) -> torch.Tensor:
        """Indices into x of up to `count` samples of class `label`, in priority order."""
        members = (y == label).nonzero().flatten()
        if self.selection == "herding":
            if features is None:
                raise CLBenchError("herding selection needs the model's features")
            order = members[herding_order(features(x[members]), count)]
            advance(len(members))
            return order
        perm = torch.randperm(len(members), generator=generator).to(members.device)
        return members[perm[:count]]

    # ----- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"size": self.size, "seen": self.seen, "groups": sorted(self.groups)}
        if self.x is not None:
            n = self.size
            state.update(x=self.x[:n], y=self.y[:n], task=self.task[:n], rank=self.rank[:n], shape=tuple(self.x.shape))
        return state

    def load_state_dict(self, state: dict) -> None:
        self.size, self.seen, self.groups = state["size"], state["seen"], set(state["groups"])
        if "x" in state:
            self.x = state["x"].new_zeros(state["shape"])
            device = state["x"].device
            self.y, self.task, self.rank = (
                torch.zeros(state["shape"][0], dtype=torch.long, device=device) for _ in range(3)
            )
            n = self.size
            self.x[:n], self.y[:n], self.task[:n], self.rank[:n] = state["x"], state["y"], state["task"], state["rank"]

    def summary(self) -> dict:
        counts = torch.bincount(self.y[: self.size]).tolist() if self.size else []
        return {
            "memory_size": self.capacity,
            "exemplars": self.size,
            "bytes": self.nbytes,
            "exemplars_per_class": {c: n for c, n in enumerate(counts) if n},
        }


class ReplayStrategy(Strategy):
    """A Strategy with one `MemoryBuffer` (`self.memory`) and a checkpointed generator."""

    def __init__(self, memory_size: int, selection: str, balance: str, need_memory: bool = False) -> None:
        if need_memory and memory_size < 1:
            raise CLBenchError(f"strategy.memory_size must be positive for {type(self).__name__}, got {memory_size}")
        self.memory = MemoryBuffer(memory_size, balance, selection)
        self.need_memory = need_memory

    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        if self.need_memory and self.memory.balance == "class" and self.memory.capacity < stream.num_outputs:
            raise CLBenchError(
                f"strategy.memory_size={self.memory.capacity} is less than one exemplar per class for the "
                f"{stream.num_outputs} classes of this stream ({type(self).__name__} splits the memory evenly "
                f"over the classes seen, m = floor(memory_size / classes)); use at least {stream.num_outputs}"
            )
        # Seeded from the run's seed without drawing from the global torch RNG, so a strategy
        # whose memory is off (memory_size=0) leaves every other random draw as finetune's.
        self.generator = torch.Generator().manual_seed(torch.initial_seed() + 1)
        self.seen_mask: Optional[torch.Tensor] = None  # set by mark_seen (class-IL methods with growing heads)

    def seen_outputs(self, task: Task, include_current: bool = True) -> list[int]:
        tasks = self.stream.tasks[: task.id + (1 if include_current else 0)]
        return sorted({o for t in tasks for o in t.outputs})

    def mark_seen(self, task: Task) -> torch.Tensor:
        """Task start: the outputs of the classes of tasks 0..task (a bool mask, also kept
        as `seen_mask` for `over_seen`)."""
        self.seen_mask = torch.zeros(self.stream.num_outputs, dtype=torch.bool, device=self.device)
        self.seen_mask[self.seen_outputs(task)] = True
        return self.seen_mask

    def over_seen(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores of the classes not trained yet set to -inf (iCaRL, EEIL, BiC: the papers'
        and authors' heads grow with each task, so a class exists only once its task came).
        Before the first task (the untrained baseline row) all outputs compete."""
        return scores if self.seen_mask is None else scores.masked_fill(~self.seen_mask, float("-inf"))

    @torch.no_grad()
    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        """Backbone features of raw samples (eval mode, no augmentation), in large batches."""
        was_training = self.model.training
        self.model.eval()
        step = self.train_cfg.eval_batch_size
        out = torch.cat([self.model.features(self.stream.transform(raw[i : i + step])) for i in range(0, len(raw), step)])
        self.model.train(was_training)
        return out

    def remember(self, task: Task) -> None:
        """Task end: add the task's training samples to the balanced memory."""
        data = task.train
        self.memory.update(data.x, data.y, task.id, self.generator, self.embed, self.progress)

    def replay(self, n: int, index: Optional[torch.Tensor] = None) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """A batch of `n` memory samples (or those at `index`) as (augmented input, labels)."""
        if len(self.memory) == 0:
            return None
        index = self.memory.sample(n, self.generator) if index is None else index
        raw = self.memory.x[index]
        return self.stream.transform(raw, train=True, generator=self.generator), self.memory.y[index]

    def passes(self, data: Split, epochs: int, batch_size: int, description: str,
               on_epoch: Optional[Callable[[int], None]] = None):
        """(x, y) batches of `epochs` shuffled passes over `data` (the strategy's generator),
        augmented like fresh data, shown on the progress display as `description` in
        batches: the loop of the task-end training phases (EEIL's and PODNet's balanced
        fine-tuning, LUCIR's CBF, GDumb's training on its memory). `on_epoch(epoch)` runs
        before each pass (e.g. an lr schedule)."""
        with self.progress(description, total=epochs * -(-len(data) // batch_size)) as advance:
            for epoch in range(epochs):
                if on_epoch is not None:
                    on_epoch(epoch)
                for idx in iterate_batches(len(data), batch_size, self.generator, self.device):
                    yield self.stream.transform(data.x[idx], train=True, generator=self.generator), data.y[idx]
                    advance()  # batches

    def training_data_with_memory(self, task: Task) -> Split:
        """The task's training samples joined with the stored exemplars (iCaRL, EEIL, BiC)."""
        if len(self.memory) == 0:
            return task.train
        return Split.cat([task.train, self.memory.split()])

    def summary(self) -> dict:
        return self.memory.summary()

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "generator": self.generator.get_state(), "seen": self.seen_mask}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.generator.set_state(state["generator"].cpu())
        self.seen_mask = state.get("seen")
