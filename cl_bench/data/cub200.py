"""CUB-200-2011 (Wah et al., "The Caltech-UCSD Birds-200-2011 Dataset", CNS-TR-2011-001): 200 bird
species split into class-incremental tasks, decoded once into a memory-mapped cache.

Data: the official `CUB_200_2011.tgz` unpacked into `dataset.root`, as it unpacks:
`<root>/CUB_200_2011/images.txt` (`<image id> <class folder>/<file>.jpg`),
`image_class_labels.txt` (`<image id> <class id>`), `train_test_split.txt`
(`<image id> <1: train, 0: test>`), `bounding_boxes.txt` (`<image id> <x> <y> <width> <height>`,
pixels) and `images/<NNN.Class_Name>/<file>.jpg`; ids count from 1, classes 1..200 become labels
0..199. The split is the official one (5,994 train / 5,794 test images), the order within a split
that of `images.txt`.

Download (`dataset.download=true`): the archive from its CaltechDATA record
(https://data.caltech.edu/records/65de6-vp158, linked from
https://www.vision.caltech.edu/datasets/cub_200_2011/), checked against the MD5 that widely used
loaders carry for the same archive (TDeVries/cub2011_dataset's `cub2011.py`, which fetched it from an
earlier data.caltech.edu address; copies of that loader pair the MD5 with this record's URL), and
unpacked into `dataset.root` by torchvision's `download_and_extract_archive`. An archive already in
`dataset.root` (with that MD5) is only unpacked.

`crop_boxes=true` crops each image to its bounding box before resizing: the `cubs_cropped`
variant that PackNet and Piggyback (Mallya et al. 2018) train and test on
(`src/scripts/run_piggyback_training.sh` in arunmallya/piggyback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from cl_bench.data.image_lists import FileSplit, StreamOptions, image_list_stream, require_files
from cl_bench.data.images import read_lines
from cl_bench.data.sources import corrupt_file_error, data_root, short_reason
from cl_bench.data.stream import Stream

NAME = "cub200"
FOLDER = "CUB_200_2011"
URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
ARCHIVE = "CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
NUM_CLASSES = 200
LISTS = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
WHAT = f"unpack {ARCHIVE} from {URL} here"


def read_table(path: Path, columns: int) -> dict[int, list[str]]:
    """{image id: the other columns} of a CUB list file (`<id> <value> ...` per line)."""
    rows: dict[int, list[str]] = {}
    for ln in read_lines(path):
        parts = ln.split(maxsplit=columns - 1)
        if len(parts) != columns or not parts[0].isdigit():
            raise corrupt_file_error(NAME, path, f"line {ln[:60]!r} is not '<image id>' and {columns - 1} value(s)")
        rows[int(parts[0])] = parts[1:]
    return rows


def fetch(root: Path) -> str:
    """Download and unpack the official archive into `root`; '' on success, else the reason."""
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(URL, download_root=str(root), filename=ARCHIVE, md5=MD5)
        return ""
    except Exception as exc:  # URLError, a checksum mismatch, a damaged archive...
        return short_reason(exc)


def read_splits(root: Path, crop_boxes: bool, download: bool) -> dict[str, FileSplit]:
    """The official train and test file lists (and boxes) of the unpacked dataset under `root`."""
    names = [f"{FOLDER}/{n}" for n in (*LISTS, "images", *(("bounding_boxes.txt",) if crop_boxes else ()))]
    if download and any(not (root / n).exists() for n in names):
        require_files(NAME, root, names, WHAT, fetch(root))
    require_files(NAME, root, names, f"{WHAT}, or run with dataset.download=true", "dataset.download=false")
    folder = root / FOLDER
    files = read_table(folder / "images.txt", 2)
    tables = {"image_class_labels.txt": read_table(folder / "image_class_labels.txt", 2),
              "train_test_split.txt": read_table(folder / "train_test_split.txt", 2)}
    if crop_boxes:
        tables["bounding_boxes.txt"] = read_table(folder / "bounding_boxes.txt", 5)
    splits = {k: FileSplit([], [], [] if crop_boxes else None, listed_in=folder / "images.txt",
                           labels_from=folder / "image_class_labels.txt", label_base=1) for k in ("train", "test")}
    for image_id in sorted(files):
        for source, table in tables.items():
            if image_id not in table:
                raise corrupt_file_error(NAME, folder / source, f"it lacks image id {image_id} of images.txt")
        try:
            label = int(tables["image_class_labels.txt"][image_id][0]) - 1
            train = int(tables["train_test_split.txt"][image_id][0]) == 1
            box = [float(v) for v in tables["bounding_boxes.txt"][image_id]] if crop_boxes else None
        except ValueError as exc:
            raise corrupt_file_error(NAME, folder, f"image id {image_id}: {exc}") from None
        split = splits["train" if train else "test"]
        split.paths.append(folder / "images" / files[image_id][0])
        split.labels.append(label)
        if box is not None:
            x, y, w, h = box
            split.boxes.append((x, y, x + w, y + h))
    return splits


def cub200(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 10,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
    root: Optional[str] = None,
    download: bool = True,
    image_size: int = 224,
    cache_dir: Optional[str] = None,
    augment: str = "crop_flip",
    normalise: str = "imagenet",
    crop_boxes: bool = False,
) -> Stream:
    """CUB-200-2011 in `num_tasks` tasks (10 x 20 classes by default), the official split."""
    options = StreamOptions.of(locals())
    folder = data_root(root)
    return image_list_stream(NAME, read_splits(folder, crop_boxes, download), NUM_CLASSES, folder, options)


cub200.num_classes = NUM_CLASSES  # known before loading: preflight checks dataset.num_tasks / first_task_classes
