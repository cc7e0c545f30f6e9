"""What the loaders of labelled image files share (CUB-200-2011, Stanford Cars, Flowers-102,
WikiArt, Sketch, MIT Indoor Scenes, PASCAL VOC 2012, Places365): each reads its dataset's own
files into one `FileSplit` per split, and `image_list_stream` turns the splits into a stream.

- `FileSplit`: image paths in the official order, 0-based labels, optional bounding boxes, and
  the files they were read from (which the errors name).
- Reading helpers: `read_image_list` (a train/test list file, one image per line, each
  optionally followed by its label after a comma or whitespace: `airplane/1.png`,
  `kitchen/int474.jpg`, `Impressionism/x.jpg,22`, `dir/x.jpg 3`; a path may contain spaces,
  as TU-Berlin's `alarm clock/81.png`), `labelled_lists` (parsed lists to splits),
  `image_folder` / `image_trees` (torchvision's `ImageFolder` convention, what Piggyback and
  PackNet trained on: one subfolder per class, classes in sorted folder-name order, each
  class's files in sorted order, subfolders included), `tree_or_lists` (either), and
  `require_files` (one error naming every absent annotation file or folder).
- `StreamOptions`: the options every loader passes on unchanged, checked when the loader starts,
  before any file is read or decoded.
- `image_list_stream(...)`:
  1. keeps the first `max_train_per_class` training files of each class in the listed order, so
     a capped run decodes only the images it uses (the samples `stream.cap_per_class` would
     keep after decoding everything); the test split is never capped;
  2. checks that every label lies in 0..num_classes-1 and every listed image exists, before
     anything is decoded (one `CLBenchError` naming the file of the labels, or the first
     missing image and the file that listed it);
  3. decodes the images once into the memory-mapped cache of `images.cached_image_splits`
     (later runs decode nothing) and builds the stream with `images.image_stream`.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from cl_bench import CLBenchError
from cl_bench.data import images
from cl_bench.data.sources import AUGMENTATIONS, corrupt_file_error, data_root, missing_files_error
from cl_bench.data.stream import Stream, check_cap

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels, 0-based, right/bottom exclusive


@dataclass
class FileSplit:
    """One split as the dataset's files list it. `listed_in`: the file (or folder) that lists the
    images, named when one is absent; `labels_from`: the file the labels were read from (default
    `listed_in`), named when one is out of range, counting classes from `label_base` as that file
    does (CUB, Cars and Flowers number them from 1)."""

    paths: list[Path | str]
    labels: list[int]
    boxes: Optional[list[Box]] = None
    listed_in: Optional[Path] = None
    labels_from: Optional[Path] = None
    label_base: int = 0

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels) or (self.boxes is not None and len(self.boxes) != len(self.paths)):
            raise ValueError("paths, labels and boxes must have the same length")

    def __len__(self) -> int:
        return len(self.paths)

    def first_per_class(self, cap: Optional[int]) -> "FileSplit":
        """The first `cap` files of each class, in the listed order (all when None)."""
        check_cap(cap)
        if cap is None:
            return self
        seen: Counter = Counter()
        keep = []
        for i, y in enumerate(self.labels):
            if seen[y] < cap:
                seen[y] += 1
                keep.append(i)
        return dataclasses.replace(
            self, paths=[self.paths[i] for i in keep], labels=[self.labels[i] for i in keep],
            boxes=[self.boxes[i] for i in keep] if self.boxes is not None else None,
        )


def check_choice(option: str, value: Any, choices: Sequence[str]) -> None:
    """`dataset.<option>` must be one of `choices`."""
    if value not in choices:
        raise CLBenchError(f"dataset.{option} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class StreamOptions:
    """The loader options that `image_list_stream` uses, as the loaders take them (see their configs)."""

    scenario: str
    seed: int
    num_tasks: int
    class_order: Any
    val_fraction: float
    max_train_per_class: Optional[int]
    first_task_classes: Optional[int]
    image_size: int
    cache_dir: Optional[str]
    augment: str
    normalise: str

    def __post_init__(self) -> None:
        # options that would only fail after decoding (or after reading a large list) are refused first
        check_choice("normalise", self.normalise, images.NORMALISATIONS)
        check_choice("augment", self.augment, AUGMENTATIONS)
        if self.image_size < 8:
            raise CLBenchError(f"dataset.image_size must be at least 8, got {self.image_size}")
        check_cap(self.max_train_per_class)

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> "StreamOptions":
        """The options among a loader's arguments: `StreamOptions.of(locals())` as its first statement. The
        loaders keep every option in their own signature, which `config.check_kwargs` checks a config against."""
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})


# ----- reading the dataset's files ------------------------------------------------------------------


def dataset_folder(root: Optional[str], default_name: str) -> Path:
    """`dataset.root`, else `<data dir>/<default_name>`."""
    return Path(root).expanduser().resolve() if root else data_root(None) / default_name


def require_files(dataset: str, folder: Path, names: Sequence[str], what: str, reason: str = "") -> None:
    """One line naming every entry of `names` (files or folders under `folder`) that is absent."""
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise missing_files_error(dataset, folder, f"{', '.join(missing)} ({what})", reason)


def image_folder(dataset: str, folder: Path, what: str) -> tuple[list[str], FileSplit]:
    """(classes, files) of an ImageFolder tree `folder/<class>/**/<image>`."""
    if not folder.is_dir():
        raise missing_files_error(dataset, folder.parent, what)
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    split = FileSplit([], [], listed_in=folder)
    for label, name in enumerate(classes):
        found = []
        for sub, dirs, files in os.walk(folder / name, followlinks=True):
            dirs.sort()
            found += [Path(sub) / f for f in sorted(files) if Path(f).suffix.lower() in images.IMAGE_SUFFIXES]
        if not found:
            raise missing_files_error(dataset, folder, f"the JPEG/PNG images of class {name!r} in {name}/ ({what})")
        split.paths += found
        split.labels += [label] * len(found)
    if not classes:
        raise missing_files_error(dataset, folder, f"one subfolder per class ({what})")
    return classes, split


def image_trees(dataset: str, root: Path, what: str, test: str = "test") -> tuple[list[str], dict[str, FileSplit]]:
    """(classes, {"train", "test": files}) of the ImageFolder trees `root/train` and `root/<test>`, which
    must hold the same classes: ImageFolder numbers each tree's classes by its own folders."""
    classes, train = image_folder(dataset, root / "train", what)
    test_classes, test_split = image_folder(dataset, root / test, what)
    if classes != test_classes:
        extra = sorted(set(test_classes) - set(classes)) or sorted(set(classes) - set(test_classes))
        raise CLBenchError(
            f"dataset={dataset}: the class folders of {root / test} differ from those of the training tree "
            f"(e.g. {extra[:3]}); ImageFolder numbers each tree's classes by its own folders, so both must "
            "hold the same"
        )
    return classes, {"train": train, "test": test_split}


