"""WikiArt, Sketch, MIT Indoor, VOC 2012 and Places365 loaders on tiny files in their real layouts
(tests/real_format_scenes.py): splits, labels, pixels, the decode cache, the cap before decoding, and
the one-line errors for missing and damaged files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.data import images
from tests import real_format_scenes as rs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = rs.IMAGE_SIZE


def pillow_decode(path: Path, size: int = SIZE, box=None) -> np.ndarray:
    """The expected pixels, straight from Pillow: box crop, shorter side to `size`, centre square."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if box is not None:
            im = im.crop(tuple(int(v) for v in box))
        w, h = im.size
        new_w, new_h = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
        im = im.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def all_samples(stream, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of `split` over all tasks, with its dataset label (class_il: labels are the classes)."""
    parts = [getattr(t, split) for t in stream.tasks]
    return torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts])


def assert_split_is(stream, split: str, expected, box: bool = False) -> None:
    """The split holds exactly the expected images with their labels (compared by pixels), in the
    expected order within each class."""
    x, y = all_samples(stream, split)
    assert len(y) == len(expected)
    for label in sorted({e[1] for e in expected}):
        want = [pillow_decode(e[0], box=e[2] if box else None) for e in expected if e[1] == label]
        got = x[y == label].numpy()
        assert len(got) == len(want), (split, label)
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), (split, label)


def load(name: str, root: Path, tmp_path: Path, **kwargs):
    import importlib

    fn = getattr(importlib.import_module(f"cl_bench.data.{name}"), name)
    kwargs.setdefault("num_tasks", 1)
    return fn(root=str(root), cache_dir=str(tmp_path / "cache"), image_size=SIZE, **kwargs)


# ----- MIT Indoor: the official lists --------------------------------------------------------------


def test_mit_indoor_uses_exactly_the_official_lists(tmp_path):
    w = rs.write_mit_indoor(tmp_path / "mit")
    s = load("mit_indoor", w.root, tmp_path, num_tasks=3)
    assert [t.classes for t in s.tasks] == [[0], [1], [2]]  # sorted class names: airport_inside = 0
    assert_split_is(s, "train", w.train)
    assert_split_is(s, "test", w.test)
    first_test = pillow_decode(w.test[0][0])
    assert s.tasks[w.test[0][1]].test.x.dtype == torch.uint8 and s.input_shape == (3, SIZE, SIZE)
    assert any(np.array_equal(first_test, v) for v in s.tasks[w.test[0][1]].test.x.numpy())
    unlisted = [pillow_decode(p) for p in w.unused]
    x = torch.cat([all_samples(s, "train")[0], all_samples(s, "test")[0]]).numpy()
    assert not any(np.array_equal(u, v) for u in unlisted for v in x)


def test_cache_is_reused_without_decoding(tmp_path, monkeypatch):
    w = rs.write_mit_indoor(tmp_path / "mit")
    first = load("mit_indoor", w.root, tmp_path)
    [cache] = list((tmp_path / "cache").iterdir())
    assert (cache / "complete").is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "decode_all", no_decoding)
    again = load("mit_indoor", w.root, tmp_path)
    assert torch.equal(first.tasks[0].train.x, again.tasks[0].train.x)
    assert list((tmp_path / "cache").iterdir()) == [cache]


def count_decodes(monkeypatch) -> list[str]:
    decoded: list[str] = []
    original = images.decode_image

    def counting(path, *args, **kwargs):
        decoded.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(images, "decode_image", counting)
    return decoded


def test_cap_is_applied_to_the_file_list_before_decoding(tmp_path, monkeypatch):
    w = rs.write_mit_indoor(tmp_path / "mit")
    decoded = count_decodes(monkeypatch)
    s = load("mit_indoor", w.root, tmp_path, max_train_per_class=1)
    first_per_class = [next(e for e in w.train if e[1] == c) for c in range(3)]
    assert_split_is(s, "train", first_per_class)
    assert_split_is(s, "test", w.test)  # the cap never touches the test set
    assert sorted(decoded) == sorted(str(e[0]) for e in first_per_class + w.test)


def test_mit_indoor_missing_list_and_missing_image_are_one_line_errors(tmp_path):
    w = rs.write_mit_indoor(tmp_path / "mit")
    (w.root / "TestImages.txt").rename(w.root / "TestImages.bak")
    with pytest.raises(CLBenchError) as info:
        load("mit_indoor", w.root, tmp_path)
    msg = str(info.value)
    assert "TestImages.txt" in msg and str(w.root) in msg and "\n" not in msg and "indoorCVPR_09.tar" in msg
    (w.root / "TestImages.bak").rename(w.root / "TestImages.txt")
    w.test[1][0].unlink()
    with pytest.raises(CLBenchError) as info:
        load("mit_indoor", w.root, tmp_path)
    assert str(w.test[1][0]) in str(info.value) and "\n" not in str(info.value)


def test_a_corrupt_image_is_named(tmp_path):
    w = rs.write_mit_indoor(tmp_path / "mit")
    bad = w.train[2][0]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        load("mit_indoor", w.root, tmp_path)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    assert not any(p.name.endswith("complete") for p in (tmp_path / "cache").rglob("*"))


# ----- WikiArt and Sketch: Piggyback's trees, TU-Berlin's download, list files ------------------------


def test_wikiart_piggyback_trees(tmp_path):
    w = rs.write_image_trees(tmp_path / "wikiart", rs.ARTISTS, n_train=3, n_test=2)
    s = load("wikiart", w.root, tmp_path, num_tasks=3)
    assert s.num_classes == 6 and [t.classes for t in s.tasks] == [[0, 1], [2, 3], [4, 5]]
    assert_split_is(s, "train", w.train)
    assert_split_is(s, "test", w.test)
    assert s.transform.mean.tolist() == pytest.approx(list(images.IMAGENET_MEAN))
    shutil.rmtree(w.root / "test" / rs.ARTISTS[-1])
    with pytest.raises(CLBenchError, match="differ from those of the training tree"):
        load("wikiart", w.root, tmp_path)


def test_wikiart_list_files_with_integer_labels(tmp_path):
    """ArtGAN's CSV lists: `Style/painting.jpg,<artist index>`, paths relative to the root."""
    w = rs.write_image_trees(tmp_path / "wikiart", rs.ARTISTS[:3], n_train=2, n_test=1)
    for split, entries in (("train", w.train), ("test", w.test)):
        # sparse artist indices 7, 9, 11
        rows = [f"{p.relative_to(w.root).as_posix()},{7 + 2 * label}" for p, label, _ in entries]
        (w.root / f"artist_{split}.csv").write_text("\n".join(rows) + "\n")
    s = load("wikiart", w.root, tmp_path, train_list="artist_train.csv", test_list="artist_test.csv")
    assert s.num_classes == 3  # renumbered 0.. in index order
    assert_split_is(s, "train", w.train)
    assert_split_is(s, "test", w.test)
    with pytest.raises(CLBenchError, match="both dataset.train_list and dataset.test_list"):
        load("wikiart", w.root, tmp_path, train_list="artist_train.csv")


def test_sketch_tu_berlin_download_split_by_filelist_order(tmp_path):
    w = rs.write_tu_berlin(tmp_path / "sketches", per_class=4)
    s = load("sketch", w.root, tmp_path, num_tasks=2, train_per_class=3)
    assert s.num_classes == 4 and [t.classes for t in s.tasks] == [[0, 1], [2, 3]]
    assert_split_is(s, "train", w.train)  # "alarm clock" (a space in the name) is class 1
    assert_split_is(s, "test", w.test)
    x = s.tasks[0].train.x
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grey drawings as RGB
    with pytest.raises(CLBenchError, match="train_per_class=4 leaves class 'airplane'"):
        load("sketch", w.root, tmp_path, train_per_class=4)
    # without filelist.txt: the class folders, files in numeric order (angel/9.png .. angel/12.png)
    (w.root / "png" / "filelist.txt").unlink()
    again = load("sketch", w.root, tmp_path, num_tasks=2, train_per_class=3)
    assert_split_is(again, "train", w.train)
    assert_split_is(again, "test", w.test)


def test_sketch_list_files_and_piggyback_trees(tmp_path):
    w = rs.write_tu_berlin(tmp_path / "sketches", per_class=4)
    png = w.root / "png"
    # a split given by lists (relative to png/): the LAST three of each class train
    by_class: dict[str, list[str]] = {}
    for line in (png / "filelist.txt").read_text().splitlines():
        by_class.setdefault(line.rsplit("/", 1)[0], []).append(line)
    (w.root / "train.txt").write_text("".join(f"{ln}\n" for c in by_class.values() for ln in c[1:]))
    (w.root / "test.txt").write_text("".join(f"{c[0]}\n" for c in by_class.values()))
    s = load("sketch", w.root, tmp_path, train_list="train.txt", test_list="test.txt")
    expected = {"train": [], "test": []}
    for label, c in enumerate(sorted(by_class)):
        paths = [png / ln for ln in by_class[c]]
        expected["test"].append((paths[0], label, None))
        expected["train"] += [(p, label, None) for p in paths[1:]]
    assert sum(map(len, by_class.values())) == 16
    assert_split_is(s, "train", expected["train"])
    assert_split_is(s, "test", expected["test"])
    trees = rs.write_image_trees(tmp_path / "piggyback_sketches", sorted(rs.SKETCH_CLASSES), 2, 1, suffix=".png")
    s = load("sketch", trees.root, tmp_path, num_tasks=2)
    assert_split_is(s, "train", trees.train)
    assert_split_is(s, "test", trees.test)


def test_sketch_and_wikiart_missing_data_name_both_layouts(tmp_path):
    for name, expected in (("sketch", "filelist.txt"), ("wikiart", "train/<artist>")):
        with pytest.raises(CLBenchError) as info:
            load(name, tmp_path / "empty", tmp_path)
        msg = str(info.value)
        assert f"dataset={name}" in msg and expected in msg and str(tmp_path / "empty") in msg and "\n" not in msg


# ----- VOC 2012 --------------------------------------------------------------------------------------


def test_voc_single_label_images_train_list_vs_val_list(tmp_path):
    w = rs.write_voc(tmp_path / "voc")
    s = load("voc2012", w.root, tmp_path, num_tasks=2)
    assert [t.classes for t in s.tasks] == [list(range(10)), list(range(10, 20))]
    expected = {k: [(p, y, None) for p, y in v] for k, v in w.single.items()}
    assert_split_is(s, "train", expected["train"])
    assert_split_is(s, "test", expected["val"])
    # the two-aeroplane image counts, the person+horse and the dog+difficult-sofa ones do not
    assert len(expected["train"]) == 20 * 2 + 1
    # pointing at VOC2012/ itself works too
    s2 = load("voc2012", w.root / "VOCdevkit" / "VOC2012", tmp_path, num_tasks=2)
    assert torch.equal(s2.tasks[1].test.x, s.tasks[1].test.x)


def test_voc_object_crops_skip_difficult_objects(tmp_path, monkeypatch):
    w = rs.write_voc(tmp_path / "voc")
    decoded = count_decodes(monkeypatch)
    s = load("voc2012", w.root, tmp_path, labels="objects", max_train_per_class=2)
    capped = []
    for c in range(20):
        capped += [e for e in w.objects["train"] if e[1] == c][:2]
    assert_split_is(s, "train", capped, box=True)
    assert_split_is(s, "test", w.objects["val"], box=True)
    assert len(decoded) == len(capped) + len(w.objects["val"])  # the cap came before decoding
    with pytest.raises(CLBenchError, match="dataset.labels must be one of single, objects"):
        load("voc2012", w.root, tmp_path, labels="multi")


def test_voc_missing_and_broken_annotation_files(tmp_path):
    w = rs.write_voc(tmp_path / "voc")
    main = w.root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main"
    (main / "cow_val.txt").unlink()
    with pytest.raises(CLBenchError) as info:
        load("voc2012", w.root, tmp_path)
    assert "cow_val.txt" in str(info.value) and "VOCtrainval_11-May-2012.tar" in str(info.value)
    xml = w.root / "VOCdevkit" / "VOC2012" / "Annotations" / "2008_000003.xml"
    xml.write_text(xml.read_text()[:80])
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        load("voc2012", w.root, tmp_path, labels="objects")
    assert str(xml) in str(info.value)
    with pytest.raises(CLBenchError, match="VOCdevkit"):
        load("voc2012", tmp_path / "nothing", tmp_path)


# ----- Places365 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("images_dir", ["data_256", "data_256_standard"])
def test_places365_lists_through_torchvision(tmp_path, monkeypatch, images_dir):
    w = rs.write_places365(tmp_path / "places", n_train=3, n_val=2, images_dir=images_dir)
    decoded = count_decodes(monkeypatch)
    s = load("places365", w.root, tmp_path, num_tasks=5, max_train_per_class=2, download=False, verify=False)
    assert [t.classes for t in s.tasks] == [[c] for c in range(5)]
    capped = [e for c in range(5) for e in [e for e in w.train if e[1] == c][:2]]
    assert_split_is(s, "train", capped)
    assert_split_is(s, "test", w.test)
    assert len(decoded) == len(capped) + len(w.test)


def test_places365_checksums_missing_lists_and_easy_format(tmp_path):
    w = rs.write_places365(tmp_path / "places")
    # not the official list files: the default MD5 check refuses them, naming a file
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        load("places365", w.root, tmp_path, download=False)
    assert "categories_places365.txt" in str(info.value)
    (w.root / "places365_val.txt").unlink()
    with pytest.raises(CLBenchError) as info:
        load("places365", w.root, tmp_path, download=False, verify=False)
    msg = str(info.value)
    assert "places365_val.txt" in msg and "dataset.download=false" in msg and "\n" not in msg
    easy = rs.write_image_trees(tmp_path / "places365_standard", ["airfield", "alcove"], 2, 1, test_name="val")
    s = load("places365", easy.root, tmp_path, download=False)
    assert_split_is(s, "train", easy.train)
    assert_split_is(s, "test", easy.test)


# ----- through the CLI config ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["mit_indoor", "wikiart", "sketch", "voc2012", "places365"])
def test_runs_through_the_cli_config(dataset, tmp_path):
    from cl_bench.runner import Runner
    from tests.conftest import compose_cfg

    overrides = rs.prepare(dataset, tmp_path / "data")
    s = Runner(compose_cfg("experiment=smoke", f"dataset={dataset}", *overrides), tmp_path / "run").run()
    R = np.asarray(s["accuracy_matrix"])
    assert R.shape == (s["num_tasks"], s["num_tasks"]) and s["num_tasks"] >= 2 and np.isfinite(R).all()


def test_prepare_ignores_other_datasets(tmp_path):
    assert rs.prepare("split_mnist", tmp_path) is None and not any(tmp_path.iterdir())


def test_num_classes_are_known_before_loading():
    from cl_bench.data.mit_indoor import mit_indoor
    from cl_bench.data.places365 import places365
    from cl_bench.data.sketch import sketch
    from cl_bench.data.voc2012 import voc2012
    from cl_bench.data.wikiart import wikiart

    assert [f.num_classes for f in (wikiart, sketch, mit_indoor, voc2012, places365)] == [195, 250, 67, 20, 365]
