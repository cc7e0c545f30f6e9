"""The papers' named experiments (conf/experiment/ + conf/experiment_method/): each composes with its
paper's settings for every method it has, and runs end to end on tiny files in the real formats with
its own backbone loaded from a weights file written with torchvision's architecture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cl_bench.runner import Runner
from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (experiment, strategy) -> keys the composed config must hold (the authors' values)
SETTINGS = {
    ("piggyback_finegrained", "piggyback"): {
        "strategy.mask_lr": 1e-4, "strategy.mask_init": 0.01, "strategy.threshold": 0.005,
        "strategy.task_batchnorm": False, "train.optimizer": "adam", "train.lr": 1e-4, "train.epochs": 30,
        "train.milestones": [15], "train.batch_size": 32, "backbone.pretrained": "imagenet"},
    ("piggyback_finegrained", "individual_networks"): {
        "train.optimizer": "sgd", "train.lr": 1e-3, "train.momentum": 0.9, "train.milestones": [15]},
    ("piggyback_finegrained", "feature_extraction"): {
        "train.optimizer": "sgd", "train.lr": 1e-3, "train.momentum": 0.9, "train.scheduler": "none"},
    ("packnet_finegrained", "packnet"): {
        "strategy.prune_ratio": 0.75, "strategy.retrain_epochs": 10, "strategy.pretrained_prune_ratio": 0.5,
        "strategy.task_batchnorm": False, "train.optimizer": "sgd", "train.lr": 1e-3, "train.epochs": 20,
        "train.milestones": [10]},
    ("packnet_finegrained", "feature_extraction"): {"train.scheduler": "none", "train.lr": 1e-3},
    ("lwf_imagenet_to_x", "lwf"): {
        "strategy.alpha": 1.0, "strategy.temperature": 2.0, "strategy.warmup_epochs": 5, "train.lr": 1e-3,
        "train.epochs": 20, "train.milestones": [10]},
}
DATASETS = {
    "piggyback_finegrained": ["cub200", "stanford_cars", "flowers102", "wikiart", "sketch"],
    "packnet_finegrained": ["cub200", "stanford_cars", "flowers102"],
    "lwf_imagenet_to_x": ["imagenet_subset", "voc2012"],
}
BACKBONE = {"piggyback_finegrained": "vgg16", "packnet_finegrained": "vgg16", "lwf_imagenet_to_x": "alexnet"}


@pytest.mark.parametrize("experiment,strategy", sorted(SETTINGS))
def test_experiment_carries_the_papers_settings_per_method(experiment, strategy):
    from omegaconf import OmegaConf

    cfg = compose_cfg(f"experiment={experiment}", f"strategy={strategy}")
    assert cfg.scenario == "task_il" and cfg.dataset._target_ == "cl_bench.data.sequence.dataset_sequence"
    assert [t if isinstance(t, str) else t["name"] for t in cfg.dataset.tasks] == DATASETS[experiment]
    assert cfg.dataset.image_size == 224 and cfg.dataset.normalise == "imagenet"
    assert cfg.backbone._target_.rsplit(".", 1)[1].lower() == BACKBONE[experiment]
    for key, value in SETTINGS[(experiment, strategy)].items():
        got = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_object(got) if OmegaConf.is_config(got) else getattr(got, "value", got)) == value, key


def test_a_method_without_a_paper_file_runs_the_protocol_with_its_own_defaults():
    cfg = compose_cfg("experiment=piggyback_finegrained", "strategy=packnet")
    assert cfg.strategy.prune_ratio == 0.5 and cfg.train.epochs == 30  # packnet's defaults, Piggyback's schedule
    assert compose_cfg("strategy=piggyback").strategy.mask_lr == 1e-3  # outside the experiment: the shipped default


def _component_overrides(names: list[str], folder) -> list[str]:
    """Each component's real-format files, its loader options moved under dataset.components.<name>."""
    from tests.real_format import prepare

    out = []
    for name in names:
        for override in prepare(name, folder / name):
            key, value = override.split("=", 1)
            if not key.startswith("dataset."):
                out.append(override)
            elif key.split(".", 1)[1] not in ("num_tasks", "first_task_classes", "image_size"):
                out.append(f"+dataset.components.{name}.{key.split('.', 1)[1]}={value}")
    return sorted(set(out))


def _weights_file(backbone: str, path) -> str:
    import torchvision

    torch.manual_seed(0)
    torch.save(getattr(torchvision.models, backbone)(weights=None).state_dict(), path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("experiment,strategy", [("piggyback_finegrained", "piggyback"),
                                                 ("packnet_finegrained", "packnet"),
                                                 ("lwf_imagenet_to_x", "lwf")])
def test_experiment_runs_on_tiny_real_format_files(experiment, strategy, tmp_path):
    """The whole experiment on a few images per class of every dataset, 32 px, one epoch: a task per
    dataset, earlier datasets' accuracies exactly kept by the isolation methods."""
    weights = _weights_file(BACKBONE[experiment], tmp_path / "weights.pth")
    cfg = compose_cfg(f"experiment={experiment}", f"strategy={strategy}", f"backbone.weights={weights}",
                      *_component_overrides(DATASETS[experiment], tmp_path / "data"), "dataset.image_size=32",
                      "train.epochs=1", "train.batch_size=16", "checkpoint=false",
                      *(["strategy.retrain_epochs=1"] if strategy == "packnet" else []),
                      *(["strategy.warmup_epochs=1"] if strategy == "lwf" else []))
    s = Runner(cfg, tmp_path / "run").run()
    R = np.asarray(s["accuracy_matrix"])
    assert s["task_names"] == DATASETS[experiment] and R.shape == (len(DATASETS[experiment]),) * 2
    assert np.isfinite(R).all()
    if strategy in ("piggyback", "packnet"):
        for t in range(len(R)):
            assert (R[t:, t] == R[t, t]).all(), R  # no forgetting, exactly
        info = s["strategy_info"]
        assert len(info["storage_bytes_per_task"]) == len(R)
        assert all(0 < x < 0.2 for x in info["storage_vs_copy_per_task"])  # a mask and a head, not a copy


def test_piggyback_mask_learning_rate_follows_the_schedule(tmp_path):
    """The authors decay the mask's lr with the classifier's (lr_mask_decay_every): train.scheduler
    applies to Piggyback's mask optimizer too."""
    from cl_bench.strategies.piggyback import Piggyback

    seen = []
    real = Piggyback.train_step

    def spy(self, batch):
        seen.append((self.task, self.mask_optimizer.param_groups[0]["lr"] if self.mask_optimizer else None,
                     self.optimizer.param_groups[0]["lr"]))
        return real(self, batch)

    Piggyback.train_step = spy
    try:
        cfg = compose_cfg("strategy=piggyback", "scenario=task_il", "train.epochs=2", "train.scheduler=multistep",
                          "train.milestones=[1]", "train.gamma=0.1", "train.lr=0.02", "strategy.mask_lr=0.001",
                          "dataset.max_train_per_class=8", "checkpoint=false")
        Runner(cfg, tmp_path).run()
    finally:
        Piggyback.train_step = real
    masked = [(lr_mask, lr) for task, lr_mask, lr in seen if task >= 1]
    assert {round(m, 10) for m, _ in masked} == {1e-3, 1e-4}
    assert all(abs(m / lr - 0.05) < 1e-9 for m, lr in masked)  # both scaled alike at every step