def read_image_list(dataset: str, path: Path) -> list[tuple[str, Optional[str]]]:
    """[(relative image path, label text or None)] of a list file (see the module docstring)."""
    entries = []
    for line in images.read_lines(path):
        if line.startswith("#"):
            continue
        name, label = line, None
        if "," in line:
            name, label = (s.strip() for s in line.rsplit(",", 1))
        else:
            fields = line.rsplit(None, 1)
            if len(fields) == 2 and fields[1].lstrip("-").isdigit():
                name, label = fields[0].strip(), fields[1]
        if Path(name).suffix.lower() not in images.IMAGE_SUFFIXES:
            if not entries and label is not None and not label.lstrip("-").isdigit():
                continue  # a CSV header such as "path,label"
            raise corrupt_file_error(dataset, path, f"the line {line!r} names no JPEG/PNG file")
        entries.append((name.replace("\\", "/").lstrip("/"), label))
    if not entries:
        raise corrupt_file_error(dataset, path, "it lists no images")
    return entries


def labelled_lists(
    dataset: str, lists: Mapping[str, tuple[Path, list[tuple[str, Optional[str]]]]], image_dir: Path
) -> tuple[list[str], dict[str, FileSplit]]:
    """(class names, {split: files}) of parsed lists. Integer labels are class indices (renumbered
    0.. in their sorted order when some are unused); names, or the parent folder of a path without
    a label, become classes in sorted (ImageFolder) order."""
    kinds = {("int" if lab is not None and lab.lstrip("-").isdigit() else "name")
             for _, entries in lists.values() for _, lab in entries}
    if len(kinds) > 1:
        raise CLBenchError(f"dataset={dataset}: the list files mix integer labels with class names; use one kind")

    def key(name: str, label: Optional[str]) -> Any:
        if "int" in kinds:
            return int(label)
        return label if label is not None else Path(name).parent.as_posix()

    keys = sorted({key(n, lab) for _, entries in lists.values() for n, lab in entries})
    if "name" in kinds and "." in keys:
        path = next(p for p, entries in lists.values() if any(key(n, lab) == "." for n, lab in entries))
        raise corrupt_file_error(dataset, path, "a line has neither a label nor a class folder in its path")
    index = {k: i for i, k in enumerate(keys)}
    splits = {split: FileSplit([image_dir / n for n, _ in entries], [index[key(n, lab)] for n, lab in entries],
                               listed_in=path)
              for split, (path, entries) in lists.items()}
    return [str(k) for k in keys], splits


