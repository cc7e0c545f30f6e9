"""Task and Stream: the data model every strategy and the runner share.

Each task's samples are held as whole tensors (uint8 for images), moved once to the
training device; batches are drawn by indexing, and normalisation/augmentation are
applied to whole batches on the device (see `BatchTransform`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch

from cl_bench import CLBenchError

SCENARIOS = ("class_il", "task_il", "domain_il")


@dataclass
class Split:
    """Samples of one task split: `x` (N, C, H, W) uint8 images or float features, `y` (N,) long."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} samples but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device))

    def pin(self) -> "Split":
        """Page-locked host copies, for fast asynchronous batch copies to a GPU."""
        return Split(self.x.pin_memory(), self.y.pin_memory())

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx` as tensors on `device`; data kept in (pinned) host memory is copied per batch."""
        if self.x.device == idx.device:
            return self.x[idx], self.y[idx]
        idx = idx.to(self.x.device)
        return self.x[idx].to(device, non_blocking=True), self.y[idx].to(device, non_blocking=True)

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.x[index], self.y[index])

    @staticmethod
    def cat(splits: Sequence["Split"]) -> "Split":
        return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


def output_columns(outputs: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """An index for the output units `outputs` of a (batch, units) score tensor: a slice when
    they are a run of consecutive units in ascending order (the usual class order; indexing
    is then a view, and its backward a copy into zeros), else a long tensor (a gather). Both
    select the same columns in the same order, so values and gradients are identical."""
    outputs = [int(o) for o in outputs]
    if outputs and outputs == list(range(outputs[0], outputs[0] + len(outputs))):
        return slice(outputs[0], outputs[0] + len(outputs))
    return torch.tensor(outputs, dtype=torch.long, device=device)


@dataclass
class Task:
    """One task of a stream.

    `classes` are the original dataset labels of this task; `outputs` are the indices
    of the model's output units that belong to the task (equal to `classes` in class-IL
    and task-IL, `0..k-1` in domain-IL where labels are re-indexed within each task).
    `y` in every split is already in output space.
    """

    id: int
    classes: list[int]
    outputs: list[int]
    train: Split
    test: Split
    val: Optional[Split] = None
    # the dataset the task comes from, where tasks are whole datasets (dataset=sequence)
    name: Optional[str] = None

    def to(self, device: torch.device) -> "Task":
        return self._map(lambda split: split.to(device))

    def pin(self) -> "Task":
        return self._map(Split.pin)

    def _map(self, fn) -> "Task":
        return replace(
            self, train=fn(self.train), test=fn(self.test), val=fn(self.val) if self.val is not None else None
        )

    @property
    def nbytes(self) -> int:
        return self.train.nbytes + self.test.nbytes + (self.val.nbytes if self.val is not None else 0)


class BatchTransform:
    """Turns a batch of stored samples into model input on the device.

    uint8 images are scaled to [0, 1], then normalised per channel. `augment` (train only)
    is an optional callable on float batches, e.g. random crop and flip.
    """

    def __init__(
        self,
        mean: Sequence[float] = (),
        std: Sequence[float] = (),
        augment: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
    ) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32) if mean else None
        self.std = torch.tensor(list(std), dtype=torch.float32) if std else None
        self.augment = augment
        self._cache: dict = {}
        # torch.channels_last (device.channels_last): image batches come out NHWC in memory
        self.memory_format: Optional[torch.memory_format] = None

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dim())
        if key not in self._cache:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            self._cache[key] = (
                self.mean.to(x.device).view(shape),
                self.std.to(x.device).view(shape),
            )
        return self._cache[key]

    def __call__(
        self, x: torch.Tensor, train: bool = False, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if train and self.augment is not None:
            x = self.augment(x, generator)
        if self.mean is not None:
            mean, std = self._stats(x)
            x = (x - mean) / std
        if self.memory_format is not None and x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x


@dataclass
class Stream:
    """A sequence of tasks with the scenario that decides what the model sees.

    `num_outputs` is the size of the shared head: all classes in class-IL and task-IL,
    the classes of one task in domain-IL.
    """

    name: str
    tasks: list[Task]
    scenario: str
    num_classes: int
    num_outputs: int
    input_shape: tuple[int, ...]
    transform: BatchTransform = field(default_factory=BatchTransform)
    class_order: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise CLBenchError(f"unknown scenario {self.scenario!r}; choose one of {', '.join(SCENARIOS)}")

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def to(self, device: torch.device, max_device_fraction: float = 0.5) -> "Stream":
        """All tasks on `device`; on a GPU, data larger than `max_device_fraction` of its free
        memory stays in pinned host memory instead and is copied batch by batch
        (`Split.batch`; the runner's evaluation copies each test batch)."""
        device = torch.device(device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if sum(t.nbytes for t in self.tasks) > max_device_fraction * free:
                return replace(self, tasks=[t.pin() for t in self.tasks])
        return replace(self, tasks=[t.to(device) for t in self.tasks])

    @property
    def task_id_at_test(self) -> bool:
        return self.scenario == "task_il"


def split_by_classes(
    name: str,
    train: Split,
    test: Split,
    class_groups: Sequence[Sequence[int]],
    scenario: str,
    input_shape: tuple[int, ...],
    transform: Optional[BatchTransform] = None,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Stream:
    """Build a class-incremental-style stream: task t holds the samples of `class_groups[t]`.

    In domain-IL the labels of each task are re-indexed to 0..k-1 (the position of the
    class within its group), so all tasks share one k-way head.
    """
    if scenario not in SCENARIOS:
        raise CLBenchError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise CLBenchError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
    sizes = {len(g) for g in class_groups}
    if scenario == "domain_il" and len(sizes) != 1:
        raise CLBenchError("domain_il needs the same number of classes in every task")
    all_classes = [c for g in class_groups for c in g]
    if len(set(all_classes)) != len(all_classes):
        raise CLBenchError("a class appears in more than one task")
    num_classes = int(max(all_classes)) + 1
    num_outputs = len(class_groups[0]) if scenario == "domain_il" else num_classes
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for t, group in enumerate(class_groups):
        group = [int(c) for c in group]
        outputs = list(range(len(group))) if scenario == "domain_il" else group
        relabel = torch.full((num_classes,), -1, dtype=torch.long)
        relabel[torch.tensor(group)] = torch.tensor(outputs)

        def take(split: Split) -> Split:
            mask = torch.isin(split.y, torch.tensor(group))
            return Split(split.x[mask], relabel[split.y[mask]])

        task_train, task_test = take(train), take(test)
        if len(task_train) == 0 or len(task_test) == 0:
            raise CLBenchError(f"task {t} (classes {group}) has no train or no test samples")
        task_val = None
        if val_fraction > 0:
            perm = torch.randperm(len(task_train), generator=gen)
            n_val = max(1, int(round(val_fraction * len(task_train))))
            task_val, task_train = task_train.subset(perm[:n_val]), task_train.subset(perm[n_val:])
        tasks.append(Task(t, group, outputs, task_train, task_test, task_val))
    return Stream(
        name=name,
        tasks=tasks,
        scenario=scenario,
        num_classes=num_classes,
        num_outputs=num_outputs,
        input_shape=tuple(input_shape),
        transform=transform or BatchTransform(),
        class_order=all_classes,
    )


def resolve_class_order(
    class_order: str | Sequence[int], num_classes: int, seed: int
) -> list[int]:
    """`natural`, `random` (seeded by the run seed), `seedN` (numpy's permutation under seed N,
    whatever the run seed), or an explicit permutation of 0..num_classes-1.

    `seed1993` is the CIFAR-100 order of iCaRL, LUCIR and PyCIL
    (`np.random.seed(1993); np.random.permutation(100)`, listed as `cifar100_icarl` in FACIL's
    `src/datasets/dataset_config.py`): 68, 56, 78, 8, 23, ...
    """
    if isinstance(class_order, str):
        if class_order == "natural":
            return list(range(num_classes))
        if class_order == "random":
            return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
        if class_order.startswith("seed") and class_order[4:].isdigit() and int(class_order[4:]) < 2**32:
            import numpy as np

            # RandomState(N).permutation == np.random.seed(N); np.random.permutation (the global RNG untouched)
            return np.random.RandomState(int(class_order[4:])).permutation(num_classes).tolist()
        raise CLBenchError(
            "dataset.class_order must be natural, random, seedN (e.g. seed1993) or a list of classes, "
            f"got {class_order!r}"
        )
    order = [int(c) for c in class_order]
    if sorted(order) != list(range(num_classes)):
        raise CLBenchError(
            f"dataset.class_order must list each of the {num_classes} classes exactly once, got {order}"
        )
    return order


def iterate_batches(
    n: int, batch_size: int, generator: torch.Generator, device: torch.device, shuffle: bool = True
):
    """Index tensors over one epoch of `n` samples (a seeded permutation when shuffling)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(device)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def check_cap(max_per_class: Optional[int]) -> None:
    """dataset.max_train_per_class: at least 1, or None for no cap."""
    if max_per_class is not None and max_per_class < 1:
        raise CLBenchError(f"dataset.max_train_per_class must be at least 1 (null: no cap), got {max_per_class}")


def cap_per_class(split: Split, max_per_class: Optional[int]) -> Split:
    """Keep the first `max_per_class` samples of each class (all when None)."""
    check_cap(max_per_class)
    if max_per_class is None:
        return split
    keep = torch.cat(
        [torch.nonzero(split.y == c).flatten()[:max_per_class] for c in split.y.unique()]
    ).sort().values
    return split.subset(keep)


def class_incremental_stream(
    name: str,
    train: Split,
    test: Split,
    scenario: str,
    seed: int,
    num_tasks: int,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    transform: Optional[BatchTransform] = None,
    first_task_classes: Optional[int] = None,
) -> Stream:
    """A labelled dataset split into `num_tasks` tasks of equally many classes (with
    `first_task_classes`: a first task of that many, the rest shared evenly by the others).

    Images are uint8 (N, C, H, W). Without an explicit `transform`, inputs are scaled to
    [0, 1] and normalised with the training set's per-channel mean and std.
    """
    train = cap_per_class(train, max_train_per_class)
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    groups = group_classes(resolve_class_order(class_order, num_classes, seed), num_tasks, first_task_classes)
    if transform is None:
        # the statistics of what BatchTransform normalises: uint8 images scaled to [0, 1],
        # float features as they are (a user's dataset of feature vectors)
        scale = 255.0 if train.x.dtype == torch.uint8 else 1.0
        pixels = train.x.float().div(scale).transpose(0, 1).reshape(train.x.shape[1], -1)
        transform = BatchTransform(mean=pixels.mean(1).tolist(), std=pixels.std(1).tolist())
    return split_by_classes(
        name,
        train,
        test,
        groups,
        scenario,
        input_shape=tuple(train.x.shape[1:]),
        transform=transform,
        val_fraction=val_fraction,
        seed=seed,
    )


def check_task_split(num_classes: Optional[int], num_tasks: int, first_task_classes: Optional[int] = None) -> None:
    """One-line errors for a split of `num_classes` classes into tasks that cannot be made
    (`num_classes` None, not known before loading: the checks that need no class count)."""
    if num_tasks < 1:
        raise CLBenchError(f"dataset.num_tasks must be at least 1, got {num_tasks}")
    if first_task_classes is None:
        if num_classes is not None and num_classes % num_tasks:
            raise CLBenchError(
                f"dataset.num_tasks={num_tasks} does not divide the {num_classes} classes evenly "
                "(dataset.first_task_classes gives the first task more)"
            )
        return
    if first_task_classes < 1:
        raise CLBenchError(f"dataset.first_task_classes must be at least 1 (null: equal tasks), got {first_task_classes}")
    if num_classes is not None and first_task_classes >= num_classes:
        raise CLBenchError(
            f"dataset.first_task_classes must be between 1 and {num_classes - 1} (the stream has "
            f"{num_classes} classes), got {first_task_classes}"
        )
    if num_tasks < 2:
        raise CLBenchError(
            f"dataset.first_task_classes={first_task_classes} needs dataset.num_tasks >= 2 (the first task "
            f"plus the tasks sharing the other classes), got {num_tasks}"
        )
    if num_classes is None:
        return
    rest = num_classes - first_task_classes
    if rest % (num_tasks - 1):
        raise CLBenchError(
            f"dataset.first_task_classes={first_task_classes} leaves {rest} classes, which "
            f"dataset.num_tasks - 1 = {num_tasks - 1} tasks cannot share evenly"
        )


def group_classes(order: Sequence[int], num_tasks: int, first_task_classes: Optional[int] = None) -> list[list[int]]:
    """`order` cut into `num_tasks` tasks of equally many classes, or, with `first_task_classes`,
    a first task of that many and `num_tasks - 1` equal tasks of the rest (LUCIR's and PODNet's
    "B50, 10 steps": 50 classes, then 5 x 10)."""
    check_task_split(len(order), num_tasks, first_task_classes)
    first = len(order) // num_tasks if first_task_classes is None else first_task_classes
    k = (len(order) - first) // max(num_tasks - 1, 1)
    return [list(order[:first])] + [list(order[first + i * k : first + (i + 1) * k]) for i in range(num_tasks - 1)]
