"""Writers of tiny fine-grained datasets in their real on-disk layouts, for running the real loaders offline.

- CUB-200-2011: `CUB_200_2011/` as `CUB_200_2011.tgz` unpacks: `images.txt`, `image_class_labels.txt`,
  `train_test_split.txt`, `classes.txt`, `bounding_boxes.txt` (1-based ids, `<x> <y> <w> <h>` boxes)
  and `images/<NNN.Class_Name>/<Name>_<NNNN>_<id>.jpg`.
- Stanford Cars: `stanford_cars/` as torchvision's StanfordCars reads it: `devkit/cars_meta.mat`
  (`class_names`, a 1x196 cell), `devkit/cars_train_annos.mat` and `cars_test_annos_withlabels.mat`
  (`annotations`, a 1xN struct with `bbox_x1 bbox_y1 bbox_x2 bbox_y2 class fname`), `cars_train/00001.jpg`...
- Flowers-102: `flowers-102/` as torchvision's Flowers102 reads it: `jpg/image_00001.jpg`...,
  `imagelabels.mat` (`labels`, 1xN) and `setid.mat` (`trnid`, `valid`, `tstid`, 1xK each).

Images are small non-square JPEGs (one grayscale per dataset, as the real sets hold a few), each a
class colour plus noise, so classes are learnable and every image differs. Each writer returns a
`Written`: what the loader should produce, in the official order, to compare against.

`prepare(dataset, folder)` writes one of the three and returns the command-line overrides that run
its config on the files (None for any other dataset).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

IMAGE_SIZE = 16  # the decode size the overrides ask for; the first image of each writer has this shorter side
ONE_THREAD = "device.num_threads=1"
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani"]
CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Acura TL Type-S 2008"]


@dataclass
class Written:
    """A tiny dataset on disk: `root` for dataset.root and, per split, (path, 0-based label, box) in the
    official order; boxes are (left, top, right, bottom), 0-based and exclusive."""

    root: Path
    train: list[tuple[Path, int, tuple[int, int, int, int]]] = field(default_factory=list)
    test: list[tuple[Path, int, tuple[int, int, int, int]]] = field(default_factory=list)
    annotation_files: list[Path] = field(default_factory=list)
    first_image: Optional[Path] = None  # the image written IMAGE_SIZE x (IMAGE_SIZE + 6): decoding only centre-crops it


def save_jpeg(path: Path, colour: np.ndarray, rng: np.random.Generator, height: int, width: int,
              grey: bool = False) -> None:
    from PIL import Image

    pixels = np.clip(colour + rng.normal(0, 18, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    (image.convert("L") if grey else image).save(path, quality=92)


def image_shape(index: int) -> tuple[int, int]:
    """(height, width): the first image IMAGE_SIZE x (IMAGE_SIZE + 6); then landscape and portrait ones."""
    if index == 0:
        return IMAGE_SIZE, IMAGE_SIZE + 6
    return (24, 30) if index % 2 else (30, 22)


def box_for(index: int) -> tuple[int, int, int, int]:
    """A box inside image `index` whose shorter side is IMAGE_SIZE (so no resize follows the crop)."""
    h, w = image_shape(index)
    left, top = (1, 0) if index == 0 else (3, 4)
    return (left, top, min(w, left + IMAGE_SIZE + 4), min(h, top + IMAGE_SIZE))


def write_cub(root: Path, num_classes: int = 4, per_class: int = 5, seed: int = 0) -> Written:
    """`<root>/CUB_200_2011/...`; ids class by class as in the real images.txt, every other image of a
    class (the 1st, 3rd, ...) marked for training."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "CUB_200_2011"
    out = Written(Path(root))
    lists = ("images", "image_class_labels", "train_test_split", "bounding_boxes")
    lines: dict[str, list[str]] = {n: [] for n in lists}
    image_id = 0
    for c, name in enumerate(CUB_CLASSES[:num_classes]):
        colour = rng.integers(30, 226, size=3)
        species = name.split(".", 1)[1]
        for i in range(per_class):
            image_id += 1
            relative = f"{name}/{species}_{i + 1:04d}_{79000 + image_id}.jpg"
            h, w = image_shape(image_id - 1)
            save_jpeg(folder / "images" / relative, colour, rng, h, w, grey=image_id == 3)
            out.first_image = out.first_image or folder / "images" / relative
            is_train = int(i % 2 == 0)
            left, top, right, bottom = box_for(image_id - 1)
            lines["images"].append(f"{image_id} {relative}")
            lines["image_class_labels"].append(f"{image_id} {c + 1}")
            lines["train_test_split"].append(f"{image_id} {is_train}")
            lines["bounding_boxes"].append(f"{image_id} {left:.1f} {top:.1f} {right - left:.1f} {bottom - top:.1f}")
            (out.train if is_train else out.test).append((folder / "images" / relative, c, box_for(image_id - 1)))
    for name, rows in lines.items():
        (folder / f"{name}.txt").write_text("\n".join(rows) + "\n")
        out.annotation_files.append(folder / f"{name}.txt")
    (folder / "classes.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(CUB_CLASSES[:num_classes])))
    return out


def _struct_array(records: list[dict]) -> np.ndarray:
    """A MATLAB 1xN struct array (what scipy.io.savemat writes for a structured object array)."""
    fields = list(records[0])
    array = np.empty((1, len(records)), dtype=[(f, object) for f in fields])
    for i, record in enumerate(records):
        array[0, i] = tuple(record[f] for f in fields)
    return array


def write_cars(root: Path, num_classes: int = 4, n_train: int = 3, n_test: int = 2, seed: int = 1) -> Written:
    """`<root>/stanford_cars/...`; classes interleaved in file order, as in the real annotations."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder = Path(root) / "stanford_cars"
    out = Written(Path(root))
    colours = rng.integers(30, 226, size=(num_classes, 3))
    index = 0
    for split, per_class, images, annos in (
        ("train", n_train, "cars_train", folder / "devkit" / "cars_train_annos.mat"),
        ("test", n_test, "cars_test", folder / "cars_test_annos_withlabels.mat"),
    ):
        classes = rng.permutation(np.repeat(np.arange(num_classes), per_class))
        records = []
        for k, c in enumerate(classes):
            fname = f"{k + 1:05d}.jpg"
            h, w = image_shape(index)
            save_jpeg(folder / images / fname, colours[c], rng, h, w, grey=index == 2)
            out.first_image = out.first_image or folder / images / fname
            left, top, right, bottom = box_for(index)
            index += 1
            records.append({
                "bbox_x1": np.array([[left + 1]], dtype=np.uint16), "bbox_y1": np.array([[top + 1]], dtype=np.uint16),
                "bbox_x2": np.array([[right]], dtype=np.uint16), "bbox_y2": np.array([[bottom]], dtype=np.uint16),
                "class": np.array([[c + 1]], dtype=np.uint8), "fname": np.array([fname]),
            })
            getattr(out, split).append((folder / images / fname, int(c), (left, top, right, bottom)))
        annos.parent.mkdir(parents=True, exist_ok=True)
        savemat(annos, {"annotations": _struct_array(records)})
        out.annotation_files.append(annos)
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [CAR_NAMES[i] if i < len(CAR_NAMES) else f"Car model {i + 1}" for i in range(196)]
    savemat(folder / "devkit" / "cars_meta.mat", {"class_names": names})
    out.annotation_files.append(folder / "devkit" / "cars_meta.mat")
    return out


def write_flowers(root: Path, num_classes: int = 4, n_trn: int = 2, n_val: int = 2, n_tst: int = 3,
                  seed: int = 2, train_split: str = "train+val") -> Written:
    """`<root>/flowers-102/...`; image ids shuffled over classes and splits, as in the real setid.mat."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder = Path(root) / "flowers-102"
    out = Written(Path(root))
    per_class = n_trn + n_val + n_tst
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))  # labels[id - 1]
    colours = rng.integers(30, 226, size=(num_classes, 3))
    for index, c in enumerate(labels):
        h, w = image_shape(index)
        save_jpeg(folder / "jpg" / f"image_{index + 1:05d}.jpg", colours[c], rng, h, w, grey=index == 2)
    out.first_image = folder / "jpg" / "image_00001.jpg"
    sets: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    seen = np.zeros(num_classes, dtype=int)
    for image_id, c in enumerate(labels, start=1):
        k = seen[c]
        seen[c] += 1
        sets["trnid" if k < n_trn else "valid" if k < n_trn + n_val else "tstid"].append(image_id)
    sets = {k: list(rng.permutation(v)) for k, v in sets.items()}
    savemat(folder / "imagelabels.mat", {"labels": (labels + 1).astype(np.uint8)[None, :]})
    savemat(folder / "setid.mat", {k: np.array(v, dtype=np.uint16)[None, :] for k, v in sets.items()})
    train_keys = ("trnid",) if train_split == "train" else ("trnid", "valid")
    for split, keys in (("train", train_keys), ("test", ("tstid",))):
        for key in keys:
            for image_id in sets[key]:
                path = folder / "jpg" / f"image_{image_id:05d}.jpg"
                getattr(out, split).append((path, int(labels[image_id - 1]), None))
    out.annotation_files += [folder / "imagelabels.mat", folder / "setid.mat"]
    return out


WRITERS = {"cub200": write_cub, "stanford_cars": write_cars, "flowers102": write_flowers}


def prepare(dataset: str, folder: Path) -> Optional[list[str]]:
    """Write `dataset`'s tiny files into `folder`; the overrides that run its config on them (None: not
    one of the fine-grained datasets). 4 classes in 2 tasks: 2 divides each real class count too
    (200, 196, 102), which the preflight checks against."""
    if dataset not in WRITERS:
        return None
    folder = Path(folder)
    WRITERS[dataset](folder / "data")
    overrides = [f"dataset.root={folder / 'data'}", f"dataset.cache_dir={folder / 'cache'}",
                 f"dataset.image_size={IMAGE_SIZE}", "dataset.download=false", "dataset.num_tasks=2", ONE_THREAD]
    if dataset == "flowers102":
        overrides.append("dataset.verify=false")  # tiny .mat files are not the official ones
    return overrides
