"""Stanford Cars (Krause et al., "3D Object Representations for Fine-Grained Categorization", 3dRR
2013): 196 car models split into class-incremental tasks, decoded once into a memory-mapped cache.

Data: the files as `torchvision.datasets.StanfordCars` reads them, under `dataset.root`:
`stanford_cars/cars_train/*.jpg` and `cars_test/*.jpg` (the images of `cars_train.tgz` and
`cars_test.tgz`), `stanford_cars/devkit/` (`car_devkit.tgz`: `cars_meta.mat`,
`cars_train_annos.mat`) and `stanford_cars/cars_test_annos_withlabels.mat`. The split is the
official one (8,144 train / 8,041 test images) in the annotation files' order; classes 1..196
become labels 0..195. torchvision's own loader reads the file names and labels (it subtracts
the 1); scipy reads the bounding boxes, which torchvision drops.

No download: the dataset's site (https://ai.stanford.edu/~jkrause/cars/car_dataset.html) no
longer serves the files, and torchvision's `StanfordCars.download` only raises (torchvision
0.29: "The original URL is broken..."). `dataset.download` changes nothing (it is kept so that every dataset takes it).

`crop_boxes=true` crops each image to its bounding box (`bbox_x1..bbox_y2` of the annotation
structs, MATLAB's 1-based inclusive pixel coordinates, so x1 - 1 .. x2 in 0-based exclusive
ones) before resizing: the `stanford_cars_cropped` variant that PackNet and Piggyback train
and test on (`src/scripts/run_piggyback_training.sh` in arunmallya/piggyback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from cl_bench.data.image_lists import FileSplit, StreamOptions, image_list_stream, require_files
from cl_bench.data.sources import corrupt_file_error, data_root, short_reason
from cl_bench.data.stream import Stream

NAME = "stanford_cars"
FOLDER = "stanford_cars"
NUM_CLASSES = 196
ANNOTATIONS = {"train": "devkit/cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"}
IMAGES = {"train": "cars_train", "test": "cars_test"}
REQUIRED = [f"{FOLDER}/devkit/cars_meta.mat", *(f"{FOLDER}/{p}" for p in (*ANNOTATIONS.values(), *IMAGES.values()))]
WHAT = (
    "cars_train.tgz, cars_test.tgz and car_devkit.tgz unpacked into stanford_cars/, plus "
    "cars_test_annos_withlabels.mat, as torchvision.datasets.StanfordCars reads them"
)
NO_DOWNLOAD = "the official site no longer serves the files and torchvision's StanfordCars does not download them"


def read_boxes(path: Path, files: list[Path]) -> list[tuple[float, float, float, float]]:
    """The bounding box of each of `files` (annotation order) from an annotation .mat file."""
    from scipy.io import loadmat

    try:
        annotations = loadmat(path, squeeze_me=True)["annotations"]
        rows = [(str(a["fname"]), [float(a[f"bbox_{k}"]) for k in ("x1", "y1", "x2", "y2")]) for a in annotations]
    except Exception as exc:  # scipy's ValueError / MatReadError, a missing field (KeyError, ValueError)
        raise corrupt_file_error(NAME, path, short_reason(exc)) from None
    if [name for name, _ in rows] != [f.name for f in files]:
        raise corrupt_file_error(NAME, path, "its file names differ from those torchvision read from it")
    return [(x1 - 1, y1 - 1, x2, y2) for _, (x1, y1, x2, y2) in rows]


def _readable(path: Path) -> bool:
    from scipy.io import loadmat

    try:
        loadmat(path)
        return True
    except Exception:
        return False


def read_split(root: Path, split: str, crop_boxes: bool) -> FileSplit:
    """The official `split` as torchvision's StanfordCars lists it (and the boxes with `crop_boxes`)."""
    from torchvision.datasets import StanfordCars

    folder = root / FOLDER
    mats = [folder / ANNOTATIONS[split], folder / "devkit" / "cars_meta.mat"]
    try:  # every file is there (stanford_cars checked): a failure is a damaged file
        dataset = StanfordCars(str(root), split=split)
    except Exception as exc:  # scipy's ValueError / MatReadError, a missing struct field...
        bad = [m for m in mats if not _readable(m)] or mats  # the file scipy cannot read, else both
        raise corrupt_file_error(NAME, ", ".join(map(str, bad)), short_reason(exc)) from None
    # torchvision keeps (image path, 0-based class) in `_samples` (torchvision >= 0.12, unchanged since)
    paths = [Path(p) for p, _ in dataset._samples]
    labels = [int(y) for _, y in dataset._samples]
    boxes = read_boxes(folder / ANNOTATIONS[split], paths) if crop_boxes else None
    # the .mat files count classes from 1 (torchvision subtracted it)
    return FileSplit(paths, labels, boxes, listed_in=folder / ANNOTATIONS[split], label_base=1)


def stanford_cars(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 4,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
    root: Optional[str] = None,
    download: bool = False,
    image_size: int = 224,
    cache_dir: Optional[str] = None,
    augment: str = "crop_flip",
    normalise: str = "imagenet",
    crop_boxes: bool = False,
) -> Stream:
    """Stanford Cars in `num_tasks` tasks (4 x 49 classes by default), the official split."""
    options = StreamOptions.of(locals())
    folder = data_root(root)
    require_files(NAME, folder, REQUIRED, WHAT, NO_DOWNLOAD)
    splits = {split: read_split(folder, split, crop_boxes) for split in ("train", "test")}
    return image_list_stream(NAME, splits, NUM_CLASSES, folder, options)


stanford_cars.num_classes = NUM_CLASSES  # known before loading: preflight checks dataset.num_tasks / first_task_classes
