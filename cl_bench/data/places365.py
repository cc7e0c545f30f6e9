"""Places365-Standard (Zhou et al., "Places: a 10 million image database for scene recognition",
TPAMI 2017): 365 scene categories, 1,803,460 training images (3,068 to 5,000 per class) and the
official validation set of 100 images per class as the test set. It is the second "old task" of
Learning without Forgetting (Li & Hoiem 2016); Piggyback's scripts train on it as well
(`places`, 365 outputs, in github.com/arunmallya/piggyback).

Data, in either of two layouts under `dataset.root`:

- torchvision's `Places365` (`small=True`: the 256 x 256 images): `categories_places365.txt`
  (lines `/a/airfield 0`), `places365_train_standard.txt` (lines `/a/airfield/00000001.jpg 0`),
  `places365_val.txt` (lines `Places365_val_00000001.jpg 165`), the images in
  `data_256_standard/` (the name torchvision gives the folder after downloading; `data_256/`,
  the official `train_256_places365standard.tar` unpacked by hand, works too) and `val_256/`;
  with `dataset.small=false` the high-resolution `data_large_standard/` (or `data_large/`) and
  `val_large/`. The file lists are read by torchvision's loader; with `dataset.download=true`
  it fetches what is missing from data.csail.mit.edu (the small training archive alone is
  about 24 GB, hence off by default). With `dataset.verify` (default) the list files must carry
  the official MD5; `verify=false` only checks that they are there. Labels are the indices of
  `categories_places365.txt` (alphabetical).
- The "easy format" the Places2 site offers for PyTorch (`places365standard_easyformat.tar`,
  the layout Piggyback's scripts read as `data/places/{train,val}`): ImageFolder trees
  `train/<class>/*.jpg` and `val/<class>/*.jpg`, classes in sorted folder-name order. Used when
  the list files of the first layout are absent and `train/` exists.

1.8 million images do not fit one machine's cache at 224 px (about 270 GB), so
`max_train_per_class` (the config's default: 100) keeps the first images of each class in the
official list's order before anything is decoded; the 36,500 test images are always all used.
Images are decoded once (shorter side to `image_size`, centre square) into the memory-mapped
cache of `cl_bench.data.images`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from cl_bench.data.image_lists import FileSplit, StreamOptions, dataset_folder, image_list_stream, image_trees
from cl_bench.data.sources import load_or_explain
from cl_bench.data.stream import Stream

LIST_FILES = {"train": "places365_train_standard.txt", "test": "places365_val.txt"}
SPLITS = {"train": "train-standard", "test": "val"}
CATEGORIES = "categories_places365.txt"
WHAT = (
    f"{CATEGORIES}, {LIST_FILES['train']}, {LIST_FILES['test']} (filelist_places365-standard.tar) and the images "
    "in data_256/ and val_256/ (train_256_places365standard.tar, val_256.tar) from "
    "http://places2.csail.mit.edu/download.html, or the easy-format train/<class>/ and val/<class>/ trees"
)


def image_dirs(root: Path, split: str, small: bool) -> list[Path]:
    """Where the images of `split` may be: torchvision's folder name first, then the archive's own."""
    size = "256" if small else "large"
    if split.startswith("train"):
        return [root / f"data_{size}_standard", root / f"data_{size}"]
    return [root / f"{split}_{size}"]


def _places_class(verify: bool):
    """torchvision's Places365 that never re-downloads images already unpacked under either
    folder name, and (with `verify=false`) checks that the list files exist instead of their MD5."""
    from torchvision.datasets import Places365

    class _Places(Places365):
        def download_images(self) -> None:
            if any(d.is_dir() for d in image_dirs(Path(self.root), self.split, self.small)):
                return
            super().download_images()

        if not verify:

            def _check_integrity(self, file: str, md5: str, download: bool) -> bool:
                if os.path.isfile(file):
                    return True
                if not download:
                    raise RuntimeError(f"The file {file} does not exist")
                return False

    return _Places


def torchvision_lists(
    root: Path, small: bool, download: bool, verify: bool, max_train_per_class: Optional[int]
) -> tuple[int, dict[str, FileSplit]]:
    """(number of classes, {"train", "test": files}) from the official lists via torchvision; the training
    list capped to `max_train_per_class` images per class before its 1.8 million paths are remapped."""
    cls = _places_class(verify)
    splits = {}
    num_classes = 0
    for part, split in SPLITS.items():
        files = [root / CATEGORIES, root / LIST_FILES[part]]
        ds = load_or_explain(
            "places365", files, root, WHAT,
            lambda: cls(str(root), split=split, small=small, download=download), download,
        )
        num_classes = len(ds.classes)
        listed = FileSplit([p for p, _ in ds.imgs], list(ds.targets), listed_in=root / LIST_FILES[part])
        if part == "train":
            listed = listed.first_per_class(max_train_per_class)
        # torchvision joins each listed name to its own folder name; use the folder that is there
        there = next((d for d in image_dirs(root, split, small) if d.is_dir()), None)
        expected = Path(ds.images_dir)
        if there is not None and there != expected:
            listed.paths = [there / Path(p).relative_to(expected) for p in listed.paths]
        splits[part] = listed
    return num_classes, splits


def places365(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 5,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
    root: Optional[str] = None,
    image_size: int = 224,
    cache_dir: Optional[str] = None,
    augment: str = "crop_flip",
    normalise: str = "imagenet",
    download: bool = False,
    verify: bool = True,
    small: bool = True,
) -> Stream:
    """The 365 classes in `num_tasks` tasks (5 x 73 by default); the official val set is the test set."""
    options = StreamOptions.of(locals())
    folder = dataset_folder(root, "places365")
    if (folder / "train").is_dir() and not (folder / LIST_FILES["train"]).is_file():  # the easy format
        classes, splits = image_trees("places365", folder, WHAT, test="val")
        num_classes = len(classes)
    else:
        num_classes, splits = torchvision_lists(folder, small, download, verify, max_train_per_class)
    return image_list_stream("places365", splits, num_classes, folder, options, WHAT)


places365.num_classes = 365
