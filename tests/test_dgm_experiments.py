"""The named DGM experiments (conf/experiment/dgm_*.yaml): each composes with the settings of
Ostapenko et al.'s code (github.com/SAP-archive/machine-learning-dgm) and runs end to end on tiny
files in the real on-disk formats, shrunk by overrides."""

from __future__ import annotations

import pytest

from tests.conftest import compose_cfg
from tests.real_format import ONE_THREAD, prepare, write_image_tree

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (experiment, dataset config its files are written for, keys the experiment must set to the authors' values)
EXPERIMENTS = {
    "dgm_mnist": ("split_mnist", {"dataset.num_tasks": 10, "strategy.latent_dim": 128, "strategy.generator_lr": 0.002,
                                  "strategy.sparsity_weight": 0.08, "strategy.generator_passes": 101,
                                  "train.batch_size": 64, "train.lr": 0.002}),
    "dgm_svhn": ("split_svhn", {"dataset.num_tasks": 10, "dataset.augment": "none", "strategy.generator_lr": 0.0005,
                                "strategy.sparsity_weight": 0.001, "strategy.generator_passes": 151,
                                "train.lr": 0.0005}),
    "dgm_cifar10": ("split_cifar10", {"dataset.num_tasks": 10, "dataset.augment": "none",
                                      "strategy.generator_passes": 151, "train.lr": 0.0005}),
    "dgm_imagenet50": ("imagenet_subset", {"dataset.class_list": "imagenet50.txt", "dataset.num_tasks": 5,
                                           "dataset.image_size": 32, "dataset.augment": "none",
                                           "strategy.generator_width": 64, "strategy.generator_batch_size": 70,
                                           "strategy.generator_lr": 0.0002, "train.batch_size": 70}),
}
# one epoch, one generator pass, a tiny generator and batches: the protocol stays, the cost goes
SHRINK = ("train.epochs=1", "train.batch_size=8", "strategy.generator_passes=1", "strategy.generator_width=4",
          "strategy.latent_dim=8", "strategy.generator_batch_size=8", "checkpoint=false")


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_carries_the_authors_settings(name):
    from omegaconf import OmegaConf

    cfg = compose_cfg(f"experiment={name}")
    _, expected = EXPERIMENTS[name]
    assert cfg.scenario == "class_il" and cfg.strategy.mask == "weights"  # DGM-w, as the authors' code runs
    assert cfg.strategy._target_ == "cl_bench.strategies.dgm.DGM" and cfg.strategy.s_max == 1e4
    assert cfg.train.optimizer == "adam" and cfg.train.epochs == 1
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key
    backbone = "cl_bench.models.resnet.ResNet18" if name == "dgm_imagenet50" else "cl_bench.models.cnn.CNN"
    assert cfg.backbone._target_ == backbone


def test_imagenet50_is_the_authors_first_five_tasks():
    """imagenet50.txt: indices [1, 15, ..., 99] + 100 t (t = 0..4) of the sorted ILSVRC-2012 ids, 10 per task."""
    from cl_bench.data.imagenet import read_class_list

    wnids = read_class_list("imagenet50.txt")
    assert len(wnids) == len(set(wnids)) == 50
    assert wnids[:2] == ["n01443537", "n01558993"]  # class 1 (goldfish), class 15 (robin)
    assert wnids[-1] == "n03041632"  # class 499 (cleaver)
    assert wnids == sorted(wnids)  # indices grow task by task, so the sorted ids keep that order


def _files(name: str, folder) -> list[str]:
    dataset, _ = EXPERIMENTS[name]
    if name != "dgm_imagenet50":
        return prepare(dataset, folder)
    from cl_bench.data.imagenet import read_class_list

    # prepare("imagenet_subset") writes the ImageNet-100 classes; ImageNet-50 needs its own folders
    write_image_tree(folder / "imagenet", read_class_list("imagenet50.txt"), n_train=1, n_val=1, size=10)
    # 8 px keeps the ResNet-18 discriminator cheap on a CPU
    return [f"dataset.root={folder / 'imagenet'}", f"dataset.cache_dir={folder / 'cache'}", "dataset.image_size=8",
            ONE_THREAD]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_runs_on_real_format_files(name, tmp_path):
    from cl_bench.runner import Runner

    small = ["dataset.max_train_per_class=4"]
    if name != "dgm_imagenet50":
        small.append("backbone.channels=[4,8,8]")
    cfg = compose_cfg(f"experiment={name}", *_files(name, tmp_path / "data"), *SHRINK, *small)
    summary = Runner(cfg, tmp_path / "run").run()
    tasks = EXPERIMENTS[name][1]["dataset.num_tasks"]
    R = summary["accuracy_matrix"]
    assert summary["status"] == "completed" and len(R) == tasks and all(len(row) == tasks for row in R)
    # each task of one class (MNIST, SVHN, CIFAR-10) or ten (ImageNet-50) trained DGM-w's masked generator
    info = summary["strategy_info"]
    assert info["mask"] == "weights" and info["generator_hidden_units"]
    assert all(0.0 <= f <= 1.0 for f in info["mask_used_fraction"].values())
