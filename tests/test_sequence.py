"""dataset=sequence: tasks that are whole datasets, one head per dataset (task-IL) or one over all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_bench import CLBenchError
from cl_bench.data.sequence import dataset_sequence
from cl_bench.runner import Runner
from tests.conformance_cases import BACKBONES, OPTIMIZERS
from tests.conftest import compose_cfg


def test_default_sequence_is_digits_then_mnist5k_with_shifted_labels():
    from cl_bench.data.digits import load_digits_arrays
    from cl_bench.data.mnist5k import load_mnist5k_arrays

    s = dataset_sequence()
    digits, mnist = load_digits_arrays(), load_mnist5k_arrays()
    assert [t.name for t in s.tasks] == ["split_digits", "split_mnist5k"]
    assert s.scenario == "task_il" and s.num_classes == s.num_outputs == 20
    assert s.tasks[0].outputs == list(range(10)) and s.tasks[1].outputs == list(range(10, 20))
    assert s.input_shape == (1, 28, 28)  # the largest component's size
    # every sample kept, labels shifted past the earlier datasets' classes
    assert len(s.tasks[0].train) == len(digits[0]) and len(s.tasks[1].test) == len(mnist[1])
    assert torch.equal(s.tasks[1].train.y, mnist[0].y + 10) and torch.equal(s.tasks[0].test.y, digits[1].y)
    # MNIST-5k untouched, the 8x8 digits upsampled with antialiased bilinear interpolation
    assert torch.equal(s.tasks[1].train.x, mnist[0].x)
    up = F.interpolate(digits[0].x[:5].float(), size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(s.tasks[0].train.x[:5], up.round().clamp(0, 255).to(torch.uint8))
    # normalise=data: statistics of both training sets together
    pixels = torch.cat([t.train.x.double().flatten() / 255 for t in s.tasks])
    assert s.transform.mean.item() == pytest.approx(pixels.mean().item(), rel=1e-6)
    assert s.transform.std.item() == pytest.approx(pixels.std().item(), rel=1e-6)


def test_options_channels_size_normalisation_and_validation():
    s = dataset_sequence(scenario="class_il", image_size=16, channels=3, normalise="imagenet", val_fraction=0.2,
                         tasks=["split_mnist5k", {"name": "split_digits", "max_train_per_class": 5}], seed=3)
    assert s.input_shape == (3, 16, 16) and s.scenario == "class_il"
    assert [t.name for t in s.tasks] == ["split_mnist5k", "split_digits"]
    assert s.tasks[1].classes == list(range(10, 20))
    x = s.tasks[0].train.x
    assert x.shape[1:] == (3, 16, 16) and torch.equal(x[:, 0], x[:, 2])  # grey repeated into RGB
    assert len(s.tasks[1].train) + len(s.tasks[1].val) == 50  # the component's own option: 5 per class
    assert s.transform.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    # per-name options through `components`
    c = dataset_sequence(tasks=["split_digits"], components={"split_digits": {"max_train_per_class": 3}})
    assert len(c.tasks[0].train) == 30


@pytest.mark.parametrize("kwargs,match", [
    (dict(scenario="domain_il"), "domain_il"),
    (dict(tasks=["no_such_dataset"]), "not a dataset config.*split_digits"),
    (dict(tasks=[{"root": "/x"}]), "without `name:`"),
    (dict(tasks=[{"name": "split_digits", "colour": 1}]), r"colour"),
    (dict(tasks=["sequence"]), "cannot contain a sequence"),
    (dict(tasks=[]), "at least one dataset"),
    (dict(normalise="per_task"), "normalise"),
    (dict(tasks=["split_digits"], normalise="imagenet"), "channels=3"),
])
def test_bad_sequences_fail_in_one_line(kwargs, match):
    with pytest.raises(CLBenchError, match=match) as info:
        dataset_sequence(**kwargs)
    assert "\n" not in str(info.value)


def test_file_backed_and_global_package_components(tmp_path):
    """permuted_mnist's config is a `# @package _global_` file; its loader runs on real IDX files."""
    from tests.real_format import prepare

    overrides = dict(o.split("=", 1) for o in prepare("permuted_mnist", tmp_path))
    opts = {k.split(".", 1)[1]: v for k, v in overrides.items()}
    s = dataset_sequence(tasks=["split_digits", {"name": "permuted_mnist", **opts, "download": False}])
    assert s.tasks[1].name == "permuted_mnist" and s.tasks[1].classes == list(range(10, 20))
    assert len(s.tasks[1].train) == 10 * 20  # prepare() writes 20 training digits per class


def test_run_names_and_report_per_dataset(tmp_path):
    from cl_bench.app import run_names
    from cl_bench.report import dataset_rows, find_runs

    cfg = compose_cfg("dataset=sequence", "dataset.max_train_per_class=10", "train.epochs=1", "checkpoint=false")
    assert run_names(cfg, {"dataset": "sequence", "strategy": "finetune", "backbone": "mlp"})["dataset"] == "sequence"
    for strategy in ("finetune", "packnet"):
        cfg = compose_cfg("dataset=sequence", "dataset.max_train_per_class=10", "train.epochs=1", "checkpoint=false",
                          f"strategy={strategy}")
        Runner(cfg, tmp_path / strategy, names={"strategy": strategy, "dataset": "sequence"}).run()
    rows = {r["strategy"]: r for r in dataset_rows(find_runs(tmp_path))}
    assert set(rows) == {"finetune", "packnet"}
    for name, row in rows.items():
        import json

        R = np.asarray(json.loads((tmp_path / name / "metrics.json").read_text())["accuracy_matrix"])
        assert row["datasets"] == ["split_digits", "split_mnist5k"]
        assert row["final"] == pytest.approx((R[-1] * 100).tolist())
        assert row["old_task"] == pytest.approx(R[-1, 0] * 100) and row["new_task"] == pytest.approx(R[-1, 1] * 100)


ISOLATION = ("packnet", "piggyback", "feature_extraction", "individual_networks", "hat")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("strategy", ISOLATION)
def test_isolation_keeps_the_first_dataset_exactly_on_a_batchnorm_backbone(strategy, optimizer, tmp_path):
    """Digits then MNIST-5k on a batch-norm ResNet with SGD (momentum, weight decay) and AdamW, the
    shipped strategy defaults: the first dataset's accuracy after the second equals its accuracy
    after itself (every test sample predicted the same)."""
    cfg = compose_cfg("dataset=sequence", "dataset.max_train_per_class=30", "train.epochs=4", "train.batch_size=16",
                      "checkpoint=false", "device.num_threads=1", f"strategy={strategy}",
                      *BACKBONES["resnet_bn"], *OPTIMIZERS[optimizer])
    s = Runner(cfg, tmp_path).run()
    R = np.asarray(s["accuracy_matrix"])
    assert R[1, 0] == R[0, 0], R
    assert R[0, 0] > 0.2  # learned something: ten classes, chance 0.1


def test_a_missing_component_names_its_options_under_components(tmp_path):
    with pytest.raises(CLBenchError, match=r"dataset\.components\.cub200\.root") as info:
        dataset_sequence(tasks=["split_digits", {"name": "cub200", "root": str(tmp_path), "download": False}],
                         image_size=16)
    assert "\n" not in str(info.value) and "dataset=cub200" in str(info.value)
