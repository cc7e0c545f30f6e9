"""PASCAL VOC 2012 classification (Everingham et al., "The PASCAL Visual Object Classes challenge"),
turned into single-label tasks: 20 object classes, train = the official `train` list, test = the
official `val` list (the test set's labels are not public).

Data: `VOCtrainval_11-May-2012.tar` unpacked into `dataset.root`, i.e.
`VOCdevkit/VOC2012/JPEGImages/<id>.jpg`, `ImageSets/Main/<class>_{train,val}.txt` (lines
`<id> <1|-1|0>`: the class is present, absent, or present only as objects marked difficult),
`ImageSets/Main/{train,val}.txt` and `Annotations/<id>.xml` (a `dataset.root` pointing at
`VOC2012/` itself works too). Classes are the devkit's 20 in its (alphabetical) order,
aeroplane = 0 ... tvmonitor = 19.

VOC is multi-label (an image shows a person and a horse and a car), clbench's streams are
single-label with accuracy as the metric, so `dataset.labels` picks one of two honest
single-label readings, neither of them VOC's own protocol:

- `single` (default): whole images that show exactly one class: 1 in that class's list and
  -1 in all 19 others (an image with another class present only as a difficult object is
  left out too). Images of classes that co-occur with people or furniture are rare in this
  subset (dining tables above all), so the classes are unbalanced.
- `objects`: every object box of `Annotations/<id>.xml` not marked difficult, cropped from its
  image (the 1-based inclusive VOC pixel box) and labelled with its class; an image gives as
  many samples as it has objects.

The VOC numbers of Learning without Forgetting (Li & Hoiem 2016) are mean average precision
on the multi-label task and are not comparable with the accuracies of either reading.

The default of 2 tasks x 10 classes follows the class-incremental VOC split of Shmelkov et
al., "Incremental learning of object detectors without catastrophic forgetting" (ICCV 2017, on
VOC 2007 detection): the first 10 classes in alphabetical order, then the other 10. Images are decoded once
(box cropped, shorter side to `image_size`, centre square) into the cache of
`cl_bench.data.images`; `max_train_per_class` keeps the first samples of each class in the
lists' order before anything is decoded.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

from cl_bench.data import images
from cl_bench.data.image_lists import (
    FileSplit,
    StreamOptions,
    check_choice,
    dataset_folder,
    image_list_stream,
    require_files,
)
from cl_bench.data.sources import corrupt_file_error, missing_files_error
from cl_bench.data.stream import Stream

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
LABELS = ("single", "objects")
SPLITS = {"train": "train", "test": "val"}
WHAT = (
    "the contents of VOCtrainval_11-May-2012.tar (VOCdevkit/VOC2012/ with JPEGImages/, ImageSets/Main/, "
    "Annotations/)"
)


def voc_folder(root: Path) -> Path:
    """`VOCdevkit/VOC2012` under the unpacking folder, or the folder itself when it is `VOC2012/`."""
    if (root / "JPEGImages").is_dir() and not (root / "VOCdevkit").is_dir():
        return root
    return root / "VOCdevkit" / "VOC2012"


def _read_ids(voc: Path, name: str) -> list[list[str]]:
    require_files("voc2012", voc, [f"ImageSets/Main/{name}"], WHAT)
    return [ln.split() for ln in images.read_lines(voc / "ImageSets" / "Main" / name)]


def single_label_images(voc: Path, split: str) -> FileSplit:
    """Images positive for exactly one class and negative (-1) for all the others, in the lists' order."""
    flags: dict[str, list[int]] = {}
    order: list[str] = []
    for c, name in enumerate(CLASSES):
        for fields in _read_ids(voc, f"{name}_{split}.txt"):
            if len(fields) != 2 or fields[1] not in ("1", "-1", "0"):
                raise corrupt_file_error("voc2012", voc / "ImageSets" / "Main" / f"{name}_{split}.txt",
                                         f"the line {' '.join(fields)!r} is not '<id> <1|-1|0>'")
            image_id, flag = fields[0], int(fields[1])
            if image_id not in flags:
                flags[image_id] = [-1] * len(CLASSES)
                order.append(image_id)
            flags[image_id][c] = flag
    found = FileSplit([], [], listed_in=voc / "ImageSets" / "Main" / f"<class>_{split}.txt")
    for image_id in order:
        f = flags[image_id]
        if f.count(1) == 1 and f.count(-1) == len(CLASSES) - 1:
            found.paths.append(voc / "JPEGImages" / f"{image_id}.jpg")
            found.labels.append(f.index(1))
    return found


def object_crops(voc: Path, split: str) -> FileSplit:
    """Every non-difficult object of the split's images: (image, class, (left, top, right, bottom))."""
    found = FileSplit([], [], [], listed_in=voc / "ImageSets" / "Main" / f"{split}.txt")
    for fields in _read_ids(voc, f"{split}.txt"):
        xml = voc / "Annotations" / f"{fields[0]}.xml"
        require_files("voc2012", voc, [f"Annotations/{xml.name}"], WHAT)
        try:
            objects = ET.parse(xml).getroot().findall("object")
            for obj in objects:
                name = obj.findtext("name", "").strip()
                if name not in CLASSES or obj.findtext("difficult", "0").strip() == "1":
                    continue
                box = obj.find("bndbox")
                xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                # VOC boxes are 1-based and inclusive: pixel columns xmin..xmax are columns xmin-1..xmax-1 in Pillow
                found.paths.append(voc / "JPEGImages" / f"{fields[0]}.jpg")
                found.labels.append(CLASSES.index(name))
                found.boxes.append((xmin - 1, ymin - 1, xmax, ymax))
        except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
            raise corrupt_file_error("voc2012", xml, f"not a VOC annotation: {exc}") from None
    return found


def voc2012(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 2,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
    root: Optional[str] = None,
    image_size: int = 224,
    cache_dir: Optional[str] = None,
    augment: str = "crop_flip",
    normalise: str = "imagenet",
    labels: str = "single",
) -> Stream:
    """The 20 VOC classes in `num_tasks` tasks (10 + 10 by default), official train list vs. val list."""
    options = StreamOptions.of(locals())
    check_choice("labels", labels, LABELS)
    folder = dataset_folder(root, "voc")
    voc = voc_folder(folder)
    if not (voc / "JPEGImages").is_dir():
        raise missing_files_error("voc2012", folder, WHAT)
    read = single_label_images if labels == "single" else object_crops
    splits = {part: read(voc, split) for part, split in SPLITS.items()}
    return image_list_stream("voc2012", splits, len(CLASSES), voc, options, WHAT)


voc2012.num_classes = 20
