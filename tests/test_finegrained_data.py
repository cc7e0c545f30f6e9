"""CUB-200-2011, Stanford Cars and Flowers-102 loaders on tiny files in the real layouts
(tests/real_format_finegrained.py): counts, labels and the official split, pixels, the decode-once
cache, the cap applied before decoding, and one-line errors for missing and damaged files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import cl_bench.data.images as images
from cl_bench import CLBenchError
from cl_bench.data.cub200 import cub200
from cl_bench.data.flowers102 import flowers102
from cl_bench.data.stanford_cars import stanford_cars
from tests import real_format_finegrained as rff

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOADERS = {"cub200": cub200, "stanford_cars": stanford_cars, "flowers102": flowers102}
EXTRA = {"cub200": {}, "stanford_cars": {}, "flowers102": {"verify": False}}
SIZE = rff.IMAGE_SIZE


def load(name: str, written: rff.Written, tmp_path: Path, **kwargs):
    args = dict(root=str(written.root), cache_dir=str(tmp_path / "cache"), image_size=SIZE, num_tasks=2,
                download=False, augment="none", **EXTRA[name])
    return LOADERS[name](**{**args, **kwargs})


@pytest.fixture
def decodes(monkeypatch) -> list:
    """Every image path decoded from now on."""
    seen: list = []
    real = images.decode_image
    monkeypatch.setattr(images, "decode_image", lambda path, *a, **k: seen.append(Path(path)) or real(path, *a, **k))
    return seen


def pillow_decode(path: Path, box=None) -> np.ndarray:
    """Pillow's decode of an image whose (box-cropped) shorter side is SIZE: only the centre crop remains."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"))
    if box is not None:
        left, top, right, bottom = box
        pixels = pixels[top:bottom, left:right]
    h, w = pixels.shape[:2]
    assert min(h, w) == SIZE
    top, left = (h - SIZE) // 2, (w - SIZE) // 2
    return pixels[top:top + SIZE, left:left + SIZE].transpose(2, 0, 1)


def all_samples(stream, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [getattr(t, split) for t in stream.tasks]
    return torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])


