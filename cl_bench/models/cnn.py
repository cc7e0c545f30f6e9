"""A small convolutional network for 8x8 to 64x64 images.

Each stage is two 3x3 convolutions (padding 1) with ReLU, then 2x2 max pooling;
stages halve the resolution while they fit. After the last stage the map is average
pooled to `pool_size` x `pool_size`, flattened and passed through one hidden linear
layer: the features. The shape is that of the small CNNs used for Split CIFAR in
Zenke et al. (2017, "Continual Learning Through Synaptic Intelligence") and
van de Ven et al. (2020), with `channels` setting the width of each stage.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.models.heads import stage_outputs


class CNN(nn.Module):
    def __init__(
        self,
        input_shape: tuple,
        num_outputs: int,
        channels: List[int] = (32, 64),
        hidden_size: int = 512,
        pool_size: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise CLBenchError(f"backbone=cnn needs image input (C, H, W), got shape {tuple(input_shape)}")
        if not channels or any(c < 1 for c in channels):
            raise CLBenchError(f"backbone.channels must be positive integers, got {list(channels)}")
        if hidden_size < 1 or pool_size < 1:
            raise CLBenchError("backbone.hidden_size and backbone.pool_size must be positive")
        if not 0.0 <= dropout < 1.0:
            raise CLBenchError(f"backbone.dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        width, size = input_shape[0], min(input_shape[1:])
        self._stage_ends: list[int] = []
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
            if size >= 2 * pool_size:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            self._stage_ends.append(len(layers) - 1)
            width = c
        layers += [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(width * pool_size * pool_size, hidden_size), nn.ReLU()]
        self._stage_ends.append(len(layers) - 1)
        self.body = nn.Sequential(*layers)
        self.feature_dim = hidden_size
        self.head = nn.Linear(hidden_size, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each convolutional stage's output map (B, C, H, W), then features(x) (B, hidden_size)."""
        return stage_outputs(self.body, x, self._stage_ends)[0]

    def set_last_relu(self, on: bool) -> None:
        self.body[len(self.body) - 1] = nn.ReLU() if on else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
