"""MNIST streams: Split MNIST (class-incremental), Permuted MNIST and Rotated MNIST (domain-incremental).

Data: the official MNIST files (60,000 train / 10,000 test 28x28 digits) read by
torchvision's `MNIST` class from `<root>/MNIST/raw/`, downloaded there when missing
and `dataset.download` is true. Gzipped IDX files (`*.gz`) dropped into that folder
by hand are unpacked first. Each IDX file's header is checked against its size, so a
truncated file stops the run with a message naming it.

- Split MNIST (Zenke et al. 2017; van de Ven & Tolias 2019): 5 tasks of 2 digits,
  (0,1) (2,3) (4,5) (6,7) (8,9), in any of the three scenarios.
- Permuted MNIST (Goodfellow et al. 2013; Kirkpatrick et al. 2017): every task is all
  10 digits under its own fixed random pixel permutation, drawn from the run seed.
- Rotated MNIST (Lopez-Paz & Ranzato 2017): every task is all 10 digits rotated by its
  own angle; task t uses `t * max_angle / num_tasks` degrees.

The two domain streams are domain-IL by default (one 10-way head shared by all tasks).
With `scenario=class_il` or `task_il` each task gets its own 10 labels (10t..10t+9),
the "three scenarios" protocol of van de Ven & Tolias (2019).
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from cl_bench import CLBenchError
from cl_bench.data.sources import check_labels, corrupt_file_error, data_root, load_or_explain, normalising_transform
from cl_bench.data.stream import (
    SCENARIOS,
    Split,
    Stream,
    Task,
    cap_per_class,
    class_incremental_stream,
    resolve_class_order,
)

NAME_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
WHAT = (
    "the four MNIST files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
    "and t10k-labels-idx1-ubyte (or the same names with .gz, as published at yann.lecun.com/exdb/mnist)"
)


def _unpack_gz(dataset: str, raw: Path) -> None:
    """Unpack hand-placed `*.gz` IDX files next to themselves (torchvision reads the plain files)."""
    for names in NAME_FILES.values():
        for name in names:
            plain, packed = raw / name, raw / f"{name}.gz"
            if plain.is_file() or not packed.is_file():
                continue
            tmp = plain.with_suffix(".part")
            try:
                with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as exc:
                tmp.unlink(missing_ok=True)
                raise corrupt_file_error(dataset, packed, f"cannot be unpacked: {exc}") from None
            tmp.replace(plain)


def _check_idx(dataset: str, path: Path, ndim: int) -> None:
    """An IDX file's size must equal its header's 4 + 4*ndim bytes plus one byte per element."""
    if not path.is_file():
        return  # reported as missing by the loader
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim or header[:3] != b"\x00\x00\x08" or header[3] != ndim:
        raise corrupt_file_error(dataset, path, f"not a {ndim}-d uint8 IDX file")
    dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if size != expected:
        raise corrupt_file_error(dataset, path, f"{size} bytes, the header {dims} needs {expected}")


def load_mnist(dataset: str, root: Optional[str], download: bool) -> tuple[Split, Split]:
    """MNIST train and test sets as uint8 (N, 1, 28, 28) images and labels."""
    from torchvision.datasets import MNIST

    base = data_root(root)
    raw = base / "MNIST" / "raw"
    _unpack_gz(dataset, raw)
    splits = []
    for train in (True, False):
        images, labels = (raw / n for n in NAME_FILES[train])
        _check_idx(dataset, images, 3)
        _check_idx(dataset, labels, 1)
        ds = load_or_explain(
            dataset, [images, labels], raw, WHAT, lambda: MNIST(str(base), train=train, download=download), download
        )
        # a download just happened: check what it wrote too
        _check_idx(dataset, images, 3)
        _check_idx(dataset, labels, 1)
        if len(ds.data) != len(ds.targets):
            raise corrupt_file_error(dataset, labels, f"{len(ds.targets)} labels for {len(ds.data)} images")
        split = Split(ds.data.unsqueeze(1).contiguous(), ds.targets.long())
        check_labels(dataset, split, 10, labels)
        splits.append(split)
    return splits[0], splits[1]


def split_mnist(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 5,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    root: Optional[str] = None,
    download: bool = True,
    first_task_classes: Optional[int] = None,
) -> Stream:
    """5 tasks x 2 classes by default: (0,1) (2,3) (4,5) (6,7) (8,9)."""
    train, test = load_mnist("split_mnist", root, download)
    return class_incremental_stream(
        "split_mnist", train, test, scenario, seed, num_tasks, class_order, val_fraction, max_train_per_class,
        first_task_classes=first_task_classes,
    )


split_mnist.num_classes = 10  # known before loading: preflight checks dataset.num_tasks / first_task_classes


def domain_stream(
    name: str,
    train: Split,
    test: Split,
    task_views: list[Callable[[torch.Tensor], torch.Tensor]],
    scenario: str,
    seed: int,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
) -> Stream:
    """One task per input transformation, each over all classes of `train`/`test`.

    `task_views[t]` maps uint8 images to task t's version of them. Domain-IL shares one
    head over the classes; class-IL and task-IL give task t the labels
    `t*k .. t*k+k-1` (k classes), so the head has k*T outputs.
    """
    if scenario not in SCENARIOS:
        raise CLBenchError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise CLBenchError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
    train = cap_per_class(train, max_train_per_class)
    k = int(max(train.y.max(), test.y.max())) + 1
    order = resolve_class_order(class_order, k, seed)
    to_output = torch.empty(k, dtype=torch.long)
    to_output[torch.tensor(order)] = torch.arange(k)  # output unit i stands for class order[i]
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for t, view in enumerate(task_views):
        offset = 0 if scenario == "domain_il" else t * k
        outputs = list(range(offset, offset + k))
        task_train = Split(view(train.x), to_output[train.y] + offset)
        task_test = Split(view(test.x), to_output[test.y] + offset)
        task_val = None
        if val_fraction > 0:
            perm = torch.randperm(len(task_train), generator=gen)
            n_val = max(1, int(round(val_fraction * len(task_train))))
            task_val, task_train = task_train.subset(perm[:n_val]), task_train.subset(perm[n_val:])
        tasks.append(Task(t, outputs, outputs, task_train, task_test, task_val))
    transform = normalising_transform(train.x)
    num_outputs = k if scenario == "domain_il" else k * len(tasks)
    return Stream(
        name=name,
        tasks=tasks,
        scenario=scenario,
        num_classes=num_outputs,
        num_outputs=num_outputs,
        input_shape=tuple(train.x.shape[1:]),
        transform=transform,
        class_order=order,
    )


def _check_num_tasks(num_tasks: int) -> None:
    if num_tasks < 1:
        raise CLBenchError(f"dataset.num_tasks must be at least 1, got {num_tasks}")


def permuted_mnist(
    scenario: str = "domain_il",
    seed: int = 0,
    num_tasks: int = 10,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    root: Optional[str] = None,
    download: bool = True,
    permute_first_task: bool = True,
) -> Stream:
    """`num_tasks` fixed random pixel permutations of MNIST (seeded by the run seed)."""
    _check_num_tasks(num_tasks)
    train, test = load_mnist("permuted_mnist", root, download)
    gen = torch.Generator().manual_seed(seed)
    n_pixels = train.x[0].numel()
    perms = [torch.randperm(n_pixels, generator=gen) for _ in range(num_tasks)]
    if not permute_first_task:
        perms[0] = torch.arange(n_pixels)

    def view(perm: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: x.flatten(1)[:, perm].view_as(x)

    return domain_stream(
        "permuted_mnist", train, test, [view(p) for p in perms], scenario, seed,
        class_order, val_fraction, max_train_per_class,
    )


def rotated_mnist(
    scenario: str = "domain_il",
    seed: int = 0,
    num_tasks: int = 10,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    root: Optional[str] = None,
    download: bool = True,
    max_angle: float = 180.0,
) -> Stream:
    """Task t: MNIST rotated by `t * max_angle / num_tasks` degrees (bilinear, zero fill)."""
    from torchvision.transforms.v2.functional import InterpolationMode, rotate

    _check_num_tasks(num_tasks)
    train, test = load_mnist("rotated_mnist", root, download)
    angles = [t * max_angle / num_tasks for t in range(num_tasks)]

    def view(angle: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: rotate(x, angle, interpolation=InterpolationMode.BILINEAR) if angle else x.clone()

    return domain_stream(
        "rotated_mnist", train, test, [view(a) for a in angles], scenario, seed,
        class_order, val_fraction, max_train_per_class,
    )
