"""Split Digits: scikit-learn's bundled `load_digits` (1,797 real 8x8 handwritten digits).

Offline and small, so it is the default stream and the one the tests run on. The
train/test split is a fixed stratified 70/30 split (independent of the run seed);
pixel values 0..16 are stored as uint8 rescaled to 0..255.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from cl_bench.data.stream import Split, Stream, class_incremental_stream

SPLIT_SEED = 0


def stratified_split(images: np.ndarray, labels: np.ndarray, test_size: float = 0.3) -> tuple[Split, Split]:
    """A fixed stratified train/test split (seeded independently of the run seed)."""
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=SPLIT_SEED
    )
    as_split = lambda x, y: Split(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))  # noqa: E731
    return as_split(x_tr, y_tr), as_split(x_te, y_te)


def load_digits_arrays() -> tuple[Split, Split]:
    from cl_bench.data.sources import cached_splits

    def build() -> tuple[Split, Split]:
        from sklearn.datasets import load_digits

        data = load_digits()
        images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (N, 1, 8, 8)
        return stratified_split(images, data.target)

    return cached_splits("split_digits", ["scikit-learn"], build)


def split_digits(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 5,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
) -> Stream:
    """5 tasks x 2 classes by default: (0,1) (2,3) (4,5) (6,7) (8,9)."""
    train, test = load_digits_arrays()
    return class_incremental_stream(
        "split_digits", train, test, scenario, seed, num_tasks, class_order, val_fraction, max_train_per_class,
        first_task_classes=first_task_classes,
    )


split_digits.num_classes = 10  # known before loading: preflight checks dataset.num_tasks / first_task_classes
