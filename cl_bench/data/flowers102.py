"""Oxford Flowers-102 (Nilsback and Zisserman, "Automated Flower Classification over a Large Number
of Classes", ICVGIP 2008): 102 flower species split into class-incremental tasks, decoded once into
a memory-mapped cache.

Data: the layout of `torchvision.datasets.Flowers102`, under `dataset.root`:
`flowers-102/jpg/image_XXXXX.jpg` (the 8,189 images of `102flowers.tgz`),
`flowers-102/imagelabels.mat` (`labels`: the class 1..102 of image id 1..8,189, made 0..101 here)
and `flowers-102/setid.mat` (`trnid`, `valid`, `tstid`: the image ids of the official train,
validation and test sets, 1,020 / 1,020 / 6,149 images). Downloaded there by torchvision from
https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ when missing and `dataset.download` is true;
with `dataset.verify` (default) the two .mat files must carry the MD5 that torchvision lists for
the official release.

`train_split`: `train+val` (default) trains on `trnid` followed by `valid` (2,040 images, 20 per
class), `train` on `trnid` alone (1,020); the test set is always `tstid`. Piggyback's and PackNet's
code (arunmallya/piggyback, arunmallya/packnet) only read prepared `data/flowers/train` and
`data/flowers/test` folders, so their split is stated by the papers' dataset tables, which list
Flowers with 2,040 training and 6,149 evaluation images: train+val (from the papers as recalled;
the prepared folders themselves sit in a Box archive that cannot be checked offline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from cl_bench.data.image_lists import FileSplit, StreamOptions, check_choice, image_list_stream, require_files
from cl_bench.data.sources import corrupt_file_error, data_root, short_reason
from cl_bench.data.stream import Stream

NAME = "flowers102"
FOLDER = "flowers-102"
NUM_CLASSES = 102
TRAIN_SPLITS = {"train": ("trnid",), "train+val": ("trnid", "valid")}
REQUIRED = [f"{FOLDER}/imagelabels.mat", f"{FOLDER}/setid.mat", f"{FOLDER}/jpg"]
WHAT = (
    "102flowers.tgz unpacked as flowers-102/jpg/, and the two .mat files, from "
    "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
)


def fetch(root: Path) -> str:
    """torchvision's download of the images and both .mat files into `root/flowers-102`; '' or the reason."""
    try:
        from torchvision.datasets import Flowers102

        Flowers102(str(root), split="test", download=True)
        return ""
    except Exception as exc:  # URLError, a checksum mismatch, a damaged archive...
        return short_reason(exc)


def load_mat(path: Path, keys: tuple[str, ...]) -> dict[str, list[int]]:
    from scipy.io import loadmat

    try:
        data = loadmat(path, squeeze_me=True)
        return {k: [int(v) for v in data[k].ravel()] for k in keys}
    except Exception as exc:  # scipy's ValueError / MatReadError, a missing key
        raise corrupt_file_error(NAME, path, short_reason(exc)) from None


def read_splits(root: Path, train_split: str, download: bool, verify: bool) -> dict[str, FileSplit]:
    """The train (`train_split`) and test file lists in setid.mat's order."""
    from torchvision.datasets import Flowers102
    from torchvision.datasets.utils import check_integrity

    if download and any(not (root / n).exists() for n in REQUIRED):
        require_files(NAME, root, REQUIRED, WHAT, fetch(root))
    require_files(NAME, root, REQUIRED, f"{WHAT}, or run with dataset.download=true", "dataset.download=false")
    folder = root / FOLDER
    if verify:
        for key in ("label", "setid"):
            filename, md5 = Flowers102._file_dict[key]
            if not check_integrity(str(folder / filename), md5):
                raise corrupt_file_error(NAME, folder / filename, "its MD5 is not the official file's; "
                                         "dataset.verify=false skips the check")
    labels = load_mat(folder / "imagelabels.mat", ("labels",))["labels"]
    ids = load_mat(folder / "setid.mat", ("trnid", "valid", "tstid"))

    def split_of(keys: tuple[str, ...]) -> FileSplit:
        chosen = [i for k in keys for i in ids[k]]
        bad = [i for i in chosen if not 1 <= i <= len(labels)]
        if bad:
            raise corrupt_file_error(NAME, folder / "setid.mat", f"image id {bad[0]} has no label in imagelabels.mat "
                                     f"({len(labels)} labels)")
        return FileSplit([folder / "jpg" / f"image_{i:05d}.jpg" for i in chosen], [labels[i - 1] - 1 for i in chosen],
                         listed_in=folder / "setid.mat", labels_from=folder / "imagelabels.mat", label_base=1)

    return {"train": split_of(TRAIN_SPLITS[train_split]), "test": split_of(("tstid",))}


def flowers102(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 6,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
    root: Optional[str] = None,
    download: bool = True,
    verify: bool = True,
    image_size: int = 224,
    cache_dir: Optional[str] = None,
    augment: str = "crop_flip",
    normalise: str = "imagenet",
    train_split: str = "train+val",
) -> Stream:
    """Flowers-102 in `num_tasks` tasks (6 x 17 classes by default), trained on `train_split`, tested on tstid."""
    options = StreamOptions.of(locals())
    check_choice("train_split", train_split, list(TRAIN_SPLITS))
    folder = data_root(root)
    return image_list_stream(NAME, read_splits(folder, train_split, download, verify), NUM_CLASSES, folder, options)


flowers102.num_classes = NUM_CLASSES  # known before loading: preflight checks dataset.num_tasks / first_task_classes
