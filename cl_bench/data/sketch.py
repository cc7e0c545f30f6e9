"""Sketch classification as in Piggyback and PackNet (Mallya et al. 2018): the TU-Berlin sketches
of Eitz, Hays & Alexa, "How do humans sketch objects?" (SIGGRAPH 2012), 250 object classes of
80 sketches each, 16,000 for training and 4,000 for testing (Piggyback, Table 1).

Data, in either of two layouts under `dataset.root`:

- Piggyback's copy (linked "in PyTorch format" from github.com/arunmallya/piggyback, the
  `sketches` dataset of its scripts): ImageFolder trees `train/<class>/*` and
  `test/<class>/*` with the authors' train/test assignment. Classes are the folder names in
  sorted order (ImageFolder's labels).
- TU-Berlin's own download, `sketches_png.zip` from
  cybertron.cg.tu-berlin.de/eitz/projects/classifysketch/, unpacked: `png/<class>/<n>.png`
  (1111 x 1111 line drawings) with `png/filelist.txt` (lines `airplane/1.png`; class names
  may contain spaces, e.g. `alarm clock`). The split is read from `dataset.train_list` and
  `dataset.test_list` when given (paths relative to `png/`, optional label after a comma or
  space, as in `read_image_list`); without them, the first `train_per_class` sketches of
  each class in `filelist.txt` order train and the rest test (64/16: Piggyback's 16,000/4,000
  proportions; its exact assignment is only in its own copy, so numbers on this split are
  not the paper's). Without `filelist.txt` the class folders are listed, files in numeric
  order. Classes are sorted by name, as ImageFolder would.

The first layout found wins (`train/`, then `png/`). Images are decoded once (shorter side
to `image_size`, centre square) into the cache of `cl_bench.data.images`; the black-on-white
drawings are kept as RGB so an ImageNet-pretrained backbone applies unchanged.
`max_train_per_class` keeps the first files of each class before anything is decoded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from cl_bench import CLBenchError
from cl_bench.data import images
from cl_bench.data.image_lists import (
    FileSplit,
    StreamOptions,
    dataset_folder,
    image_list_stream,
    labelled_lists,
    read_image_list,
    tree_or_lists,
)
from cl_bench.data.sources import missing_files_error
from cl_bench.data.stream import Stream

WHAT = (
    "either Piggyback's sketches archive (train/<class>/ and test/<class>/, linked from "
    "github.com/arunmallya/piggyback) or TU-Berlin's sketches_png.zip unpacked (png/<class>/<n>.png and "
    "png/filelist.txt)"
)


def tu_berlin_entries(folder: Path) -> tuple[Path, list[tuple[str, None]]]:
    """(source, [(class/<n>.png, None)]) from `filelist.txt`, else from the class folders
    (files in numeric order, as the archive numbers them)."""
    filelist = folder / "filelist.txt"
    if filelist.is_file():
        return filelist, [(name, None) for name, _ in read_image_list("sketch", filelist)]
    entries = []
    for name in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
        files = images.list_image_files(folder / name)
        files.sort(key=lambda f: (not Path(f).stem.isdigit(), int(Path(f).stem) if Path(f).stem.isdigit() else 0, f))
        entries += [(f"{name}/{f}", None) for f in files]
    if not entries:
        raise missing_files_error("sketch", folder, f"filelist.txt and <class>/<n>.png ({WHAT})")
    return folder, entries


def tu_berlin_split(folder: Path, train_per_class: int) -> tuple[list[str], dict[str, FileSplit]]:
    """TU-Berlin's files in `filelist.txt` order: the first `train_per_class` of each class train, the rest test."""
    source, entries = tu_berlin_entries(folder)
    classes, listed = labelled_lists("sketch", {"all": (source, entries)}, folder)
    seen: dict[int, int] = {}
    split = {k: FileSplit([], [], listed_in=source) for k in ("train", "test")}
    for path, label in zip(listed["all"].paths, listed["all"].labels):
        seen[label] = seen.get(label, 0) + 1
        target = split["train" if seen[label] <= train_per_class else "test"]
        target.paths.append(path)
        target.labels.append(label)
    short = [classes[c] for c, n in seen.items() if n <= train_per_class]
    if short:
        raise CLBenchError(
            f"dataset=sketch: dataset.train_per_class={train_per_class} leaves class {short[0]!r} of {source} "
            "no sketch for testing (TU-Berlin has 80 per class; Piggyback's proportions: 64)"
        )
    return classes, split


def sketch(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 10,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
    root: Optional[str] = None,
    image_size: int = 224,
    cache_dir: Optional[str] = None,
    augment: str = "crop_flip",
    normalise: str = "imagenet",
    train_list: Optional[str] = None,
    test_list: Optional[str] = None,
    train_per_class: int = 64,
) -> Stream:
    """The 250 classes in `num_tasks` tasks (10 x 25 by default)."""
    options = StreamOptions.of(locals())
    if train_per_class < 1:
        raise CLBenchError(f"dataset.train_per_class must be at least 1, got {train_per_class}")
    folder = dataset_folder(root, "sketches")
    png = folder / "png"
    if (folder / "train").is_dir() or not png.is_dir():
        classes, splits = tree_or_lists("sketch", folder, train_list, test_list, WHAT)
    elif train_list is not None or test_list is not None:
        classes, splits = tree_or_lists("sketch", folder, train_list, test_list, WHAT, image_dir=png)
    else:
        classes, splits = tu_berlin_split(png, train_per_class)
    return image_list_stream("sketch", splits, len(classes), folder, options, WHAT)


sketch.num_classes = 250
