"""Dataset sequences: a stream whose tasks are whole datasets, one task each.

The protocol of Piggyback (Mallya, Davis & Lazebnik, ECCV 2018, Sec. 4) and PackNet
(Mallya & Lazebnik, CVPR 2018, Sec. 4): an ImageNet-pretrained network learns CUBS,
Stanford Cars, Flowers, WikiArt and Sketch in turn, each with its own classifier; and of
Learning without Forgetting (Li & Hoiem, TPAMI 2017), where a network learns one new
dataset after its original task.

    clbench run dataset=sequence dataset.tasks=[cub200,stanford_cars,flowers102,wikiart,sketch]

Each entry of `tasks` names a config of `conf/dataset/` (or is a mapping with `name:` plus
that component's own options, e.g. `{name: cub200, root: /data/CUB, crop_boxes: true}`);
`components` gives options per name as well (`components: {cub200: {root: /data/CUB}}`).
A component is built by its own loader, with its own root, split, download and cache, as
ONE task holding all its classes (`num_tasks=1`, natural class order), and becomes task t
of the sequence with its labels shifted past the previous datasets' classes:

- `scenario=task_il` (the papers' setting and the default): task t's outputs are its own
  dataset's classes, i.e. a head per dataset (the rows of the shared output layer that
  belong to the dataset); at test the task id picks the head.
- `scenario=class_il`: one classifier over the union of all datasets' classes.
- `domain_il` has no meaning here (the datasets do not share labels) and is refused.

All tasks feed one network and replay strategies mix samples of several datasets in one
batch, so the sequence stores every dataset at one shape and normalises them alike:
`image_size` (default: the largest component's; components whose loader takes an
`image_size` are decoded at that size directly, others are resized with antialiased
bilinear interpolation), `channels` (default: the most any component has; grey images are
repeated into RGB), `normalise` (`data`: the per-channel statistics of all training sets
together; `imagenet`: torchvision's, for ImageNet-pretrained backbones as in the papers)
and `augment`. Per-dataset normalisation would need per-sample transforms inside mixed
batches, which clbench does not do; the papers normalise every dataset with ImageNet's
statistics anyway.

Data stay where the component's loader put them: a decoded-image cache is memory-mapped,
so a sequence larger than RAM is read from disk batch by batch (see `data/images.py`), and
`Stream.to` keeps data too large for a GPU in pinned host memory.
"""

from __future__ import annotations

import inspect
import re
from importlib.resources import files
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.data.sources import with_augmentation
from cl_bench.data.stream import Split, Stream, Task

# options of a component's loader that the sequence decides
_FIXED = {"num_tasks": 1, "class_order": "natural", "first_task_classes": None, "val_fraction": 0.0}


def component_config(entry: Any, components: Mapping[str, Any], index: int):
    """The dataset config node of one entry of `dataset.tasks` (a name or {name:, options...}),
    and the option names the user set for it."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(entry, (Mapping, DictConfig)):
        entry = dict(entry)
        name = entry.pop("name", None)
        if name is None:
            raise CLBenchError(f"dataset.tasks[{index}] is a mapping without `name:` (the dataset config to use)")
    else:
        name, entry = str(entry), {}
    if name == "sequence":
        raise CLBenchError(f"dataset.tasks[{index}]: a sequence cannot contain a sequence")
    folder = files("cl_bench.conf").joinpath("dataset")
    path = folder.joinpath(f"{name}.yaml")
    if not path.is_file():
        shipped = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml") and p.name != "sequence.yaml")
        raise CLBenchError(f"dataset.tasks[{index}]={name!r} is not a dataset config; choose from {', '.join(shipped)}")
    node = OmegaConf.load(str(path))
    if "_target_" not in node and "dataset" in node:  # a `# @package _global_` config (e.g. permuted_mnist)
        node = node.dataset
    node.pop("defaults", None)  # a dataset's default backbone is the sequence's business
    extra = dict(components.get(name, {}) or {})
    return name, OmegaConf.merge(node, OmegaConf.create(extra), OmegaConf.create(entry)), set(extra) | set(entry)


def _load_component(name: str, node, user_keys: set, index: int, seed: int, shared: dict) -> Stream:
    """Component `name` as one task; the sequence's options (`shared`) where the user gave none for it."""
    from cl_bench.config import _target_of, build

    where = f"dataset.tasks[{index}] ({name})"
    params = inspect.signature(_target_of(node, where)).parameters
    for key, value in _FIXED.items():
        if key in params:
            node[key] = value
    for key, value in shared.items():
        if value is not None and key in params and key not in user_keys:
            node[key] = value
    try:
        stream = build(node, where, scenario="class_il", seed=seed)
    except CLBenchError as exc:  # the loader names its options as dataset.<key>: here they sit under components
        raise CLBenchError(re.sub(r"\bdataset\.(?=[a-z_])", f"dataset.components.{name}.", str(exc))) from None
    if len(stream.tasks) != 1:
        raise CLBenchError(f"{where} built {len(stream.tasks)} tasks with num_tasks=1; a sequence needs one task per dataset")
    return stream


