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
  `pretrained=imagenet` (or true) loads torchvision's ImageNet weights from the torch hub
  cache, `weights=<file>` a state dict file (models/pretrained.py: the same loader and checks
  as vgg16/resnet50/densenet121/alexnet); an adapted stem keeps its random init, and a
  one-channel input sums the pretrained RGB filters.

All expose `body` (input -> pooled penultimate activations), `head` (the linear output
layer), `features(x)` = `body(x)`, `feature_dim`, `feature_maps(x)` (each stage's output
map, then the pooled features) and `set_last_relu(on)`, like the other backbones, so the
masked strategies (PackNet, Piggyback, HAT, CPG) can swap their layers. State dicts
saved before `body` existed (keys `stem.*`, `stages.*`) still load.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import CLBenchError
from cl_bench.models.heads import stage_outputs
from cl_bench.models.pretrained import PretrainedOption, TorchvisionResNet


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
    """A torchvision weights enum member's state dict from the torch hub cache, never from the network
    (kept for callers of the earlier API; the backbones load through models/pretrained.py, whose
    `weights_source` finds the file and refuses a missing one)."""
    from cl_bench.models.pretrained import read_state_dict, weights_source

    factory = type(weights).__name__.removesuffix("_Weights").lower()  # ResNet18_Weights -> resnet18
    file, _ = weights_source(type(weights), factory, factory, weights.name, None)
    return read_state_dict(file)


class ResNet18(TorchvisionResNet):
    """torchvision's ResNet-18 (11.7M parameters with ImageNet's classifier; 11.2M in the body).

    `pretrained`: none/false (random), imagenet/true (torchvision's IMAGENET1K_V1 from the torch hub
    cache), or `weights=<file>`; see models/pretrained.py for the file checks and the input adaptations."""

    def __init__(self, input_shape: tuple, num_outputs: int, small_input: str = "auto",
                 pretrained: PretrainedOption = False, weights: Optional[str] = None) -> None:
        super().__init__(input_shape, num_outputs, "resnet18", "ResNet18_Weights", "resnet18", "ResNet-18",
                         small_input, pretrained, weights)
