"""Split CIFAR-10 and Split CIFAR-100 (Krizhevsky 2009).

Data: the "python version" batches read by torchvision's `CIFAR10`/`CIFAR100` from
`<root>/cifar-10-batches-py/` and `<root>/cifar-100-python/`, downloaded there when
missing and `dataset.download` is true. With `dataset.verify` (default) every batch
file must carry the MD5 of the official release, so a truncated or altered file stops
the run; `verify=false` skips the checksums (for locally built files in the same
format) and still fails loudly on a file that cannot be unpickled.

Protocols: Split CIFAR-10 as 5 tasks x 2 classes (Zenke et al. 2017; Lopez-Paz &
Ranzato 2017 used CIFAR-100 in 20 x 5), Split CIFAR-100 as 10 x 10 (iCaRL,
Rebuffi et al. 2017) or 20 x 5. Training batches get the usual random 32x32 crop of a
4-pixel zero-padded image and a horizontal flip (`dataset.augment`), on the device.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from cl_bench.data.sources import (
    check_labels,
    data_root,
    image_split,
    load_or_explain,
    normalising_transform,
    with_augmentation,
)
from cl_bench.data.stream import Split, Stream, class_incremental_stream


def _unverified(cls):
    """The torchvision class with its MD5 checks replaced by presence checks."""

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in self.train_list + self.test_list)

    return type(f"Unverified{cls.__name__}", (cls,), {"_check_integrity": _check_integrity, "_load_meta": lambda self: None})


def load_cifar(dataset: str, num_classes: int, root: Optional[str], download: bool, verify: bool) -> tuple[Split, Split]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if num_classes == 10 else CIFAR100
    if not verify:
        cls = _unverified(cls)
    base = data_root(root)
    folder = base / cls.base_folder
    files = [folder / f for f, _ in cls.train_list + cls.test_list]
    what = (
        f"the contents of {cls.filename} from https://www.cs.toronto.edu/~kriz/cifar.html "
        f"(the folder {cls.base_folder} with {', '.join(f.name for f in files)})"
    )
    splits = []
    for train in (True, False):
        ds = load_or_explain(
            dataset, files, base, what, lambda: cls(str(base), train=train, download=download), download
        )
        split = image_split(ds.data, ds.targets, channels_last=True)
        check_labels(dataset, split, num_classes, folder)
        splits.append(split)
    return splits[0], splits[1]


def _split_cifar(
    name: str, num_classes: int, scenario: str, seed: int, num_tasks: int, class_order: Any,
    val_fraction: float, max_train_per_class: Optional[int], root: Optional[str], download: bool,
    verify: bool, augment: str, first_task_classes: Optional[int] = None,
) -> Stream:
    train, test = load_cifar(name, num_classes, root, download, verify)
    stream = class_incremental_stream(
        name, train, test, scenario, seed, num_tasks, class_order, val_fraction, max_train_per_class,
        transform=normalising_transform(train.x), first_task_classes=first_task_classes,
    )
    return with_augmentation(stream, augment, padding=4)


def split_cifar10(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 5,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    root: Optional[str] = None,
    download: bool = True,
    verify: bool = True,
    augment: str = "crop_flip",
    first_task_classes: Optional[int] = None,
) -> Stream:
    """5 tasks x 2 classes by default: (airplane, automobile) (bird, cat) ... (ship, truck)."""
    return _split_cifar(
        "split_cifar10", 10, scenario, seed, num_tasks, class_order, val_fraction, max_train_per_class,
        root, download, verify, augment, first_task_classes,
    )


split_cifar10.num_classes = 10  # known before loading: preflight checks dataset.num_tasks / first_task_classes


def split_cifar100(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 10,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    root: Optional[str] = None,
    download: bool = True,
    verify: bool = True,
    augment: str = "crop_flip",
    first_task_classes: Optional[int] = None,
) -> Stream:
    """10 tasks x 10 classes by default (20 x 5 with num_tasks=20; LUCIR's and PODNet's
    "B50, 5 steps": num_tasks=6 first_task_classes=50 class_order=seed1993)."""
    return _split_cifar(
        "split_cifar100", 100, scenario, seed, num_tasks, class_order, val_fraction, max_train_per_class,
        root, download, verify, augment, first_task_classes,
    )


split_cifar100.num_classes = 100  # known before loading: preflight checks dataset.num_tasks / first_task_classes


def write_cifar10_batches(root, train: tuple, test: tuple):
    """Write CIFAR-10's "python version" files (`cifar-10-batches-py/`: five training
    batches, the test batch, batches.meta; pickled dicts with `data` (N, 3072) uint8 rows
    and `labels`) from (images (N, 3, 32, 32) uint8, labels) pairs, for benchmarks and tests
    on locally made data in the official layout (read it back with `dataset.verify=false`)."""
    import pickle
    from pathlib import Path

    import numpy as np

    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, record: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(record, f, protocol=2)

    rows = lambda x: np.ascontiguousarray(x, dtype=np.uint8).reshape(len(x), -1)  # noqa: E731
    x, y = train
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5)):
        dump(f"data_batch_{i + 1}", {"batch_label": f"training batch {i + 1} of 5", "data": rows(x[part]),
                                     "labels": np.asarray(y)[part].tolist()})
    dump("test_batch", {"batch_label": "testing batch 1 of 1", "data": rows(test[0]), "labels": np.asarray(test[1]).tolist()})
    dump("batches.meta", {"label_names": [f"class{c}" for c in range(10)], "num_vis": 3072})
    return folder