def _conform(x: torch.Tensor, channels: int, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 images (N, C, H, W) with `channels` channels (grey repeated) at size x size."""
    if x.dim() != 4:
        raise CLBenchError(f"a dataset sequence needs image data (N, C, H, W); got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, channels):
        raise CLBenchError(f"cannot turn {x.shape[1]}-channel images into {channels} channels (only grey to RGB)")
    if x.shape[1] == channels and tuple(x.shape[2:]) == (size, size):
        return x
    out = torch.empty((len(x), channels, size, size), dtype=torch.uint8)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].float()
        if tuple(part.shape[2:]) != (size, size):
            part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8).expand(-1, channels, -1, -1)
    return out


def dataset_sequence(
    scenario: str = "task_il",
    seed: int = 0,
    tasks: Sequence[Any] = ("split_digits", "split_mnist5k"),
    components: Optional[Mapping[str, Any]] = None,
    image_size: Optional[int] = None,
    channels: Optional[int] = None,
    normalise: str = "data",
    augment: str = "none",
    max_train_per_class: Optional[int] = None,
    val_fraction: float = 0.0,
) -> Stream:
    """One task per dataset of `tasks` (see the module docstring)."""
    from cl_bench.data.images import NORMALISATIONS, normalisation

    if scenario == "domain_il":
        raise CLBenchError("dataset=sequence: the datasets of a sequence do not share labels, so domain_il has no "
                           "meaning; use scenario=task_il (a head per dataset) or class_il (one head over all)")
    if normalise not in NORMALISATIONS:
        raise CLBenchError(f"dataset.normalise must be one of {', '.join(NORMALISATIONS)}, got {normalise!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise CLBenchError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
    if image_size is not None and image_size < 8:
        raise CLBenchError(f"dataset.image_size must be at least 8, got {image_size}")
    tasks = list(tasks or [])
    if len(tasks) < 1:
        raise CLBenchError("dataset.tasks must name at least one dataset, e.g. [split_digits,split_mnist5k]")
    shared = {"max_train_per_class": max_train_per_class, "image_size": image_size}
    names, parts = [], []
    for i, entry in enumerate(tasks):
        name, node, user_keys = component_config(entry, components or {}, i)
        stream = _load_component(name, node, user_keys, i, seed, shared)
        names.append(name)
        parts.append(stream.tasks[0])
    shapes = [tuple(p.train.x.shape[1:]) for p in parts]
    if not all(len(s) == 3 for s in shapes):
        raise CLBenchError(f"dataset=sequence needs image datasets; the components give samples of shapes {shapes}")
    size = image_size or max(max(s[1:]) for s in shapes)
    channels = channels or max(s[0] for s in shapes)
    if normalise == "imagenet" and channels != 3:
        raise CLBenchError(f"dataset.normalise=imagenet needs RGB images; set dataset.channels=3 (it is {channels})")
    gen = torch.Generator().manual_seed(seed)
    out_tasks, offset = [], 0
    for t, (name, part) in enumerate(zip(names, parts)):
        k = len(part.classes)
        ids = list(range(offset, offset + k))

        def shifted(split: Split) -> Split:
            return Split(_conform(split.x, channels, size), split.y.to(torch.long) + offset)

        train, test = shifted(part.train), shifted(part.test)
        val = None
        if val_fraction > 0:
            perm = torch.randperm(len(train), generator=gen)
            n_val = max(1, int(round(val_fraction * len(train))))
            val, train = train.subset(perm[:n_val]), train.subset(perm[n_val:])
        out_tasks.append(Task(t, ids, ids, train, test, val, name=name))
        offset += k
    transform = normalisation(normalise, [task.train.x for task in out_tasks])
    stream = Stream(
        name="sequence", tasks=out_tasks, scenario=scenario, num_classes=offset, num_outputs=offset,
        input_shape=(channels, size, size), transform=transform, class_order=list(range(offset)),
    )
    return with_augmentation(stream, augment, padding=max(1, size // 8))
