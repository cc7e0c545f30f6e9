"""ImageNet backbones from torchvision (models/pretrained.py): weights files in the real format
(torchvision's own architectures saved with torch.save, random weights), the hub cache, refused
files, the backbone contract, the input adaptations and the masked strategies on them.

VGG-16 (138M parameters) and AlexNet (61M) tests are marked slow: building, saving and reading
them takes seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cl_bench import CLBenchError
from cl_bench.models.masked import MaskedNet
from cl_bench.models.pretrained import VGG16, AlexNet, DenseNet121, ResNet50, cache_file
from cl_bench.models.resnet import ResNet18, cached_torchvision_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAVY = {"vgg16", "alexnet"}
# backbone name -> (class, torchvision factory, weights enum, the ImageNet classifier's key prefix)
ARCHS = {
    "resnet50": (ResNet50, "resnet50", torchvision.models.ResNet50_Weights, "fc."),
    "densenet121": (DenseNet121, "densenet121", torchvision.models.DenseNet121_Weights, "classifier."),
    "vgg16": (VGG16, "vgg16", torchvision.models.VGG16_Weights, "classifier.6."),
    "alexnet": (AlexNet, "alexnet", torchvision.models.AlexNet_Weights, "classifier.6."),
}


def _arch_params(names=tuple(ARCHS)):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


def _penultimate(net: nn.Module, name: str) -> nn.Module:
    """torchvision's network cut before its last Linear: the reference for our features."""
    if name.startswith("resnet"):
        net.fc = nn.Identity()
    elif name.startswith("densenet"):
        net.classifier = nn.Identity()
    else:
        net.classifier = net.classifier[:-1]
    return net.eval()


def _reference(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None)


def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.mark.parametrize("name", _arch_params())
def test_weights_file_loads_into_the_body_the_features_are_torchvisions_and_the_head_is_new(name, tmp_path):
    """backbone.weights=<file> (torchvision's architecture, saved with torch.save): every body tensor is
    the file's, features(x) equal torchvision's penultimate activations, the head is a new Linear."""
    cls, factory, _, head = ARCHS[name]
    reference = _reference(name)
    file = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), file)
    model = cls((3, 64, 64), 7, **({} if name in HEAVY else {"small_input": "false"}), weights=str(file)).eval()
    assert model.pretrained_weights == str(file)

    body = [v for k, v in reference.state_dict().items() if not k.startswith(head)]
    mine = list(model.body.state_dict().values())
    assert len(mine) == len(body)
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, body))
    assert isinstance(model.head, nn.Linear) and model.head.weight.shape == (7, model.feature_dim)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = _penultimate(reference, name)(x)
        assert torch.allclose(model.features(x), expected, atol=1e-5)
        assert torch.allclose(model(x), model.head(expected), atol=1e-5)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and all(p.requires_grad for p in model.parameters())