# ----- what the loaders read ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOADERS))
def test_official_split_labels_and_pixels(name, tmp_path):
    """Each split holds exactly the images the annotation files assign to it, in their order, with
    0-based labels; every image equals its own Pillow decode (shorter side resized, centre square)."""
    written = rff.WRITERS[name](tmp_path / "data")
    stream = load(name, written, tmp_path)
    assert stream.num_classes == 4 and [t.classes for t in stream.tasks] == [[0, 1], [2, 3]]
    assert stream.input_shape == (3, SIZE, SIZE)
    assert LOADERS[name].num_classes == {"cub200": 200, "stanford_cars": 196, "flowers102": 102}[name]
    for split, expected in (("train", written.train), ("test", written.test)):
        x, y = all_samples(stream, split)
        # tasks take their classes' samples in the split's order: the expected list grouped the same way
        order = sorted(range(len(expected)), key=lambda i: expected[i][1] // 2)
        assert y.tolist() == [expected[i][1] for i in order]
        direct = np.stack([images.decode_image(expected[i][0], SIZE) for i in order])
        assert np.array_equal(x.numpy(), direct)
    # the first written image's shorter side is already SIZE: the loader's pixels are Pillow's, centre-cropped
    (split, label), = [(s, lab) for s in ("train", "test") for p, lab, _ in getattr(written, s)
                       if p == written.first_image]
    x, y = all_samples(stream, split)
    matches = [i for i in range(len(x)) if np.array_equal(x[i].numpy(), pillow_decode(written.first_image))]
    assert len(matches) == 1 and int(y[matches[0]]) == label


def test_flowers_train_split_option(tmp_path):
    """train+val (Piggyback/PackNet's 2,040-image training set) by default; train: trnid alone."""
    rff.write_flowers(tmp_path / "data")
    both = flowers102(root=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"), image_size=SIZE, num_tasks=2,
                      download=False, verify=False)
    only = flowers102(root=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"), image_size=SIZE, num_tasks=2,
                      download=False, verify=False, train_split="train")
    assert sum(len(t.train) for t in both.tasks) == 4 * 4 and sum(len(t.train) for t in only.tasks) == 4 * 2
    assert sum(len(t.test) for t in both.tasks) == sum(len(t.test) for t in only.tasks) == 4 * 3
    expected = rff.write_flowers(tmp_path / "again", train_split="train")
    x, _ = all_samples(only, "train")
    assert {images.decode_image(p, SIZE).tobytes() for p, _, _ in expected.train} == {r.numpy().tobytes() for r in x}
    with pytest.raises(CLBenchError, match="train_split must be one of train, train\\+val"):
        flowers102(root=str(tmp_path / "data"), train_split="val", download=False)


@pytest.mark.parametrize("name", ["cub200", "stanford_cars"])
def test_bounding_box_crop(name, tmp_path):
    """crop_boxes=true: each image cut to its annotated box (CUB x/y/w/h, Cars 1-based x1..x2), then resized."""
    written = rff.WRITERS[name](tmp_path / "data")
    stream = load(name, written, tmp_path, crop_boxes=True)
    x, y = all_samples(stream, "train")
    order = sorted(range(len(written.train)), key=lambda i: written.train[i][1] // 2)
    expected = np.stack([pillow_decode(written.train[i][0], written.train[i][2]) for i in order])
    assert np.array_equal(x.numpy(), expected)
    uncropped = load(name, written, tmp_path)
    assert not torch.equal(all_samples(uncropped, "train")[0], x)


# ----- cache and cap -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LOADERS))
def test_decoded_once_then_read_from_the_cache(name, tmp_path, decodes):
    written = rff.WRITERS[name](tmp_path / "data")
    first = load(name, written, tmp_path)
    assert sorted(decodes) == sorted(p for p, _, _ in written.train + written.test)
    decodes.clear()
    second = load(name, written, tmp_path, num_tasks=4, class_order="random")
    assert decodes == []  # another task split of the same images: nothing decoded again
    assert torch.equal(all_samples(second, "test")[0].sum(0), all_samples(first, "test")[0].sum(0))
    load(name, written, tmp_path, image_size=SIZE + 4)
    assert len(decodes) == len(written.train) + len(written.test)  # a new size is a new cache


@pytest.mark.parametrize("name", list(LOADERS))
def test_max_train_per_class_caps_the_file_list_before_decoding(name, tmp_path, decodes):
    written = rff.WRITERS[name](tmp_path / "data")
    stream = load(name, written, tmp_path, max_train_per_class=1)
    kept = {}
    for path, label, _ in written.train:
        kept.setdefault(label, path)  # the first file of each class in the official order
    train_decoded = [p for p in decodes if p not in {q for q, _, _ in written.test}]
    assert sorted(train_decoded) == sorted(kept.values())
    x, y = all_samples(stream, "train")
    assert sorted(y.tolist()) == [0, 1, 2, 3]
    assert len(all_samples(stream, "test")[1]) == len(written.test)  # the test set is never capped
    with pytest.raises(CLBenchError, match="max_train_per_class must be at least 1"):
        load(name, written, tmp_path, max_train_per_class=0)
    decodes.clear()
    for bad, key in (({"normalise": "imagenette"}, "normalise"), ({"augment": "flip"}, "augment"),
                     ({"image_size": 4}, "image_size")):
        with pytest.raises(CLBenchError, match=f"dataset.{key} must"):
            load(name, written, tmp_path, **bad)
    assert decodes == []  # refused before decoding anything


# ----- missing and damaged files ---------------------------------------------------------------------


MISSING = {
    "cub200": ["CUB_200_2011/images.txt", "CUB_200_2011/image_class_labels.txt", "CUB_200_2011/train_test_split.txt"],
    "stanford_cars": ["stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
                      "stanford_cars/cars_test_annos_withlabels.mat"],
    "flowers102": ["flowers-102/imagelabels.mat", "flowers-102/setid.mat"],
}


@pytest.mark.parametrize("name, relative", [(n, r) for n, rs in MISSING.items() for r in rs])
def test_a_missing_annotation_file_is_one_line_naming_it(name, relative, tmp_path):
    written = rff.WRITERS[name](tmp_path / "data")
    (written.root / relative).unlink()
    with pytest.raises(CLBenchError) as info:
        load(name, written, tmp_path)
    msg = str(info.value)
    assert relative in msg and str(written.root) in msg and f"dataset={name}" in msg and "\n" not in msg
    assert ("official site no longer serves" if name == "stanford_cars" else "dataset.download=false") in msg


def test_missing_folders_and_the_box_file(tmp_path):
    written = rff.write_cub(tmp_path / "data")
    (written.root / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    load("cub200", written, tmp_path)  # not needed without crop_boxes
    with pytest.raises(CLBenchError, match="CUB_200_2011/bounding_boxes.txt .*unpack CUB_200_2011.tgz"):
        load("cub200", written, tmp_path, crop_boxes=True)
    with pytest.raises(CLBenchError, match="CUB_200_2011/images.txt, .*CUB_200_2011/images "):
        load("cub200", rff.Written(tmp_path / "empty"), tmp_path)
    with pytest.raises(CLBenchError, match="Put stanford_cars/cars_test .*torchvision.datasets.StanfordCars"):
        written = rff.write_cars(tmp_path / "cars")
        for f in (written.root / "stanford_cars" / "cars_test").iterdir():
            f.unlink()
        (written.root / "stanford_cars" / "cars_test").rmdir()
        load("stanford_cars", written, tmp_path)


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_missing_image_is_named(name, tmp_path):
    written = rff.WRITERS[name](tmp_path / "data")
    path = written.test[1][0]
    path.unlink()
    with pytest.raises(CLBenchError) as info:
        load(name, written, tmp_path)
    msg = str(info.value)
    assert str(path.relative_to(written.root)) in msg and "not found" in msg and "\n" not in msg


@pytest.mark.parametrize("name", list(LOADERS))
def test_a_truncated_image_is_named(name, tmp_path):
    written = rff.WRITERS[name](tmp_path / "data")
    path = written.train[2][0]
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        load(name, written, tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not list((tmp_path / "cache").glob(f"{name}-*/complete"))  # no half-built cache left to reuse


def test_damaged_annotation_files_are_named(tmp_path):
    cub = rff.write_cub(tmp_path / "cub")
    labels = cub.root / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("\n5 1\n", "\n5 201\n"))
    with pytest.raises(CLBenchError, match=f"{labels}.*labels range 1..201, expected 1..200"):
        load("cub200", cub, tmp_path)
    labels.write_text("\n".join(labels.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(CLBenchError, match="image_class_labels.txt is corrupt.*lacks image id 20"):
        load("cub200", cub, tmp_path)

    cars = rff.write_cars(tmp_path / "cars")
    mat = cars.root / "stanford_cars" / "devkit" / "cars_train_annos.mat"
    mat.write_bytes(mat.read_bytes()[:200])
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        load("stanford_cars", cars, tmp_path)
    assert str(mat) in str(info.value) and "cars_meta.mat" not in str(info.value)

    flowers = rff.write_flowers(tmp_path / "flowers")
    setid = flowers.root / "flowers-102" / "setid.mat"
    with pytest.raises(CLBenchError, match="imagelabels.mat is corrupt.*MD5 is not the official"):
        load("flowers102", flowers, tmp_path, verify=True)
    setid.write_bytes(setid.read_bytes()[:100])
    with pytest.raises(CLBenchError, match="setid.mat is corrupt or truncated"):
        load("flowers102", flowers, tmp_path)


def test_a_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(CLBenchError) as info:
        cub200(root=str(tmp_path), download=True)
    msg = str(info.value)
    assert "could not be downloaded (<urlopen error" in msg and "CUB_200_2011/images.txt" in msg
    assert "data.caltech.edu/records/65de6-vp158" in msg and "\n" not in msg

    monkeypatch.setattr(torchvision.datasets, "Flowers102", lambda *a, **k: offline())
    with pytest.raises(CLBenchError) as info:
        flowers102(root=str(tmp_path), download=True)
    msg = str(info.value)
    assert "flowers-102/imagelabels.mat" in msg and "could not be downloaded (<urlopen error" in msg

    with pytest.raises(CLBenchError, match="official site no longer serves the files") as info:
        stanford_cars(root=str(tmp_path), download=True)
    assert "stanford_cars/devkit/cars_meta.mat" in str(info.value)


# ----- through the config ----------------------------------------------------------------------------


def test_prepare_covers_only_these_datasets(tmp_path):
    assert rff.prepare("split_mnist", tmp_path) is None and not tmp_path.joinpath("data").exists()
    overrides = rff.prepare("flowers102", tmp_path)
    assert f"dataset.root={tmp_path / 'data'}" in overrides and "dataset.verify=false" in overrides


@pytest.mark.parametrize("name, bad", [("cub200", 7), ("stanford_cars", 3), ("flowers102", 4)])
def test_num_tasks_that_do_not_divide_the_real_classes_are_refused_before_loading(name, bad, tmp_path):
    from cl_bench.runner import Runner
    from tests.conftest import compose_cfg

    with pytest.raises(CLBenchError, match=f"num_tasks={bad} does not divide the {LOADERS[name].num_classes} classes"):
        Runner(compose_cfg(f"dataset={name}", f"dataset.num_tasks={bad}", f"dataset.root={tmp_path}"),
               tmp_path / "run").run()


@pytest.mark.parametrize("name", list(LOADERS))
def test_runs_through_the_cli_config(name, tmp_path):
    from cl_bench.runner import Runner
    from tests.conftest import compose_cfg

    overrides = rff.prepare(name, tmp_path)
    summary = Runner(compose_cfg("experiment=smoke", f"dataset={name}", *overrides), tmp_path / "run").run()
    R = np.asarray(summary["accuracy_matrix"])
    assert R.shape == (2, 2) and np.isfinite(R).all()
    assert summary["config"]["backbone"]["_target_"].endswith("ResNet18")  # the datasets' default backbone
