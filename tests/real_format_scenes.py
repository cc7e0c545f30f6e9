"""Writers of tiny scene/art/sketch datasets in their real on-disk layouts, for running the real loaders offline.

- WikiArt (Piggyback's copy): ImageFolder trees `train/<artist>/*.jpg` and `test/<artist>/*.jpg`.
- Sketch: TU-Berlin's `sketches_png.zip` unpacked, `png/<class>/<n>.png` (grayscale, square, numbered
  1.. across all classes) with `png/filelist.txt` (`airplane/1.png`; names with spaces such as
  `alarm clock`); or Piggyback's trees `train/<class>/` and `test/<class>/`.
- MIT Indoor Scenes: `Images/<class>/*.jpg` (more images than the lists name) with `TrainImages.txt`
  and `TestImages.txt` (`<class>/<file>.jpg`).
- PASCAL VOC 2012: `VOCdevkit/VOC2012/` with `JPEGImages/<id>.jpg`, `Annotations/<id>.xml` (objects with
  1-based inclusive boxes, some difficult), `ImageSets/Main/{train,val,trainval}.txt` and
  `<class>_{train,val,trainval}.txt` for all 20 classes (`<id> <flag>`, flag 1, -1, or 0 when the class
  is there only as difficult objects), multi-label images included.
- Places365: torchvision's small layout, `categories_places365.txt` (`/a/airfield 0`),
  `places365_train_standard.txt` (`/a/airfield/00000001.jpg 0`), `places365_val.txt`
  (`Places365_val_00000001.jpg 3`), `data_256/` (as the archive unpacks; `data_256_standard/` as
  torchvision renames it) and `val_256/`; or the easy-format trees `train/<class>/`, `val/<class>/`.

Every image is a class colour plus its own noise (learnable classes, no two images alike), small and
mostly non-square. Each writer returns a `Written` with the samples the loader should produce, in the
official order. `prepare(dataset, folder)` writes one dataset and returns the overrides that run its
config on the files (None for datasets of other modules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

IMAGE_SIZE = 16  # the decode size of the overrides
ONE_THREAD = "device.num_threads=1"
ARTISTS = ["Albrecht_Durer", "Claude_Monet", "Edgar_Degas", "Paul_Cezanne", "Rembrandt", "Vincent_van_Gogh"]
SKETCH_CLASSES = ["airplane", "alarm clock", "angel", "bear (animal)"]
INDOOR_CLASSES = ["airport_inside", "artstudio", "auditorium"]
PLACES_CATEGORIES = ["/a/airfield", "/a/airplane_cabin", "/a/airport_terminal", "/a/alcove", "/a/alley"]
VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

Box = tuple[int, int, int, int]


@dataclass
class Written:
    """A tiny dataset: `root` for dataset.root, and per split the (path, 0-based label, box or None)
    the loader should produce, in the official order."""

    root: Path
    train: list[tuple[Path, int, Optional[Box]]] = field(default_factory=list)
    test: list[tuple[Path, int, Optional[Box]]] = field(default_factory=list)
    unused: list[Path] = field(default_factory=list)  # images on disk that no split may use


def save_image(path: Path, colour, rng: np.random.Generator, height: int = 22, width: int = 28,
               grey: bool = False) -> Path:
    """A JPEG or PNG (by suffix) of `colour` plus noise."""
    from PIL import Image

    pixels = np.clip(np.asarray(colour) + rng.normal(0, 20, size=(height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    if grey:
        image = image.convert("L")
    image.save(path, **({"quality": 92} if path.suffix.lower() in (".jpg", ".jpeg") else {}))
    return path


def shape(i: int) -> tuple[int, int]:
    """(height, width): landscape and portrait images in turn."""
    return (22, 28) if i % 2 == 0 else (27, 20)


def colours(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 226, size=(n, 3))


def write_image_trees(root: Path, classes: list[str], n_train: int, n_test: int, seed: int = 0,
                      suffix: str = ".jpg", test_name: str = "test") -> Written:
    """ImageFolder trees `train/<class>/` and `<test_name>/<class>/` (Piggyback's WikiArt and Sketch copies,
    the Places365 easy format)."""
    rng, base = np.random.default_rng(seed), colours(len(classes), seed)
    out = Written(Path(root))
    for split, n, listed in (("train", n_train, out.train), (test_name, n_test, out.test)):
        for label, name in enumerate(classes):  # classes given sorted: ImageFolder's order
            for i in range(n):
                path = Path(root) / split / name / f"{name.lower()}_{i:03d}{suffix}"
                save_image(path, base[label], rng, *shape(i))
                listed.append((path, label, None))
    return out


def write_tu_berlin(root: Path, classes: list[str] = SKETCH_CLASSES, per_class: int = 4, seed: int = 1) -> Written:
    """`png/<class>/<n>.png` and `png/filelist.txt`; `train`/`test` of the result: the first
    per_class - 1 / the last sketch of each class (the loader's split with train_per_class=per_class - 1)."""
    rng, base = np.random.default_rng(seed), colours(len(classes), seed)
    png = Path(root) / "png"
    out, lines, number = Written(Path(root)), [], 0
    for label, name in enumerate(sorted(classes)):
        for i in range(per_class):
            number += 1
            path = save_image(png / name / f"{number}.png", base[label], rng, 20, 20, grey=True)
            lines.append(f"{name}/{number}.png")
            (out.train if i < per_class - 1 else out.test).append((path, label, None))
    png.mkdir(parents=True, exist_ok=True)
    (png / "filelist.txt").write_text("\n".join(lines) + "\n")
    return out


def write_mit_indoor(root: Path, classes: list[str] = INDOOR_CLASSES, n_train: int = 3, n_test: int = 2,
                     n_unlisted: int = 1, seed: int = 2) -> Written:
    """`Images/<class>/*.jpg` with `TrainImages.txt` / `TestImages.txt`; the lists interleave their
    files (not sorted by name) and some images are in no list, as in the real download."""
    rng, base = np.random.default_rng(seed), colours(len(classes), seed)
    out = Written(Path(root))
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for label, name in enumerate(classes):
        files = [f"{name}_{k:04d}.jpg" for k in range(n_train + n_test + n_unlisted)]
        for k, fname in enumerate(files):
            path = save_image(Path(root) / "Images" / name / fname, base[label], rng, *shape(k))
            if k < n_train + n_test:
                split = "test" if k % 2 == 1 and k // 2 < n_test else "train"
                lines[split].append(f"{name}/{fname}")
                (out.train if split == "train" else out.test).append((path, label, None))
            else:
                out.unused.append(path)
    # the official lists are not grouped by class in name order: list the classes backwards
    for split, file in (("train", "TrainImages.txt"), ("test", "TestImages.txt")):
        ordered = [ln for name in reversed(classes) for ln in lines[split] if ln.startswith(name + "/")]
        (Path(root) / file).write_text("\n".join(ordered) + "\n")
    rank = {name: i for i, name in enumerate(reversed(classes))}
    out.train.sort(key=lambda e: rank[classes[e[1]]])  # stable: within a class, the list's order
    out.test.sort(key=lambda e: rank[classes[e[1]]])
    return out


VOC_XML = """<annotation>
\t<folder>VOC2012</folder>
\t<filename>{id}.jpg</filename>
\t<source>
\t\t<database>The VOC2008 Database</database>
\t\t<annotation>PASCAL VOC2008</annotation>
\t\t<image>flickr</image>
\t</source>
\t<size>
\t\t<width>{width}</width>
\t\t<height>{height}</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>0</segmented>
{objects}</annotation>
"""
VOC_OBJECT = """\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<occluded>0</occluded>
\t\t<bndbox>
\t\t\t<xmin>{xmin}</xmin>
\t\t\t<ymin>{ymin}</ymin>
\t\t\t<xmax>{xmax}</xmax>
\t\t\t<ymax>{ymax}</ymax>
\t\t</bndbox>
\t\t<difficult>{difficult}</difficult>
\t</object>
"""


@dataclass
class VocWritten:
    """The VOC files and what each protocol should read from them, per split (train, val)."""

    root: Path
    single: dict[str, list[tuple[Path, int]]]
    objects: dict[str, list[tuple[Path, int, Box]]]


def write_voc(root: Path, per_class: dict[str, int] | None = None, seed: int = 3) -> VocWritten:
    """VOCdevkit/VOC2012 with, per split, `per_class[split]` single-class images of every class, then
    multi-label images (person + horse, car + person + a difficult bottle) and an image whose only other
    class is difficult. Object boxes are 1-based inclusive pixel boxes."""
    per_class = per_class or {"train": 2, "val": 1}
    rng, base = np.random.default_rng(seed), colours(len(VOC_CLASSES), seed)
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    single: dict[str, list] = {"train": [], "val": []}
    objects: dict[str, list] = {"train": [], "val": []}
    ids: dict[str, list[str]] = {"train": [], "val": []}
    flags: dict[str, dict[str, list[int]]] = {"train": {}, "val": {}}
    year = {"train": 2008, "val": 2009}
    for split in ("train", "val"):
        images: list[list[tuple[str, int]]] = []  # objects as (class, difficult)
        for c, name in enumerate(VOC_CLASSES):
            images += [[(name, 0)] for _ in range(per_class[split])]
            if c == 0:
                images.append([(name, 0), (name, 0)])  # two aeroplanes: single-label, two objects
        images += [[("person", 0), ("horse", 0)], [("car", 0), ("person", 0), ("bottle", 1)], [("dog", 0), ("sofa", 1)]]
        for k, objs in enumerate(images):
            image_id = f"{year[split]}_{k + 1:06d}"
            height, width = shape(k)
            colour = base[VOC_CLASSES.index(objs[0][0])]
            path = save_image(voc / "JPEGImages" / f"{image_id}.jpg", colour, rng, height, width)
            xml_objects = []
            for j, (name, difficult) in enumerate(objs):
                xmin, ymin = 1 + 2 * j, 2 + j
                xmax, ymax = min(width, xmin + 14), min(height, ymin + 12)
                xml_objects.append(VOC_OBJECT.format(name=name, xmin=xmin, ymin=ymin, xmax=xmax, ymax=ymax,
                                                     difficult=difficult))
                if not difficult:
                    objects[split].append((path, VOC_CLASSES.index(name), (xmin - 1, ymin - 1, xmax, ymax)))
            (voc / "Annotations").mkdir(parents=True, exist_ok=True)
            (voc / "Annotations" / f"{image_id}.xml").write_text(
                VOC_XML.format(id=image_id, width=width, height=height, objects="".join(xml_objects)))
            ids[split].append(image_id)
            row = []
            for name in VOC_CLASSES:
                present = [d for n, d in objs if n == name]
                row.append(-1 if not present else (1 if 0 in present else 0))
            flags[split][image_id] = row
            if row.count(1) == 1 and row.count(-1) == len(VOC_CLASSES) - 1:
                single[split].append((path, row.index(1)))
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "trainval"):
        split_ids = ids["train"] + ids["val"] if split == "trainval" else ids[split]
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
        for c, name in enumerate(VOC_CLASSES):
            rows = {**flags["train"], **flags["val"]}
            (main / f"{name}_{split}.txt").write_text("".join(f"{i} {rows[i][c]:2d}\n" for i in split_ids))
    return VocWritten(Path(root), single, objects)


