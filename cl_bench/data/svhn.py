"""Split SVHN (Netzer et al. 2011): street-view house-number digits, 5 tasks x 2 classes.

Data: the cropped-digit "format 2" files `train_32x32.mat`, `test_32x32.mat` (and,
with `dataset.use_extra=true`, the 531,131-image `extra_32x32.mat`, added to the
training set) read by torchvision's `SVHN` from `<root>/svhn/`, downloaded there when
missing and `dataset.download` is true. Label 10 of the files is digit 0. With
`dataset.verify` (default) each file must carry the official MD5; `verify=false`
skips the checksums and still fails loudly on a file scipy cannot read.

Augmentation: random 32x32 crops of a 4-pixel zero-padded image. No horizontal flip
by default: a mirrored digit is not the same digit (2 and 5 swap shapes), so
`dataset.augment=crop`; `crop_flip` gives the CIFAR recipe.
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
    """torchvision's SVHN with its MD5 check replaced by a presence check."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))

    return type("UnverifiedSVHN", (cls,), {"_check_integrity": _check_integrity})


def load_svhn(dataset: str, root: Optional[str], download: bool, verify: bool, use_extra: bool) -> tuple[Split, Split]:
    from torchvision.datasets import SVHN

    cls = SVHN if verify else _unverified(SVHN)
    folder = data_root(root) / "svhn"
    names = ["train", "test"] + (["extra"] if use_extra else [])
    loaded = {}
    for name in names:
        path = folder / cls.split_list[name][1]
        what = f"{path.name} from http://ufldl.stanford.edu/housenumbers/ (cropped digits, format 2)"
        ds = load_or_explain(
            dataset, [path], folder, what, lambda: cls(str(folder), split=name, download=download), download
        )
        split = image_split(ds.data, ds.labels)
        check_labels(dataset, split, 10, path)
        loaded[name] = split
    train = Split.cat([loaded["train"], loaded["extra"]]) if use_extra else loaded["train"]
    return train, loaded["test"]


def split_svhn(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 5,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    root: Optional[str] = None,
    download: bool = True,
    verify: bool = True,
    use_extra: bool = False,
    augment: str = "crop",
    first_task_classes: Optional[int] = None,
) -> Stream:
    """5 tasks x 2 classes by default: digits (0,1) (2,3) (4,5) (6,7) (8,9)."""
    train, test = load_svhn("split_svhn", root, download, verify, use_extra)
    stream = class_incremental_stream(
        "split_svhn", train, test, scenario, seed, num_tasks, class_order, val_fraction, max_train_per_class,
        transform=normalising_transform(train.x), first_task_classes=first_task_classes,
    )
    return with_augmentation(stream, augment, padding=4)


split_svhn.num_classes = 10  # known before loading: preflight checks dataset.num_tasks / first_task_classes
