"""ImageNet subsets (ILSVRC-2012) split into tasks, decoded once into a cached uint8 array.

Data: a user-supplied ImageNet folder in the standard layout, `<root>/train/<wnid>/*`
and `<root>/val/<wnid>/*` (the validation images sorted into one folder per class,
as torchvision's `ImageFolder` expects), JPEG or PNG. ImageNet cannot be downloaded
automatically (its licence needs a login), so `dataset.root` defaults to
`<data dir>/imagenet`.

The classes are a list of WordNet ids, one per line, in a file named by
`dataset.class_list`: a path, or a file shipped in `conf/dataset/imagenet_classes/`
(`imagenet100.txt`: the ImageNet-100 list of Tian et al., "Contrastive Multiview
Coding", 2019). The file's order is the natural class order; `dataset.class_order`
reorders it as for every stream.

Preparation: decoding and resizing ~130,000 JPEGs is the slow part, so it happens
once. Each image is decoded with Pillow, its shorter side resized to `image_size`
(antialiased) and the centre `image_size` x `image_size` square kept; all images go
into one uint8 array saved in `dataset.cache_dir` (default `<data dir>/cache`), named
by a hash of the class list, the image size and the ImageNet folder, so a changed list
or size builds a new cache and an unchanged one is reused without decoding anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cl_bench import CLBenchError
from cl_bench.data import images
from cl_bench.data.sources import (
    check_labels,
    corrupt_file_error,
    data_root,
    missing_files_error,
    normalising_transform,
    with_augmentation,
)
from cl_bench.data.stream import Split, Stream, class_incremental_stream

IMAGE_SUFFIXES = images.IMAGE_SUFFIXES
CACHE_VERSION = 1


def read_class_list(class_list: str) -> list[str]:
    """WordNet ids from a file path, or from a file shipped under conf/dataset/imagenet_classes/."""
    path = Path(class_list).expanduser()
    if not path.is_file():
        shipped = files("cl_bench.conf").joinpath("dataset", "imagenet_classes", class_list)
        if not shipped.is_file():
            shipped = files("cl_bench.conf").joinpath("dataset", class_list)
        if not shipped.is_file():
            raise CLBenchError(
                f"dataset.class_list={class_list!r} is neither a file nor one of the lists shipped in "
                "conf/dataset/imagenet_classes/"
            )
        text = shipped.read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    wnids = [ln.split()[0] for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(set(wnids)) != len(wnids):
        raise CLBenchError(f"dataset.class_list={class_list!r} lists a class twice")
    if not wnids:
        raise CLBenchError(f"dataset.class_list={class_list!r} is empty")
    return wnids


def list_images(folder: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, wnid in enumerate(wnids):
        class_dir = folder / wnid
        names = sorted(
            e.name for e in os.scandir(class_dir) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
        ) if class_dir.is_dir() else []
        if not names:
            raise missing_files_error(
                "imagenet_subset", folder, f"a folder {wnid}/ with the JPEG/PNG images of class {wnid} "
                "(the ILSVRC-2012 train/ and val/ folders, one subfolder per WordNet id)",
            )
        paths += [class_dir / n for n in names]
        labels += [label] * len(names)
    return paths, labels


def decode_image(path: Path, size: int) -> np.ndarray:
    """(3, size, size) uint8: shorter side resized to `size`, centre square kept."""
    return images.decode_image(path, size, "imagenet_subset")


def decode_all(paths: list[Path], size: int, description: str) -> np.ndarray:
    return images.decode_all(paths, size, description, decode=lambda i: decode_image(paths[i], size))


def cache_key(wnids: list[str], image_size: int, root: Path) -> str:
    ident = json.dumps({"v": CACHE_VERSION, "classes": wnids, "size": image_size, "root": str(root)})
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def prepare_subset(
    root: Path, wnids: list[str], image_size: int, cache_dir: Path
) -> tuple[Split, Split, Path]:
    """Train and val images of `wnids`, from the cache when it exists, else decoded into it."""
    from rich.console import Console

    console = Console(stderr=True)
    path = cache_dir / f"imagenet_subset-{len(wnids)}cls-{image_size}px-{cache_key(wnids, image_size, root)}.npz"
    if path.is_file():
        try:
            with np.load(path) as data:
                arrays = {k: data[k] for k in ("train_x", "train_y", "val_x", "val_y")}
        except Exception as exc:
            raise corrupt_file_error("imagenet_subset", path, f"unreadable cache: {exc}; delete it to rebuild") from None
        console.print(f"imagenet_subset: using the cached subset {path}")
    else:
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise missing_files_error(
                    "imagenet_subset", root, f"the ILSVRC-2012 images as {split}/<wnid>/*.JPEG "
                    "(train/ and val/, one subfolder per WordNet id)",
                )
        arrays = {}
        for split in ("train", "val"):
            paths, labels = list_images(root / split, wnids)
            arrays[f"{split}_x"] = decode_all(paths, image_size, f"decoding ImageNet {split} ({len(paths)} images)")
            arrays[f"{split}_y"] = np.asarray(labels, dtype=np.int64)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)
        size_mb = path.stat().st_size / 2**20
        console.print(
            f"imagenet_subset: cached {len(arrays['train_y'])} train + {len(arrays['val_y'])} val images "
            f"({len(wnids)} classes, {image_size}x{image_size}) in {path} ({size_mb:.1f} MiB); later runs reuse it"
        )
    as_split = lambda x, y: Split(torch.from_numpy(x), torch.from_numpy(y))  # noqa: E731
    return as_split(arrays["train_x"], arrays["train_y"]), as_split(arrays["val_x"], arrays["val_y"]), path


def imagenet_subset(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 10,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    root: Optional[str] = None,
    class_list: str = "imagenet100.txt",
    image_size: int = 32,
    cache_dir: Optional[str] = None,
    augment: str = "crop_flip",
    first_task_classes: Optional[int] = None,
) -> Stream:
    """The classes of `class_list` in `num_tasks` tasks; the ILSVRC val set is the test set."""
    if image_size < 8:
        raise CLBenchError(f"dataset.image_size must be at least 8, got {image_size}")
    base = data_root(None)
    folder = Path(root).expanduser().resolve() if root else base / "imagenet"
    cache = Path(cache_dir).expanduser().resolve() if cache_dir else base / "cache"
    wnids = read_class_list(class_list)
    train, test, path = prepare_subset(folder, wnids, image_size, cache)
    check_labels("imagenet_subset", train, len(wnids), path)
    check_labels("imagenet_subset", test, len(wnids), path)
    stream = class_incremental_stream(
        "imagenet_subset", train, test, scenario, seed, num_tasks, class_order, val_fraction, max_train_per_class,
        transform=normalising_transform(train.x), first_task_classes=first_task_classes,
    )
    return with_augmentation(stream, augment, padding=max(1, image_size // 8))