def list_file(root: Path, name: str) -> Path:
    """A list named by an option: absolute, relative to the dataset folder, or relative to the working directory."""
    path = Path(name).expanduser()
    if not path.is_absolute() and (root / path).is_file():
        return root / path
    return path


def tree_or_lists(
    dataset: str, root: Path, train_list: Optional[str], test_list: Optional[str], what: str,
    image_dir: Optional[Path] = None,
) -> tuple[list[str], dict[str, FileSplit]]:
    """(classes, {"train", "test": files}) from `train_list`/`test_list` when given (paths relative
    to `image_dir`, default `root`), else from the ImageFolder trees `root/train` and `root/test`."""
    if (train_list is None) != (test_list is None):
        raise CLBenchError(f"dataset={dataset}: set both dataset.train_list and dataset.test_list, or neither")
    if train_list is not None:
        lists = {}
        for split, name in (("train", train_list), ("test", test_list)):
            path = list_file(root, name)
            if not path.is_file():
                raise missing_files_error(dataset, root, f"the list file {name} (dataset.{split}_list)")
            lists[split] = (path, read_image_list(dataset, path))
        return labelled_lists(dataset, lists, image_dir or root)
    if not (root / "train").is_dir():
        raise missing_files_error(dataset, root, what)
    return image_trees(dataset, root, what)


# ----- checks and the stream --------------------------------------------------------------------------


def _shown(path: Path, folder: Path) -> Path:
    """`path` relative to `folder` when it lies inside (a list file may lie anywhere)."""
    return path.relative_to(folder) if path.is_relative_to(folder) else path


def check_labels_listed(dataset: str, split: FileSplit, num_classes: int) -> None:
    """Labels outside 0..num_classes-1, or no sample at all, mean a damaged annotation or list file."""
    source = split.labels_from or split.listed_in
    if not split.labels:
        raise corrupt_file_error(dataset, source, "it lists no images for this split")
    lo, hi = min(split.labels), max(split.labels)
    if lo < 0 or hi >= num_classes:
        b = split.label_base
        raise corrupt_file_error(dataset, source,
                                 f"labels range {lo + b}..{hi + b}, expected {b}..{num_classes - 1 + b}")


def check_images_present(dataset: str, folder: Path, split: FileSplit, what: str = "") -> None:
    """One line naming the first listed image that is absent (and how many more are), and the file
    that listed it; `what` (how to get the dataset's files) completes it."""
    missing = [p for p in split.paths if not os.path.isfile(p)]
    if missing:
        n = len(missing) - 1
        more = f" and {n} other missing image{'s' if n > 1 else ''}" if n else ""
        listed = f" listed in {_shown(split.listed_in, folder)}" if split.listed_in is not None else ""
        raise missing_files_error(dataset, folder, f"{missing[0]}{more}{listed}" + (f" ({what})" if what else ""))


def image_list_stream(
    name: str,
    splits: Mapping[str, FileSplit],
    num_classes: int,
    folder: Path,
    options: StreamOptions,
    what: str = "",
) -> Stream:
    """The stream of `splits["train"]` / `splits["test"]` (see the module docstring); `folder` is where
    the errors say the files go, `what` how to get them."""
    splits = {**splits, "train": splits["train"].first_per_class(options.max_train_per_class)}
    for split in splits.values():
        check_labels_listed(name, split, num_classes)
        check_images_present(name, folder, split, what)
    parts = {k: (s.paths, s.labels) for k, s in splits.items()}
    boxes = {k: [[float(v) for v in b] for b in s.boxes] for k, s in splits.items() if s.boxes is not None}
    decoded = images.cached_image_splits(
        name, parts, options.image_size, images.cache_folder(options.cache_dir), boxes or None
    )
    return images.image_stream(
        name, decoded["train"], decoded["test"], options.scenario, options.seed, options.num_tasks,
        options.class_order, options.val_fraction, None, options.first_task_classes, options.augment,
        options.normalise,
    )
