"""Backbones: the shared interface, the published architectures, cached pretrained weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.config import build
from cl_bench.runner import count_parameters
from tests.conftest import compose_cfg, conf_options

HEAVY_BACKBONES = {"vgg16", "alexnet"}  # 134M / 57M parameters: seconds to build on a CPU


def backbone_params():
    """Every backbone config; the heavy ones outside the fast tier."""
    return [pytest.param(b, marks=pytest.mark.slow) if b in HEAVY_BACKBONES else b for b in conf_options("backbone")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("backbone", backbone_params())
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_interface(backbone, shape):
    """features(x) -> (B, feature_dim), head is a Linear over it, forward = head(features)."""
    torch.manual_seed(0)
    model = build(compose_cfg(f"backbone={backbone}").backbone, "backbone", input_shape=shape, num_outputs=7).eval()
    x = torch.randn(3, *shape)
    feats = model.features(x)
    assert feats.shape == (3, model.feature_dim)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 7
    assert torch.allclose(model(x), model.head(feats), atol=1e-5)


def test_published_sizes():
    """ResNet-32 has ~0.46M parameters (He et al. 2016, table 6); GEM's reduced ResNet-18 ~1.1M; ResNet-18 11.2M."""
    from cl_bench.models.resnet import ReducedResNet18, ResNet18, ResNet32

    n32 = count_parameters(ResNet32((3, 32, 32), 10))
    assert 0.45e6 < n32 < 0.48e6, n32
    nr = count_parameters(ReducedResNet18((3, 32, 32), 100))
    assert 1.0e6 < nr < 1.3e6, nr
    n18 = count_parameters(ResNet18((3, 32, 32), 10))
    assert 11.0e6 < n18 < 11.3e6, n18


def test_resnet18_stem_follows_image_size():
    from cl_bench.models.resnet import ResNet18

    small = ResNet18((3, 32, 32), 10)
    assert small.body.conv1.kernel_size == (3, 3) and isinstance(small.body.maxpool, nn.Identity)
    large = ResNet18((3, 224, 224), 10)
    assert large.body.conv1.kernel_size == (7, 7) and isinstance(large.body.maxpool, nn.MaxPool2d)
    assert ResNet18((3, 224, 224), 10, small_input="true").small_input


def test_dataset_default_backbone_and_command_line_override():
    assert compose_cfg("dataset=split_cifar10").backbone._target_.endswith("ResNet18")
    assert compose_cfg("dataset=split_cifar100").backbone._target_.endswith("ResNet32")
    assert compose_cfg("dataset=split_mnist").backbone.hidden_sizes == [400, 400]
    assert compose_cfg("dataset=split_cifar10", "backbone=mlp").backbone._target_.endswith("MLP")
    assert compose_cfg("backbone=cnn", "dataset=split_mnist").backbone._target_.endswith("CNN")
    assert compose_cfg().backbone.hidden_sizes == [256, 256]  # split_digits keeps the mlp


def test_pretrained_weights_from_the_torch_cache_only(tmp_path, monkeypatch):
    import torchvision
    from torchvision.models import ResNet18_Weights

    from cl_bench.models.resnet import ResNet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CLBenchError, match="not in the torch cache") as info:
        ResNet18((3, 224, 224), 10, pretrained=True)
    file = tmp_path / "hub" / "checkpoints" / Path(ResNet18_Weights.IMAGENET1K_V1.url).name
    assert str(file) in str(info.value)

    torch.manual_seed(123)
    reference = torchvision.models.resnet18()
    file.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), file)
    model = ResNet18((3, 224, 224), 10, pretrained=True)
    assert torch.equal(model.body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(model.body.conv1.weight, reference.conv1.weight)
    small = ResNet18((3, 32, 32), 10, pretrained=True)  # adapted stem keeps its own init
    assert torch.equal(small.body.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert small.body.conv1.weight.shape == (64, 3, 3, 3)


@pytest.mark.parametrize("backbone", backbone_params())
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_feature_maps_end_with_the_features_and_the_last_relu_can_be_removed(backbone, shape):
    """feature_maps(x): one output per stage of the body (image maps for conv backbones), the
    last one being features(x); set_last_relu(False) lets the features go negative without
    changing any other stage, and set_last_relu(True) gives back the original features."""
    torch.manual_seed(0)
    model = build(compose_cfg(f"backbone={backbone}").backbone, "backbone", input_shape=shape, num_outputs=5).eval()
    x = torch.randn(4, *shape)
    maps = model.feature_maps(x)
    feats = model.features(x)
    assert len(maps) >= 2 and torch.allclose(maps[-1], feats, atol=1e-6)
    if backbone != "mlp" and not backbone.startswith("mlp"):
        assert all(m.dim() == 4 and m.shape[0] == 4 for m in maps[:-1])
    assert (feats >= 0).all()
    model.set_last_relu(False)
    signed = model.features(x)
    assert (signed < 0).any()
    assert torch.allclose(model(x), model.head(signed), atol=1e-5)
    for before, after in zip(maps[:-2], model.feature_maps(x)[:-2]):
        assert torch.equal(before, after)
    model.set_last_relu(True)
    assert torch.equal(model.features(x), feats)


def test_cosine_head_is_a_scaled_cosine_and_merges_proxies_by_softmax():
    """LUCIR's cosine classifier (one proxy, learnable sigma) and PODNet's local similarity
    classifier (K proxies merged by softmax-weighted averaging), against direct formulas."""
    from cl_bench.models.heads import CosineHead

    torch.manual_seed(0)
    f = torch.randn(6, 16)
    head = CosineHead(16, 5)
    assert isinstance(head.sigma, nn.Parameter) and head.sigma.item() == 1.0
    with torch.no_grad():
        head.sigma.fill_(3.0)
    w = head.weight
    expected = 3.0 * (f @ w.T) / f.norm(dim=1, keepdim=True) / w.norm(dim=1)
    assert torch.allclose(head(f), expected, atol=1e-5)
    assert head(f).abs().max() <= 3.0 + 1e-5

    lsc = CosineHead(16, 5, proxies=3, scale=2.0)
    assert "sigma" in dict(lsc.named_buffers()) and lsc.weight.shape == (15, 16)
    cos = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(lsc.weight, dim=1).T
    per_class = cos.view(6, 5, 3)
    merged = (per_class.softmax(2) * per_class).sum(2)
    assert torch.allclose(lsc(f), 2.0 * merged, atol=1e-5)
    assert torch.equal(lsc.class_weights(2), lsc.weight[6:9])
    with pytest.raises(CLBenchError, match="proxy"):
        CosineHead(16, 5, proxies=0)
