"""Maskable, gateable and growable layers: the one mechanism the parameter-isolation
strategies share (PackNet, Piggyback, HAT, CPG, DEN).

`MaskedNet(backbone)` copies a backbone (`body` + `head`, see models/mlp.py) and swaps
each `nn.Linear`/`nn.Conv2d` for a `MaskedLayer` holding the same parameters. A layer
computes

    y = gate * layer(x; weight * weight_mask, bias)

where `weight_mask` (per weight: binary, or a straight-through binarised score) and
`gate` (per output unit, e.g. HAT's attention) are set by the strategy before a forward
pass (None = off). `grow(l, n)` adds `n` units to layer `l` (new incoming weights
initialised like torch's default; new outgoing weights of layer `l+1` start at zero,
so the function of every existing unit is unchanged); `keep_units(l, idx)` removes
units. Growth needs consecutive layers joined unit to unit (`growable`: MLPs);
`is_chain` says whether each layer's input is exactly the previous layer's gated output
(through ReLU, pooling, flatten, dropout: a gated-off unit feeds exact zeros), which
HAT's Eq. 2 relies on; batch-norm or residual connections break it (ResNets).

Helpers for strategies built on these layers live here too: `WeightOwners` (which task
owns each weight: PackNet/CPG bookkeeping with magnitude pruning, and the weights a
pretrained backbone keeps: PackNet's pruned ImageNet network), `binarize`
(straight-through threshold of real mask scores: Piggyback/CPG), `FreezeGuard` (keeps
chosen entries exactly fixed through any optimizer step), `TaskBatchNorm`, `epochs`
(extra passes over a split for phases a strategy runs itself), `size_summary` and
`StorageCount` (storage per task in bytes, as Piggyback counts it), `is_pretrained`, and
`batchnorms`/`freeze_batchnorms`/`batchnorms_eval` (batch-norm shared by all tasks, fixed
after the first: affine parameters and running statistics) and `start_task_batchnorms`/
`freeze_other_batchnorms` (a `TaskBatchNorm` copy per task).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Split, Stream


class MaskedLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        elif isinstance(layer, nn.Linear):
            self.conv = None
        else:
            raise CLBenchError(f"cannot mask a {type(layer).__name__}; only Linear and Conv2d layers")
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = nn.Parameter(layer.bias.detach().clone()) if layer.bias is not None else None
        self.weight_mask: Optional[torch.Tensor] = None
        self.gate: Optional[torch.Tensor] = None

    @property
    def out_units(self) -> int:
        return self.weight.shape[0]

    @property
    def in_units(self) -> int:
        return self.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight_mask is None else self.weight * self.weight_mask
        y = F.linear(x, w, self.bias) if self.conv is None else F.conv2d(x, w, self.bias, **self.conv)
        if self.gate is not None:
            y = y * self.gate.view(1, -1, *([1] * (y.dim() - 2)))
        return y

    def resize(self, dim: int, keep: Optional[torch.Tensor] = None, new: Optional[torch.Tensor] = None) -> None:
        """Keep the slices `keep` of the weight along `dim` (0 outputs, 1 inputs), then append `new`."""
        w = self.weight.detach()
        b = self.bias.detach() if self.bias is not None else None
        if keep is not None:
            w = w.index_select(dim, keep)
            b = b.index_select(0, keep) if (b is not None and dim == 0) else b
        if new is not None:
            w = torch.cat([w, new.to(w)], dim)
            if b is not None and dim == 0:
                b = torch.cat([b, b.new_zeros(new.shape[0])])
        self.weight = nn.Parameter(w.contiguous())
        if b is not None:
            self.bias = nn.Parameter(b.contiguous())

    def fresh_rows(self, n: int) -> torch.Tensor:
        """`n` new output units initialised as torch initialises Linear/Conv weights."""
        rows = self.weight.new_empty(n, *self.weight.shape[1:])
        nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
        return rows


# modules that map a zero input unit to a zero output unit, one unit at a time
_ZERO_PRESERVING = (nn.ReLU, nn.Flatten, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity)


class MaskedNet(nn.Module):
    """A copy of `backbone` whose Linear/Conv2d layers are `MaskedLayer`s (body, then head)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        name = type(backbone).__name__
        if not (hasattr(backbone, "body") and hasattr(backbone, "head")):
            raise CLBenchError(f"{name} has no body/head; masked strategies need both")
        if not isinstance(backbone.head, nn.Linear):
            raise CLBenchError(f"{name}'s head is a {type(backbone.head).__name__}; masked strategies need a Linear head")
        for module in backbone.body.modules():
            own = list(module.parameters(recurse=False))
            if own and not isinstance(module, (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
                raise CLBenchError(f"masked strategies cannot isolate the {type(module).__name__} layers of {name} "
                                   "(only Linear, Conv2d and BatchNorm)")
        self.body = _swap_layers(copy.deepcopy(backbone.body))
        self.head = MaskedLayer(backbone.head)
        self.is_chain = isinstance(self.body, nn.Sequential) and all(
            isinstance(m, (MaskedLayer, *_ZERO_PRESERVING)) for m in self.body)

    @property
    def growable(self) -> bool:
        """Units can be added or removed: a chain whose consecutive layers connect unit to unit."""
        layers = self.layers
        return self.is_chain and all(b.in_units == a.out_units for a, b in zip(layers, layers[1:]))

    @property
    def layers(self) -> list[MaskedLayer]:
        return [m for m in self.body.modules() if isinstance(m, MaskedLayer)] + [self.head]

    @property
    def hidden(self) -> list[MaskedLayer]:
        return self.layers[:-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def set_masks(self, masks: Optional[Sequence[Optional[torch.Tensor]]]) -> None:
        for i, layer in enumerate(self.hidden):
            layer.weight_mask = None if masks is None else masks[i]

    def set_gates(self, gates: Optional[Sequence[Optional[torch.Tensor]]]) -> None:
        for i, layer in enumerate(self.hidden):
            layer.gate = None if gates is None else gates[i]

    def _check_chain(self, l: int) -> tuple[MaskedLayer, MaskedLayer]:
        layers = self.layers
        if not self.growable or l >= len(layers) - 1:
            raise CLBenchError("growing or shrinking units needs a backbone whose layers connect unit to unit (e.g. mlp)")
        return layers[l], layers[l + 1]

    def grow(self, l: int, n: int, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> None:
        """Add `n` units to hidden layer `l`: incoming `rows` (default: fresh), outgoing `cols` (default: 0)."""
        layer, nxt = self._check_chain(l)
        layer.resize(0, new=layer.fresh_rows(n) if rows is None else rows)
        shape = list(nxt.weight.shape)
        shape[1] = n
        nxt.resize(1, new=nxt.weight.new_zeros(shape) if cols is None else cols)

    def keep_units(self, l: int, keep: torch.Tensor) -> None:
        layer, nxt = self._check_chain(l)
        layer.resize(0, keep=keep)
        nxt.resize(1, keep=keep)


def _swap_layers(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(module, name, MaskedLayer(child))
        else:
            _swap_layers(child)
    return module


class TaskBatchNorm(nn.Module):
    """One batch-norm per task (Piggyback's task-specific BN); `task` picks which one runs."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.norms = nn.ModuleList([copy.deepcopy(bn)])
        self.task = 0

    def ensure(self, n: int) -> None:
        while len(self.norms) < n:
            self.norms.append(copy.deepcopy(self.norms[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[min(self.task, len(self.norms) - 1)](x)


def start_task_batchnorms(norms: Sequence[TaskBatchNorm], task_id: int) -> None:
    """Task `task_id` runs its own copy of every batch-norm, started from the previous task's."""
    for bn in norms:
        if task_id > 0:
            bn.norms[task_id].load_state_dict(bn.norms[task_id - 1].state_dict())
        bn.task = task_id


def freeze_other_batchnorms(norms: Sequence[TaskBatchNorm], task_id: int, guard: "FreezeGuard") -> None:
    """Freeze every task's batch-norm copy but `task_id`'s (not run, they keep their statistics)."""
    for bn in norms:
        for k, norm in enumerate(bn.norms):
            if k != task_id:
                for p in norm.parameters():
                    guard.freeze(p)


def task_batchnorms(module: nn.Module) -> list[TaskBatchNorm]:
    """Swap every BatchNorm of `module` for a `TaskBatchNorm` (in place); return them."""
    found = []
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, TaskBatchNorm(child))
            found.append(getattr(module, name))
        elif isinstance(child, TaskBatchNorm):
            found.append(child)
        else:
            found += task_batchnorms(child)
    return found


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorms(module: nn.Module, guard: "FreezeGuard") -> None:
    """Keep every batch-norm's affine parameters fixed through `guard`'s steps (the running
    statistics are kept by `batchnorms_eval` in training mode)."""
    for bn in batchnorms(module):
        for p in (bn.weight, bn.bias):
            if p is not None:
                guard.freeze(p)


def batchnorms_eval(module: nn.Module) -> None:
    """Batch-norm layers normalise with, and no longer update, their running statistics."""
    for bn in batchnorms(module):
        bn.eval()


class _Binarize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def binarize(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Hard threshold forward, identity backward (straight-through estimator)."""
    return _Binarize.apply(scores, threshold)


# WeightOwners' owner value of the weights a pretrained backbone keeps (PackNet's "ImageNet" task)
PRETRAINED_OWNER = 255


class WeightOwners:
    """owner[l][i] = 0 for a free weight, t + 1 for a weight that belongs to task t, and
    `PRETRAINED_OWNER` for a weight kept from a pretrained backbone (used by every task,
    trained by none: `keep_pretrained`)."""

    def __init__(self, layers: Sequence[MaskedLayer]) -> None:
        self.owner = [torch.zeros(l.weight.shape, dtype=torch.uint8, device=l.weight.device) for l in layers]

    def claim_free(self, task: int) -> None:
        for o in self.owner:
            o[o == 0] = task + 1

    def keep_pretrained(self, layers: Sequence[MaskedLayer], fraction: float) -> None:
        """Give every weight to the pretrained pseudo-task, then release (zero and free) the
        `fraction` of smallest magnitude per layer, as PackNet prunes its ImageNet network."""
        self.claim_free(PRETRAINED_OWNER - 1)
        self.prune(layers, PRETRAINED_OWNER - 1, fraction)

    def pretrained(self) -> list[torch.Tensor]:
        return [o == PRETRAINED_OWNER for o in self.owner]

    def visible(self, task: int) -> list[torch.Tensor]:
        """Weights task `task` uses at test: its own, those of earlier tasks and the pretrained ones."""
        return [((o > 0) & (o <= task + 1)) | (o == PRETRAINED_OWNER) for o in self.owner]

    def own(self, task: int) -> list[torch.Tensor]:
        return [o == task + 1 for o in self.owner]

    def prune(self, layers: Sequence[MaskedLayer], task: int, fraction: float) -> None:
        """Release (zero and free) the `fraction` smallest-magnitude weights of `task`, per layer."""
        for o, layer in zip(self.owner, layers):
            mine = o == task + 1
            k = int(round(fraction * int(mine.sum())))
            if k == 0:
                continue
            magnitude = layer.weight.detach().abs().masked_fill(~mine, float("inf")).flatten()
            drop = magnitude.topk(k, largest=False).indices
            o.view(-1)[drop] = 0
            layer.weight.data.view(-1)[drop] = 0.0

    def pad(self, l: int, dim: int, n: int, owner: int) -> None:
        shape = list(self.owner[l].shape)
        shape[dim] = n
        self.owner[l] = torch.cat([self.owner[l], self.owner[l].new_full(shape, owner)], dim)

    def state_dict(self) -> list[torch.Tensor]:
        return [o.clone() for o in self.owner]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        self.owner = [o.clone() for o in state]


class FreezeGuard:
    """Keeps the `True` entries of each registered mask exactly fixed through optimizer steps.

    Zeroing gradients alone is not enough: weight decay (coupled or decoupled, AdamW) and
    momentum still move a parameter. `step` zeroes the frozen gradients, steps, and writes
    the frozen values back. `scale(param, factor)` multiplies each entry's whole update
    (gradient step, momentum and weight decay alike) by `factor` in [0, 1]: 0 is frozen,
    1 is free (HAT's Eq. 2 conditioning for any optimizer).
    """

    def __init__(self) -> None:
        self.items: list[tuple[nn.Parameter, torch.Tensor]] = []

    def freeze(self, param: nn.Parameter, frozen: torch.Tensor | bool = True) -> None:
        if isinstance(frozen, bool):
            frozen = torch.full_like(param, frozen, dtype=torch.bool)
        if frozen.any():
            self.items.append((param, frozen))

    def freeze_other_head_rows(self, head: nn.Module, stream: Stream, task_id: int) -> None:
        """Keep fixed every row of `head` (weight, and bias if any) that is not an output of task
        `task_id` (`head_rows_frozen`): earlier and later tasks' classifiers stay as they are."""
        weight_rows, rows = head_rows_frozen(head, stream, task_id)
        self.freeze(head.weight, weight_rows)
        if head.bias is not None:
            self.freeze(head.bias, rows)

    def scale(self, param: nn.Parameter, factor: torch.Tensor) -> None:
        factor = factor.to(param.dtype).expand_as(param)
        if (factor < 1).any():
            self.items.append((param, factor))

    def step(self, optimizer: torch.optim.Optimizer, step: Optional[Callable[[], Any]] = None) -> Any:
        """Zero the frozen entries' gradients, take the step (`step()`, default
        `optimizer.step()`: a strategy passes its loss-scaled `optimizer_step`), then put
        every frozen entry back to its value before the step. Returns what `step` returned."""
        saved = [p.detach().clone() for p, _ in self.items]
        for p, rule in self.items:  # rule: bool mask of frozen entries, or float update factors
            if p.grad is not None:
                p.grad.masked_fill_(rule if rule.dtype == torch.bool else rule == 0, 0.0)
        taken = (step or optimizer.step)()
        with torch.no_grad():
            for (p, rule), old in zip(self.items, saved):
                if rule.dtype == torch.bool:
                    p.copy_(torch.where(rule, old, p))
                else:  # where the factor is 0, exactly the old value (even if the step produced inf/nan)
                    p.copy_(torch.where(rule == 0, old, old + rule * (p - old)))
        return taken


def head_rows_frozen(head: nn.Module, stream: Stream, task_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the head's weight and bias entries that do NOT belong to task `task_id` (a MaskedLayer
    or a plain nn.Linear head: one row per output)."""
    rows = torch.ones(head.weight.shape[0], dtype=torch.bool, device=head.weight.device)
    rows[torch.tensor(stream.tasks[task_id].outputs, device=rows.device)] = False
    return rows[:, None].expand_as(head.weight), rows


def epochs(split: Split, stream: Stream, n_epochs: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (x, y) batches for `n_epochs` extra passes, drawn with torch's global RNG
    (its state is checkpointed by the runner, so resumed runs repeat them exactly)."""
    for _ in range(n_epochs):
        order = torch.randperm(len(split)).to(split.y.device)
        for start in range(0, len(split), batch_size):
            idx = order[start : start + batch_size]
            yield stream.transform(split.x[idx], train=True), split.y[idx]


@torch.no_grad()
def accuracy(predict, split: Split, stream: Stream, task_id: int, batch_size: int = 2048) -> float:
    """Task-IL accuracy of `predict(x, task_id)` on `split` (used by CPG's accuracy goal)."""
    outputs = torch.tensor(stream.tasks[task_id].outputs, device=split.y.device)
    correct = 0
    for start in range(0, len(split), batch_size):
        scores = predict(stream.transform(split.x[start : start + batch_size]), task_id)
        correct += int((outputs[scores[:, outputs].argmax(1)] == split.y[start : start + batch_size]).sum())
    return correct / max(len(split), 1)


def size_summary(total: int, per_task: Sequence[int], mask_bytes: int, **extra) -> dict:
    """The model-size facts every isolation strategy reports after each task."""
    return {
        "parameters_total": int(total),
        "parameters_per_task": [int(n) for n in per_task],
        "mask_bytes": int(mask_bytes),
        **extra,
    }


def bit_bytes(n: int) -> int:
    """Bytes of a bit-packed binary mask over `n` entries."""
    return (int(n) + 7) // 8


FP32_BYTES = 4


def float_numel(module: nn.Module) -> int:
    """Entries of `module`'s floating-point state (parameters and batch-norm running statistics,
    not the integer `num_batches_tracked`): what a saved copy of it holds."""
    return sum(t.numel() for t in module.state_dict().values() if t.is_floating_point())


def is_pretrained(model: nn.Module) -> bool:
    """Whether a backbone was built from pretrained weights: its `pretrained_weights` (the file
    or name they came from) is set; randomly initialised backbones have None or no attribute."""
    return getattr(model, "pretrained_weights", None) is not None


class StorageCount:
    """Storage per task as Piggyback counts it (Mallya et al. 2018, abstract: a binary mask
    costs "1 bit per network parameter, per task", about 1/32 of a float32 copy of the
    network; task-specific batch-norm and classifier are stored in full). Counted from the plain backbone
    at setup, before a strategy wraps it: `copy_bytes` is a full float32 copy of the network
    (body and whole head, batch-norm statistics included: what Individual Networks stores
    per task), `body_bytes` one copy of the body, `bn_bytes` one set of its batch-norm layers
    (weight, bias, running mean and variance) and `mask_bytes` one bit-packed binary mask
    over the weights of the body's Linear/Conv2d layers (`mask_weights` entries)."""

    def __init__(self, model: nn.Module) -> None:
        self.copy_bytes = FP32_BYTES * float_numel(model)
        self.body_bytes = FP32_BYTES * float_numel(model.body)
        self.bn_bytes = FP32_BYTES * sum(float_numel(bn) for bn in batchnorms(model.body))
        layers = [m for m in model.body.modules() if isinstance(m, (nn.Linear, nn.Conv2d, MaskedLayer))]
        self.mask_weights = sum(l.weight.numel() for l in layers)
        self.mask_bytes = sum(bit_bytes(l.weight.numel()) for l in layers)  # packed per layer

    def head_bytes(self, head: nn.Module, task) -> int:
        return FP32_BYTES * head_params(head, task)

    def summary(self, per_task: Sequence[int], masks: Sequence[int], base: int = 0) -> dict:
        """Keys for `size_summary`: the bytes each task added (`per_task`), its mask bytes
        (`masks`), and what was stored before any task (`base`: a pretrained backbone)."""
        return {
            "copy_bytes": int(self.copy_bytes),
            "storage_base_bytes": int(base),
            "storage_bytes_per_task": [int(b) for b in per_task],
            "storage_vs_copy_per_task": [round(b / self.copy_bytes, 6) for b in per_task],
            "mask_bytes_per_task": [int(m) for m in masks],
            "mask_bits_per_weight": [round(8 * m / max(self.mask_weights, 1), 4) for m in masks],
        }


def head_params(head: nn.Module, task) -> int:
    """Parameters of the head rows that serve `task` (its outputs of the shared head)."""
    return len(task.outputs) * (head.weight.shape[1] + (1 if head.bias is not None else 0))
