"""Image-file datasets (JPEG/PNG folders and archives as their official downloads unpack):
decoding, a decode-once cache, and the stream built from the decoded arrays.

- `decode_image(path, size)`: Pillow decode, optional bounding-box crop, the shorter side
  resized to `size` (antialiased bilinear) and the centre square kept, as (3, size, size)
  uint8. A file Pillow cannot read is one `CLBenchError` naming it.
- `decode_all(paths, size, ...)`: the same for a list of files in parallel threads (Pillow
  releases the GIL), with a progress bar on stderr.
- `cached_image_splits(...)`: every split of a dataset decoded once into
  `<cache_dir>/<name>-<size>px-<hash>/<split>_{x,y}.npy`, keyed by the file lists, the
  labels, the size and the crops, written atomically (a `complete` marker last). Later runs
  memory-map the arrays (copy-on-write), so a dataset larger than RAM is read from disk
  page by page as batches index it, and nothing is decoded again.
- `image_stream(...)`: the class-incremental stream of decoded images, normalised with the
  data's own per-channel statistics (`normalise=data`) or ImageNet's (`normalise=imagenet`,
  what an ImageNet-pretrained backbone expects), with the usual batch augmentation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from cl_bench import CLBenchError
from cl_bench.data.sources import corrupt_file_error, default_data_root, normalising_transform, with_augmentation
from cl_bench.data.stream import BatchTransform, Split, Stream, class_incremental_stream

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
CACHE_VERSION = 1
# torchvision's ImageNet normalisation (the statistics its pretrained weights were trained with)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATIONS = ("data", "imagenet")

Box = Optional[Sequence[float]]  # (left, top, right, bottom) in pixels


def decode_image(path: Path | str, size: int, dataset: str = "images", box: Box = None) -> np.ndarray:
    """(3, size, size) uint8: `box` cropped first (when given), the shorter side resized to
    `size`, the centre square kept."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if box is None:
                img.draft("RGB", (size, size))  # JPEG: let the decoder downscale by 2^k for free
            img = img.convert("RGB")
            if box is not None:
                left, top, right, bottom = (float(v) for v in box)
                left, top = max(0.0, left), max(0.0, top)
                right, bottom = min(float(img.width), right), min(float(img.height), bottom)
                if right > left and bottom > top:
                    img = img.crop((int(left), int(top), int(round(right)), int(round(bottom))))
            w, h = img.size
            scale = size / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError) as exc:
        raise corrupt_file_error(dataset, path, f"Pillow cannot decode it: {exc}") from None


def decode_all(
    paths: Sequence[Path | str],
    size: int,
    description: str,
    decode: Optional[Callable[[int], np.ndarray]] = None,
    dataset: str = "images",
    boxes: Optional[Sequence[Box]] = None,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """All `paths` decoded into one (N, 3, size, size) uint8 array (`out` when given, e.g. a
    memory-mapped file). `decode(i)` replaces the default per-image decode."""
    from rich.progress import Progress

    if decode is None:
        decode = lambda i: decode_image(paths[i], size, dataset, boxes[i] if boxes is not None else None)  # noqa: E731
    if out is None:
        out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    workers = max(1, min(16, os.cpu_count() or 1))
    with Progress(transient=False) as progress, ThreadPoolExecutor(workers) as pool:
        bar = progress.add_task(description, total=len(paths))
        for i, image in enumerate(pool.map(decode, range(len(paths)), chunksize=64)):
            out[i] = image
            progress.advance(bar)
    return out


def cache_folder(cache_dir: Optional[str]) -> Path:
    """`dataset.cache_dir`, else `cache/` under the data dir."""
    return Path(cache_dir).expanduser().resolve() if cache_dir else default_data_root().resolve() / "cache"


def _memory_mapped(path: Path) -> torch.Tensor:
    # copy-on-write: pages are read lazily from disk, and torch gets a writable array (no warning);
    # nothing is ever written back to the file
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def cached_image_splits(
    dataset: str,
    parts: Mapping[str, tuple[Sequence[Path], Sequence[int]]],
    image_size: int,
    cache_dir: Path,
    boxes: Optional[Mapping[str, Sequence[Box]]] = None,
) -> dict[str, Split]:
    """{split: Split} of every `parts[split] = (image paths, labels)`, decoded once into the cache."""
    from rich.console import Console

    if image_size < 8:
        raise CLBenchError(f"dataset.image_size must be at least 8, got {image_size}")
    boxes = boxes or {}
    ident = {
        "v": CACHE_VERSION, "size": image_size,
        "parts": {k: [[str(p) for p in paths], [int(y) for y in labels], boxes.get(k)] for k, (paths, labels) in parts.items()},
    }
    key = hashlib.sha256(json.dumps(ident, default=list).encode()).hexdigest()[:16]
    folder = cache_dir / f"{dataset}-{image_size}px-{key}"
    console = Console(stderr=True)
    if not (folder / "complete").is_file():
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            for name, (paths, labels) in parts.items():
                x = np.lib.format.open_memmap(tmp / f"{name}_x.npy", "w+", np.uint8, (len(paths), 3, image_size, image_size))
                decode_all(paths, image_size, f"decoding {dataset} {name} ({len(paths)} images)",
                           dataset=dataset, boxes=boxes.get(name), out=x)
                x.flush()
                del x
                np.save(tmp / f"{name}_y.npy", np.asarray(labels, dtype=np.int64))
            (tmp / "complete").write_text(json.dumps(ident)[:100000])
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        console.print(f"{dataset}: decoded into {folder}; later runs reuse it")
    try:
        return {name: Split(_memory_mapped(folder / f"{name}_x.npy"), torch.from_numpy(np.load(folder / f"{name}_y.npy")))
                for name in parts}
    except (OSError, ValueError) as exc:
        raise corrupt_file_error(dataset, folder, f"unreadable cache: {exc}; delete the folder to rebuild it") from None


def image_stream(
    name: str,
    train: Split,
    test: Split,
    scenario: str,
    seed: int,
    num_tasks: int,
    class_order: Any = "natural",
    val_fraction: float = 0.0,
    max_train_per_class: Optional[int] = None,
    first_task_classes: Optional[int] = None,
    augment: str = "crop_flip",
    normalise: str = "data",
    padding: Optional[int] = None,
) -> Stream:
    """The class-incremental stream of decoded images (see the module docstring)."""
    transform = normalisation(normalise, train.x)
    stream = class_incremental_stream(
        name, train, test, scenario, seed, num_tasks, class_order, val_fraction, max_train_per_class,
        transform=transform, first_task_classes=first_task_classes,
    )
    return with_augmentation(stream, augment, padding=padding if padding is not None else max(1, train.x.shape[-1] // 8))


def normalisation(normalise: str, x: torch.Tensor | Sequence[torch.Tensor]) -> BatchTransform:
    """`data`: the per-channel mean and std of uint8 images `x` (a tensor, or several taken together);
    `imagenet`: torchvision's."""
    if normalise == "imagenet":
        channels = (x if isinstance(x, torch.Tensor) else x[0]).shape[1]
        if channels != 3:
            raise CLBenchError(f"dataset.normalise=imagenet needs RGB images, these have {channels} channel(s)")
        return BatchTransform(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if normalise == "data":
        return normalising_transform(x)
    raise CLBenchError(f"dataset.normalise must be one of {', '.join(NORMALISATIONS)}, got {normalise!r}")


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file, stripped."""
    return [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def list_image_files(folder: Path) -> list[str]:
    """Names of the JPEG/PNG files directly in `folder`, sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