def test_imagenet_weights_come_from_the_torch_hub_cache_under_torchvisions_file_name(tmp_path, monkeypatch):
    """pretrained=imagenet reads $TORCH_HOME/hub/checkpoints/<the enum's file>; DenseNet's files use the
    old `norm.1` key names, which are accepted."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = _reference("densenet121", seed=3)
    file = tmp_path / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    assert cache_file(torchvision.models.DenseNet121_Weights.IMAGENET1K_V1) == file
    file.parent.mkdir(parents=True)
    old_names = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2.") if "denselayer" in k else k: v
                 for k, v in reference.state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_names
    torch.save(old_names, file)
    model = DenseNet121((3, 32, 32), 5, pretrained="imagenet")
    assert model.pretrained_weights == "DenseNet121_Weights.IMAGENET1K_V1"
    layer = model.body.features.denseblock3.denselayer4
    assert torch.equal(layer.norm1.weight, reference.features.denseblock3.denselayer4.norm1.weight)
    assert torch.equal(layer.conv2.weight, reference.features.denseblock3.denselayer4.conv2.weight)
    assert model.body.features.conv0.kernel_size == (3, 3)  # 32 px: the adapted stem, random
    assert DenseNet121((3, 32, 32), 5).pretrained_weights is None


def test_resnet18_keeps_true_false_and_takes_imagenet_none_and_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = _reference("resnet18", seed=5)
    file = cache_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    file.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), file)
    for value in (True, "true", "imagenet", "IMAGENET1K_V1"):
        model = ResNet18((3, 224, 224), 10, pretrained=value)
        assert model.pretrained_weights == "ResNet18_Weights.IMAGENET1K_V1"
        assert torch.equal(model.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    for value in (False, "false", "none", None):
        assert ResNet18((3, 32, 32), 10, pretrained=value).pretrained_weights is None
    copy = tmp_path / "mine.pth"
    torch.save(reference.state_dict(), copy)
    assert ResNet18((3, 32, 32), 10, weights=str(copy)).pretrained_weights == str(copy)
    assert set(cached_torchvision_weights(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)) == \
        set(reference.state_dict())
    with pytest.raises(CLBenchError, match="pretrained must be none or imagenet"):
        ResNet18((3, 32, 32), 10, pretrained="imagenet21k")


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "vgg16", "alexnet"])
def test_missing_weights_are_one_line_naming_the_file_where_it_goes_and_the_fetch_command(name, tmp_path,
                                                                                      monkeypatch):
    cls, factory, enum, _ = ARCHS[name]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CLBenchError) as info:
        cls((3, 32, 32), 10, pretrained="imagenet")
    msg = _one_line(info)
    file = tmp_path / "hub" / "checkpoints" / Path(enum.IMAGENET1K_V1.url).name
    assert str(file) in msg and "not in the torch cache" in msg and "backbone.weights=" in msg
    assert f"torchvision.models.{factory}(weights='IMAGENET1K_V1')" in msg
    with pytest.raises(CLBenchError) as info:
        cls((3, 32, 32), 10, weights=str(tmp_path / "nowhere.pth"))
    assert str(tmp_path / "nowhere.pth") in _one_line(info) and "does not exist" in str(info.value)


def _file(tmp_path: Path, state, name: str = "weights.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_wrong_files_are_refused_in_one_line_naming_the_file_and_the_fault(tmp_path):
    good = _reference("resnet18").state_dict()
    cases = {
        "another architecture": (_file(tmp_path, good, "r18.pth"), ResNet50, "torchvision's resnet18"),
        "a shape": (_file(tmp_path, {**good, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, "shape.pth"),
                    ResNet18, "'layer1.0.conv1.weight' has shape (64, 64, 1, 1) where ResNet-18 has (64, 64, 3, 3)"),
        "two keys": (_file(tmp_path, {k: v for k, v in good.items() if not k.startswith("layer2.1.conv")}, "m.pth"),
                     ResNet18, "2 keys missing, such as 'layer2.1.conv1.weight', 'layer2.1.conv2.weight'"),
        "extra keys": (_file(tmp_path, {**good, "layer3.2.conv1.weight": torch.zeros(1)}, "extra.pth"),
                       ResNet18, "1 key ResNet-18 does not have, such as 'layer3.2.conv1.weight'"),
        "nan": (_file(tmp_path, {**good, "conv1.weight": torch.full_like(good["conv1.weight"], float("nan"))},
                      "nan.pth"), ResNet18, "'conv1.weight' has NaN or infinite values"),
        "a whole model": (_file(tmp_path, torchvision.models.resnet18(), "model.pth"), ResNet18,
                          "pickled Python objects (torchvision.models.resnet.ResNet)"),
        "a list": (_file(tmp_path, [1, 2, 3], "list.pth"), ResNet18, "not a state dict (it holds a list)"),
    }
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(cases["two keys"][0].read_bytes()[:100_000])
    cases["truncated"] = (truncated, ResNet18, "truncated or corrupt")
    for what, (file, cls, expected) in cases.items():
        with pytest.raises(CLBenchError) as info:
            cls((3, 32, 32), 10, weights=str(file))
        msg = _one_line(info)
        assert str(file) in msg and expected in msg, (what, msg)
    # the file's own classifier (any size: fine-tuned on other classes) is ignored, not refused
    other_head = {**good, "fc.weight": torch.zeros(3, 512), "fc.bias": torch.zeros(3)}
    assert ResNet18((3, 32, 32), 10, weights=str(_file(tmp_path, other_head, "head.pth"))).head.out_features == 10
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in good.items()}}
    model = ResNet18((3, 32, 32), 10, weights=str(_file(tmp_path, wrapped, "ckpt.pth")))
    assert torch.equal(model.body.layer2[0].conv1.weight, good["layer2.0.conv1.weight"])


@pytest.mark.slow
def test_a_heavy_file_of_another_architecture_is_named(tmp_path):
    """An AlexNet file given to VGG-16: refused naming both."""
    file = _file(tmp_path, _reference("alexnet").state_dict(), "alexnet.pth")
    with pytest.raises(CLBenchError) as info:
        VGG16((3, 32, 32), 10, weights=str(file))
    msg = _one_line(info)
    assert str(file) in msg and "VGG-16" in msg and "torchvision's alexnet" in msg


@pytest.mark.parametrize("name", _arch_params())
def test_contract_feature_maps_and_last_relu(name):
    """features (B, feature_dim); feature_maps end with features; set_last_relu(False) removes exactly the
    last ReLU (ReLU of the signed output gives back the original) and True restores; MaskedNet's copy of
    `body` computes the same features, with the last ReLU setting it was copied with."""
    cls = ARCHS[name][0]
    torch.manual_seed(0)
    model = cls((3, 32, 32), 4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps, feats = model.feature_maps(x), model.features(x)
        assert feats.shape == (2, model.feature_dim) == (2, {"resnet50": 2048, "densenet121": 1024}.get(name, 4096))
        assert torch.allclose(maps[-1], feats) and all(m.dim() == 4 for m in maps[:-1])
        masked = MaskedNet(model).eval()
        assert torch.allclose(masked.features(x), feats, atol=1e-5)
        assert masked.is_chain == (name in HEAVY)  # VGG/AlexNet: one flat chain, HAT's precise case
        model.set_last_relu(False)
        signed_maps, signed = model.feature_maps(x), model.features(x)
        assert (signed < 0).any() and torch.allclose(signed_maps[-1], signed)
        for before, after in zip(maps[:-2], signed_maps[:-2]):
            assert torch.equal(before, after)
        if name in HEAVY:  # fc7 -> ReLU (-> dropout, off in eval)
            assert torch.equal(torch.relu(signed), feats) and torch.equal(maps[-2], signed_maps[-2])
        else:  # the last map is pooled into the features
            assert torch.equal(torch.relu(signed_maps[-2]), maps[-2])
        assert torch.allclose(MaskedNet(model).eval().features(x), signed, atol=1e-5)
        model.set_last_relu(True)
        assert torch.equal(model.features(x), feats)


@pytest.mark.parametrize("name", _arch_params())
def test_grey_images_sum_the_pretrained_rgb_filters(name, tmp_path):
    """One input channel: the first convolution's RGB filters are summed, so the network on a grey image
    computes exactly what the RGB network computes on that image repeated in R, G and B."""
    cls, _, _, _ = ARCHS[name]
    file = _file(tmp_path, _reference(name).state_dict(), f"{name}.pth")
    kwargs = {} if name in HEAVY else {"small_input": "false"}
    rgb = cls((3, 64, 64), 3, weights=str(file), **kwargs).eval()
    grey = cls((1, 64, 64), 3, weights=str(file), **kwargs).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(grey.features(x), rgb.features(x.repeat(1, 3, 1, 1)), atol=1e-4)
    assert rgb.feature_dim == grey.feature_dim


@pytest.mark.parametrize("name", _arch_params())
def test_small_images_run_and_adaptations_keep_every_weight_that_fits(name):
    """8x8 grey and 28x28 images run: ResNet-50/DenseNet-121 take the 3x3 stem (small_input=auto); VGG-16
    and AlexNet skip the poolings that no longer fit (torchvision's own network fails on them) and keep
    every parameter."""
    cls = ARCHS[name][0]
    for shape in [(1, 8, 8), (3, 28, 28)]:
        model = cls(shape, 2).eval()
        with torch.no_grad():
            assert model(torch.randn(2, *shape)).shape == (2, 2)
    if name in HEAVY:
        net = _penultimate(_reference(name), name)
        with pytest.raises(RuntimeError):
            net(torch.randn(1, 3, 28, 28))
        body = cls((3, 28, 28), 2).body
        assert sum(p.numel() for p in body.parameters()) == sum(p.numel() for p in net.parameters())
        assert any(isinstance(m, nn.Identity) for m in body)
    else:
        assert cls((3, 32, 32), 2).small_input and not cls((3, 96, 96), 2).small_input


def test_parameter_counts():
    """torchvision's counts (its weights' meta) less the ImageNet classifier (fc8: 4096 x 1000 + 1000 for
    VGG/AlexNet, 2048/1024 x 1000 + 1000 for ResNet-50/DenseNet-121), plus the new 10-way head."""
    expected = {"resnet50": 25_557_032 - 2_049_000, "densenet121": 7_978_856 - 1_025_000}
    for name, body in expected.items():
        model = ARCHS[name][0]((3, 224, 224), 10)
        assert sum(p.numel() for p in model.body.parameters()) == body
        assert sum(p.numel() for p in model.head.parameters()) == model.feature_dim * 10 + 10


# ----- the masked strategies on a pretrained ResNet-50, through the runner ------------------------------


def _logits_and_matrix(tmp_path, monkeypatch, strategy: str, weights: Path) -> tuple[list, np.ndarray]:
    from cl_bench.runner import Runner
    from tests.conftest import compose_cfg
    from tests.real_format import prepare

    original, record = Runner._train_task, []

    def spy(self, task, bar):
        log = original(self, task, bar)
        s = self.strategy
        s.set_training(False)
        with torch.no_grad():
            record.append([s.predict(self.stream.transform(t.test.x[:4].to(s.device)), t.id)[:, t.outputs].clone()
                           for t in self.stream.tasks[: task.id + 1]])
        return log

    monkeypatch.setattr(Runner, "_train_task", spy)
    data = prepare("split_cifar10", tmp_path / "data")
    # the ImageNet stem on 32 px images (small_input=false) keeps ResNet-50 cheap on a CPU: 8x8 maps in layer1
    summary = Runner(compose_cfg(
        "experiment=smoke", "backbone=resnet50", f"backbone.weights={weights}", "backbone.pretrained=imagenet",
        "backbone.small_input=false", f"strategy={strategy}", "scenario=task_il", "dataset=split_cifar10", *data,
        "dataset.num_tasks=3", "dataset.first_task_classes=4", "train.batch_size=8", "checkpoint=false", "seed=0"),
        tmp_path / strategy).run()
    return record, np.asarray(summary["accuracy_matrix"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["piggyback", "packnet", "hat", "cpg"])
def test_masked_strategies_run_on_a_pretrained_resnet50_and_isolation_ones_keep_earlier_tasks(
        strategy, tmp_path, monkeypatch):
    torch.manual_seed(0)
    weights = _file(tmp_path, _reference("resnet50").state_dict(), "resnet50.pth")
    logits, R = _logits_and_matrix(tmp_path, monkeypatch, strategy, weights)
    assert R.shape == (3, 3) and np.isfinite(R).all()
    assert all(torch.isfinite(t).all() for row in logits for t in row)
    if strategy in ("piggyback", "packnet"):
        assert np.all(R[:, 0] == R[0, 0]), R
        for k in range(len(logits) - 1):
            for i in range(k + 1, len(logits)):
                assert torch.allclose(logits[i][k], logits[k][k], rtol=1e-5, atol=1e-5), (strategy, k, i)


# ----- timing (not a test): python tests/test_pretrained_backbones.py ------------------------------------


def _time_steps() -> None:
    import time

    torch.set_num_threads(1)
    cases = [("resnet50", 64, "false"), ("resnet50", 64, "true"), ("resnet50", 224, "false"),
             ("densenet121", 64, "false"), ("densenet121", 64, "true"), ("alexnet", 64, None), ("vgg16", 64, None)]
    for name, size, small in cases:
        model = ARCHS[name][0]((3, size, size), 10, **({} if small is None else {"small_input": small}))
        x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            nn.functional.cross_entropy(model(x), y).backward()
            times.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
        params = sum(p.numel() for p in model.parameters())
        stem = "" if small is None else f", small_input={small}"
        print(f"{name} {size}px{stem}: {params / 1e6:.1f}M parameters, forward+backward at batch 8: {min(times):.2f} s")


if __name__ == "__main__":
    _time_steps()
