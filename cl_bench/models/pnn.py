"""Progressive neural network columns (Rusu et al. 2016, "Progressive Neural Networks").

Column k is an MLP with the backbone's hidden sizes. Its layer i >= 1 also receives the
layer i-1 activations of all earlier columns through the non-linear lateral adapter of
Eq. 2 (Sec. 2, "Adapters"):

    h_i^(k) = relu( W_i^(k) h_{i-1}^(k) + U_i^(k) relu( V_i^(k) (alpha_i^(k) * [h_{i-1}^(j)]_{j<k}) ) )

where [.] concatenates the earlier columns' activations, alpha is a learned scalar and
V projects onto an n_{i-1}-dimensional space (n_{i-1} = this column's width of layer
i-1), which keeps the adapter's size linear in the number of earlier columns. The last
layer (the head, no activation) gets an adapter too. The backbone's dropout (after each
hidden ReLU) is kept in every column; h_{i-1} is the activation after it. Earlier
columns are frozen by the strategy; with `lateral=False` the columns are independent
networks. `used_parameters(k, outputs)` counts what task k runs: column k with only the
head rows (and head-adapter rows) of its outputs, and the hidden layers and hidden
adapters of the earlier columns (their heads and head adapters are not used).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from cl_bench import CLBenchError


class Column(nn.Module):
    def __init__(self, widths: Sequence[int], index: int, lateral: bool, alpha_init: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.adapters = nn.ModuleList()
        if lateral and index > 0:
            for i in range(1, len(self.layers)):
                n_prev = widths[i]  # width of layer i-1's output in every column
                self.adapters.append(
                    nn.ModuleDict(
                        {
                            "V": nn.Linear(index * n_prev, n_prev),
                            "U": nn.Linear(n_prev, widths[i + 1], bias=False),
                        }
                    )
                )
            self.alpha = nn.Parameter(torch.full((len(self.layers) - 1,), float(alpha_init)))

    def forward(self, x: torch.Tensor, earlier: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`earlier[j][i]`: column j's activation after layer i. Returns (output, own activations)."""
        h, acts = x, []
        for i, layer in enumerate(self.layers):
            z = layer(h)
            if i > 0 and len(self.adapters):
                prev = torch.cat([col[i - 1] for col in earlier], 1)
                adapter = self.adapters[i - 1]
                z = z + adapter["U"](torch.relu(adapter["V"](self.alpha[i - 1] * prev)))
            if i < len(self.layers) - 1:
                z = self.dropout(torch.relu(z))
                acts.append(z)
            h = z
        return h, acts

    def used_parameters(self, outputs: Optional[Sequence[int]], with_head: bool) -> int:
        """Parameters a task runs: with `with_head`, the head rows of `outputs` (all if None)
        and the head adapter; without, only the hidden layers and their adapters."""
        def rows(layer: nn.Linear) -> int:
            n = layer.out_features if outputs is None else len(outputs)
            return n * (layer.in_features + (layer.bias is not None))

        hidden = [p for layer in self.layers[:-1] for p in layer.parameters()]
        n = sum(p.numel() for p in hidden)
        if len(self.adapters):
            n += sum(p.numel() for a in self.adapters[:-1] for p in a.parameters()) + len(self.adapters) - 1
        if with_head:
            n += rows(self.layers[-1])
            if len(self.adapters):
                head_adapter = self.adapters[-1]
                n += sum(p.numel() for p in head_adapter["V"].parameters()) + rows(head_adapter["U"]) + 1
        return n


class ProgressiveNet(nn.Module):
    """Columns of one MLP shape, added one per task; `forward(x, k)` runs column k."""

    def __init__(self, input_dim: int, hidden_sizes: Sequence[int], num_outputs: int,
                 lateral: bool = True, alpha_init: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        self.widths = [int(input_dim), *map(int, hidden_sizes), int(num_outputs)]
        self.lateral = lateral
        self.alpha_init = alpha_init
        self.dropout = dropout
        self.columns = nn.ModuleList()

    @classmethod
    def like(cls, backbone: nn.Module, input_shape: Sequence[int], num_outputs: int, **kwargs) -> "ProgressiveNet":
        """Columns shaped like an MLP backbone (Flatten, [Linear, ReLU, Dropout]*, head), its dropout kept."""
        body = getattr(backbone, "body", None)
        allowed = (nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout)
        if (not isinstance(body, nn.Sequential) or not all(isinstance(m, allowed) for m in body)
                or not isinstance(getattr(backbone, "head", None), nn.Linear)):
            raise CLBenchError(f"PNN columns are built for MLP backbones (backbone=mlp); got {type(backbone).__name__}")
        hidden = [m.out_features for m in body if isinstance(m, nn.Linear)]
        rates = {m.p for m in body if isinstance(m, nn.Dropout)}
        if len(rates) > 1:
            raise CLBenchError(f"PNN columns take one dropout rate; {type(backbone).__name__} has {sorted(rates)}")
        return cls(math.prod(input_shape), hidden, num_outputs, dropout=rates.pop() if rates else 0.0, **kwargs)

    def add_column(self) -> Column:
        column = Column(self.widths, len(self.columns), self.lateral, self.alpha_init, self.dropout)
        if len(self.columns):
            column.to(next(self.columns[0].parameters()).device)
        self.columns.append(column)
        return column

    def forward(self, x: torch.Tensor, k: int = -1) -> torch.Tensor:
        k = k % len(self.columns)
        x = x.flatten(1)
        acts: list[list[torch.Tensor]] = []
        for j in range(k + 1):
            if j < k and not self.lateral:
                continue
            out, a = self.columns[j](x, acts)
            acts.append(a)
        return out

    def column_parameters(self, k: int) -> int:
        return sum(p.numel() for p in self.columns[k].parameters())
