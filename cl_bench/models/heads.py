"""Classifier heads that replace a backbone's linear `head` (the shared backbone interface:
`features(x)` then `head`), so a strategy swaps the head without architecture-specific code.

`CosineHead`: scores are scaled cosine similarities between the L2-normalised features
and L2-normalised class weights,

    s_c(x) = sigma * <f(x)/|f(x)|, w_c/|w_c|>

- one proxy per class: the cosine-normalised classifier of LUCIR (Hou et al., CVPR 2019,
  Eq. 4), with a learnable scale sigma (the authors' `CosineLinear`, sigma initialised at 1);
- `proxies` = K > 1: PODNet's local similarity classifier (Douillard et al., ECCV 2020,
  Eq. 5): each class has K proxies, and the class similarity is the softmax-weighted
  average of its proxies' similarities, s_c = sum_k softmax_k(gamma * s_ck) * s_ck.
  The authors' code takes gamma = 1 on s_ck = -|f/|f| - w/|w||^2 = 2 cos_ck - 2, i.e.
  softmax_k(2 cos_ck): PODNet (`strategies/podnet.py`) builds this head with gamma = 2
  and uses 2 * cosine(f) - 2.

`scale=None` keeps the scale learnable (initialised at `init_scale`); a number fixes it.
`weight` holds K consecutive rows per class, class c's proxies at rows c*K .. c*K+K-1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import CLBenchError


class CosineHead(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        proxies: int = 1,
        scale: Optional[float] = None,
        init_scale: float = 1.0,
        gamma: float = 1.0,
    ) -> None:
        super().__init__()
        if proxies < 1:
            raise CLBenchError(f"a cosine head needs at least one proxy per class, got {proxies}")
        self.in_features, self.out_features, self.proxies, self.gamma = in_features, out_features, proxies, gamma
        self.weight = nn.Parameter(torch.empty(out_features * proxies, in_features))
        # the authors' CosineLinear: uniform(-1/sqrt(in), 1/sqrt(in)) (direction is all that matters)
        bound = 1.0 / in_features**0.5
        nn.init.uniform_(self.weight, -bound, bound)
        if scale is None:
            self.sigma = nn.Parameter(torch.tensor(float(init_scale)))
        else:
            self.register_buffer("sigma", torch.tensor(float(scale)))

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Unscaled class similarities (N, out_features), proxies merged."""
        sims = F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))
        if self.proxies == 1:
            return sims
        sims = sims.view(len(features), self.out_features, self.proxies)
        return (torch.softmax(self.gamma * sims, dim=2) * sims).sum(2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.sigma * self.cosine(features)

    def class_weights(self, c: int) -> torch.Tensor:
        """The rows (proxies, in_features) of class c."""
        return self.weight[c * self.proxies : (c + 1) * self.proxies]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, proxies={self.proxies}"


def stage_outputs(modules, x: torch.Tensor, ends) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run `modules` in order on x; the outputs right after the modules at indices `ends`."""
    maps = []
    for i, module in enumerate(modules):
        x = module(x)
        if i in ends:
            maps.append(x)
    return maps, x
