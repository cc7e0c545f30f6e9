"""Multi-layer perceptron backbone with a separate linear head.

Every backbone exposes `features(x)` (the penultimate representation, used by
distillation, herding and nearest-mean classifiers) and `head` (the output layer over
`num_outputs` units), so strategies never reach into a specific architecture. The
shipped backbones also expose `feature_maps(x)`, the output of each stage of the body
in order, the last one being `features(x)` (PODNet's pooled-output distillation), and
`set_last_relu(on)`, which removes or restores the ReLU at the end of the features
(LUCIR and PODNet feed signed features to a cosine classifier).
"""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.models.heads import stage_outputs


class MLP(nn.Module):
    def __init__(
        self,
        input_shape: tuple,
        num_outputs: int,
        hidden_sizes: List[int] = (256, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not hidden_sizes or any(h < 1 for h in hidden_sizes):
            raise CLBenchError(f"backbone.hidden_sizes must be positive integers, got {list(hidden_sizes)}")
        if not 0.0 <= dropout < 1.0:
            raise CLBenchError(f"backbone.dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        self._stage_ends: list[int] = []
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            self._last_relu = len(layers) - 1
            if dropout:
                layers.append(nn.Dropout(dropout))
            self._stage_ends.append(len(layers) - 1)
            width = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = width
        self.head = nn.Linear(width, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The activations of each hidden layer, (B, width) each; the last is features(x)."""
        return stage_outputs(self.body, x, self._stage_ends)[0]

    def set_last_relu(self, on: bool) -> None:
        self.body[self._last_relu] = nn.ReLU() if on else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
