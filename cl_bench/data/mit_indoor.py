"""MIT Indoor Scenes (Quattoni & Torralba, "Recognizing indoor scenes", CVPR 2009): 67 indoor
scene categories with the official split of 80 training and 20 test images per class (5,360 and
1,340 images), one of the new tasks of Learning without Forgetting (Li & Hoiem 2016).

Data, as the official downloads of web.mit.edu/torralba/www/indoor.html unpack into
`dataset.root`: `Images/<class>/*.jpg` (from `indoorCVPR_09.tar`, 15,620 images) and the split
files `TrainImages.txt` and `TestImages.txt`, one image per line as `<class>/<file>.jpg`. Only
the listed images are used; the classes are the folder names of the lists in sorted order
(`airport_inside` = 0, ..., `winecellar` = 66), each class's images in the list's order.

67 is prime, so the default is one task holding every class (how LwF adds the dataset to a
network); `first_task_classes` splits it unevenly, e.g. 7 and `num_tasks=7`
gives 7 + 6 x 10 classes. Images are decoded once (shorter side to `image_size`, centre
square) into the cache of `cl_bench.data.images`; `max_train_per_class` keeps the first
listed images of each class before anything is decoded.
"""

from __future__ import annotations

from typing import Any, Optional

from cl_bench.data.image_lists import (
    StreamOptions,
    dataset_folder,
    image_list_stream,
    labelled_lists,
    read_image_list,
    require_files,
)
from cl_bench.data.stream import Stream

SPLIT_FILES = {"train": "TrainImages.txt", "test": "TestImages.txt"}
WHAT = (
    "the official downloads of web.mit.edu/torralba/www/indoor.html: Images/<class>/*.jpg from indoorCVPR_09.tar, "
    "TrainImages.txt and TestImages.txt"
)


def mit_indoor(
    scenario: str = "class_il",
    seed: int = 0,
    num_tasks: int = 1,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
    root: Optional[str] = None,
    image_size: int = 224,
    cache_dir: Optional[str] = None,
    augment: str = "crop_flip",
    normalise: str = "imagenet",
) -> Stream:
    """The 67 scene classes (one task by default); the official TestImages.txt is the test set."""
    options = StreamOptions.of(locals())
    folder = dataset_folder(root, "mit_indoor")
    require_files("mit_indoor", folder, [*SPLIT_FILES.values(), "Images"], WHAT)
    lists = {split: (folder / name, read_image_list("mit_indoor", folder / name))
             for split, name in SPLIT_FILES.items()}
    classes, splits = labelled_lists("mit_indoor", lists, folder / "Images")
    return image_list_stream("mit_indoor", splits, len(classes), folder, options, WHAT)


mit_indoor.num_classes = 67
