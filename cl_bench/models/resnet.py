"""Residual networks used in the continual-learning literature.

- `ReducedResNet18`: the ResNet-18 of GEM (Lopez-Paz & Ranzato 2017) and A-GEM
  (Chaudhry et al. 2019): four stages of two basic blocks with 20, 40, 80, 160
  filters (`nf` = 20), a 3x3 stride-1 stem without max pooling, global average pooling.
- `ResNet32`: the CIFAR ResNet of He et al. (2016, section 4.2) with n = 5 (6n+2 = 32
  layers) used by iCaRL (Rebuffi et al. 2017): three stages of five basic blocks with
  16, 32, 64 filters; stage changes use the parameter-free shortcut ("option A":
  stride-2 subsampling, zero-padded channels), as in that paper and iCaRL's code.
- `ResNet18`: torchvision's ResNet-18. For small images (`small_input=auto`: shorter
  side at most 64 pixels) its 7x7 stride-2 stem and max pooling become a 3x3 stride-1
  convolution, the usual adaptation to 32x32 inputs (e.g. in DER, Buzzega et al. 2020).
  `pretrained=true` loads torchvision's ImageNet weights from the torch hub cache;
  a stem that was adapted or has a different channel count keeps its random init.

All expose `body` (input -> pooled penultimate activations), `head` (the linear output
layer), `features(x)` = `body(x)`, `feature_dim`, `feature_maps(x)` (each stage's output
map, then the pooled features) and `set_last_relu(on)`, like the other backbones, so the
masked strategies (PackNet, Piggyback, HAT, CPG) can swap their layers. State dicts
saved before `body` existed (keys `stem.*`, `stages.*`) still load.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import CLBenchError
from cl_bench.models.heads import stage_outputs


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016)."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str = "conv") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad_channels = stride, c_out - c_in
        self.shortcut: nn.Module | None = None
        if (stride != 1 or c_in != c_out) and shortcut == "conv":
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.parameter_free = shortcut == "pad"
        self.relu_out = True  # False: the block's output is the pre-activation sum (set_last_relu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            skip = self.shortcut(x)
        elif self.parameter_free and (self.stride != 1 or self.pad_channels):
            skip = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.pad_channels))
        else:
            skip = x
        out = out + skip
        return F.relu(out) if self.relu_out else out


class _SmallInputBody(nn.Module):
    """Stem, stages, global average pooling: the features of a small-input ResNet."""

    def __init__(self, stem: nn.Module, stages: nn.Module, stage_ends: list[int]) -> None:
        super().__init__()
        self.stem, self.stages = stem, stages
        self.stage_ends = stage_ends  # indices of each stage's last block in `stages`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps, last = stage_outputs(self.stages, self.stem(x), self.stage_ends)
        return [*maps, F.adaptive_avg_pool2d(last, 1).flatten(1)]


class _SmallInputResNet(nn.Module):
    """3x3 stride-1 stem, stages of basic blocks (first block of stages 2+ strides by 2), global pooling."""

    def __init__(self, input_shape: tuple, num_outputs: int, widths: list[int], blocks: list[int], shortcut: str) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise CLBenchError(f"a ResNet backbone needs image input (C, H, W), got shape {tuple(input_shape)}")
        stem = nn.Sequential(nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c_in, ends = [], widths[0], []
        for stage, (width, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                layers.append(BasicBlock(c_in, width, 2 if stage > 0 and b == 0 else 1, shortcut))
                c_in = width
            ends.append(len(layers) - 1)
        self.body = _SmallInputBody(stem, nn.Sequential(*layers), ends)
        self.feature_dim = c_in
        self.head = nn.Linear(c_in, num_outputs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for key in [k for k in state_dict if k.startswith((prefix + "stem.", prefix + "stages."))]:
            state_dict[prefix + "body." + key[len(prefix):]] = state_dict.pop(key)  # keys from before `body`
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output map (B, C, H, W), then features(x) (pooled, B x feature_dim)."""
        return self.body.feature_maps(x)

    def set_last_relu(self, on: bool) -> None:
        self.body.stages[len(self.body.stages) - 1].relu_out = on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ReducedResNet18(_SmallInputResNet):
    def __init__(self, input_shape: tuple, num_outputs: int, nf: int = 20) -> None:
        if nf < 1:
            raise CLBenchError(f"backbone.nf must be positive, got {nf}")
        super().__init__(input_shape, num_outputs, [nf, 2 * nf, 4 * nf, 8 * nf], [2, 2, 2, 2], "conv")


class ResNet32(_SmallInputResNet):
    def __init__(self, input_shape: tuple, num_outputs: int, nf: int = 16, blocks_per_stage: int = 5) -> None:
        if nf < 1 or blocks_per_stage < 1:
            raise CLBenchError("backbone.nf and backbone.blocks_per_stage must be positive")
        super().__init__(input_shape, num_outputs, [nf, 2 * nf, 4 * nf], [blocks_per_stage] * 3, "pad")


def cached_torchvision_weights(weights) -> dict:
    """A torchvision weights enum's state dict from the torch hub cache, never from the network."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not file.is_file():
        raise CLBenchError(
            f"backbone.pretrained=true needs torchvision's {weights} weights, which are not in the torch cache "
            f"({file} is missing) and clbench does not download them. On a machine with internet run "
            f"`python -c \"import torchvision; torchvision.models.resnet18(weights='{weights.name}')\"` "
            f"and copy the file to {file.parent}/ (or set TORCH_HOME), or use backbone.pretrained=false"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLBenchError(f"cannot read the cached weights {file} ({exc}); delete it and fetch it again") from None


def _block_without_relu(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock.forward without its final ReLU."""
    out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    return out + (x if block.downsample is None else block.downsample(x))


class ResNet18(nn.Module):
    def __init__(
        self, input_shape: tuple, num_outputs: int, small_input: str = "auto", pretrained: bool = False
    ) -> None:
        super().__init__()
        from torchvision.models import ResNet18_Weights, resnet18

        if len(input_shape) != 3:
            raise CLBenchError(f"backbone=resnet18 needs image input (C, H, W), got shape {tuple(input_shape)}")
        mode = str(small_input).lower()
        if mode not in ("auto", "true", "false"):
            raise CLBenchError(f"backbone.small_input must be auto, true or false, got {small_input!r}")
        small = min(input_shape[1:]) <= 64 if mode == "auto" else mode == "true"
        net = resnet18(weights=None)
        if pretrained:
            net.load_state_dict(cached_torchvision_weights(ResNet18_Weights.IMAGENET1K_V1))
        if small:
            net.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif input_shape[0] != 3:
            net.conv1 = nn.Conv2d(input_shape[0], 64, 7, 2, 3, bias=False)
        self.small_input = small
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.body = net
        self.head = nn.Linear(self.feature_dim, num_outputs)
        self.last_relu = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.last_relu:
            return self.body(x)
        return self.feature_maps(x)[-1]

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """layer1..layer4's output maps (B, C, H, W), then features(x) (pooled, B x 512)."""
        net = self.body
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        maps = []
        for i, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
            if i == 3 and not self.last_relu:
                for block in layer[:-1]:
                    x = block(x)
                x = _block_without_relu(layer[-1], x)
            else:
                x = layer(x)
            maps.append(x)
        return [*maps, torch.flatten(net.avgpool(x), 1)]

    def set_last_relu(self, on: bool) -> None:
        self.last_relu = on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