def write_places365(root: Path, n_train: int = 3, n_val: int = 2, images_dir: str = "data_256",
                    seed: int = 4) -> Written:
    """torchvision's small Places365 layout; the train list interleaves classes as the official one
    does not (it is sorted by class), so per-class order is what matters."""
    rng, base = np.random.default_rng(seed), colours(len(PLACES_CATEGORIES), seed)
    root = Path(root)
    out = Written(root)
    (root / "categories_places365.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(PLACES_CATEGORIES)))
    train_lines = []
    for i in range(n_train):
        for label, category in enumerate(PLACES_CATEGORIES):
            rel = f"{category}/{i + 1:08d}.jpg"
            path = save_image(root / images_dir / rel.lstrip("/"), base[label], rng, 24, 24)
            train_lines.append(f"{rel} {label}")
            out.train.append((path, label, None))
    (root / "places365_train_standard.txt").write_text("\n".join(train_lines) + "\n")
    val_lines = []
    for k in range(n_val * len(PLACES_CATEGORIES)):
        label = (k * 2) % len(PLACES_CATEGORIES)  # the val list is not sorted by class
        name = f"Places365_val_{k + 1:08d}.jpg"
        path = save_image(root / "val_256" / name, base[label], rng, 24, 24)
        val_lines.append(f"{name} {label}")
        out.test.append((path, label, None))
    (root / "places365_val.txt").write_text("\n".join(val_lines) + "\n")
    out.train.sort(key=lambda e: e[1])
    out.test.sort(key=lambda e: e[1])
    return out


def common(root: Path, folder: Path) -> list[str]:
    return [f"dataset.root={root}", f"dataset.cache_dir={Path(folder) / 'cache'}", f"dataset.image_size={IMAGE_SIZE}",
            ONE_THREAD]


def prepare(dataset: str, folder: Path) -> Optional[list[str]]:
    """Write `dataset`'s files into `folder`; the overrides that run its config on them (None: not one of these)."""
    folder = Path(folder)
    if dataset == "wikiart":
        w = write_image_trees(folder / "wikiart", ARTISTS, n_train=3, n_test=1)
        return [*common(w.root, folder), "dataset.num_tasks=3"]  # 195 and 6 classes both split in 3
    if dataset == "sketch":
        w = write_tu_berlin(folder / "sketches")
        return [*common(w.root, folder), "dataset.num_tasks=2", "dataset.train_per_class=3"]
    if dataset == "mit_indoor":
        w = write_mit_indoor(folder / "mit_indoor")
        # 67 is prime: a first task of 1 class, then 66 (here 2) shared by one more task
        return [*common(w.root, folder), "dataset.num_tasks=2", "dataset.first_task_classes=1"]
    if dataset == "voc2012":
        w = write_voc(folder / "voc")
        return common(w.root, folder)  # the default 2 x 10
    if dataset == "places365":
        w = write_places365(folder / "places365")
        return [*common(w.root, folder), "dataset.download=false", "dataset.verify=false"]  # 5 x 1 class
    return None
