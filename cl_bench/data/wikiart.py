"""WikiArt artist classification as in Piggyback and PackNet (Mallya et al. 2018): 195 artists,
42,129 training and 10,628 test paintings (Piggyback, Table 1; the data of Saleh & Elgammal,
"Large-scale classification of fine-art paintings", 2015).

Data: the authors distributed their copy "in PyTorch format" (README of
github.com/arunmallya/piggyback, a box.com archive) as two ImageFolder trees,
`wikiart/train/<artist>/*.jpg` and `wikiart/test/<artist>/*.jpg`, read by
`torchvision.datasets.ImageFolder` (`../data/wikiart/train` and `.../test` in the
repository's `src/utils.py`). Point `dataset.root` at the folder holding `train/` and
`test/`. The classes are the artist folders in sorted order (ImageFolder's labels), the
files of each class in sorted order. Their train/test assignment exists only as that
archive: no list of the 195-artist split was published separately.

Any other split of WikiArt images can be read from two list files, `dataset.train_list`
and `dataset.test_list` (absolute, or relative to `dataset.root`), one image per line,
its path relative to `dataset.root`, optionally followed by its class index or name after
a comma or a space (e.g. ArtGAN's `artist_train.csv` / `artist_val.csv`,
github.com/cs-chan/ArtGAN, lines `Style/painting.jpg,<artist index>`); a path without a
label takes its folder as the class.

Images are decoded once (shorter side resized to `image_size`, centre square kept) into
the memory-mapped cache of `cl_bench.data.images`; `max_train_per_class` keeps the first
files of each class before anything is decoded.
"""

from __future__ import annotations

from typing import Any, Optional

from cl_bench.data.image_lists import StreamOptions, dataset_folder, image_list_stream, tree_or_lists
from cl_bench.data.stream import Stream

WHAT = (
    "train/<artist>/*.jpg and test/<artist>/*.jpg (Piggyback's wikiart archive, linked from "
    "github.com/arunmallya/piggyback), or list files named by dataset.train_list and dataset.test_list"
)


def wikiart(
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
    train_list: Optional[str] = None,
    test_list: Optional[str] = None,
) -> Stream:
    """The 195 artists in `num_tasks` tasks (5 x 39 by default); Piggyback's test tree is the test set."""
    options = StreamOptions.of(locals())
    folder = dataset_folder(root, "wikiart")
    classes, splits = tree_or_lists("wikiart", folder, train_list, test_list, WHAT)
    return image_list_stream("wikiart", splits, len(classes), folder, options, WHAT)


wikiart.num_classes = 195
