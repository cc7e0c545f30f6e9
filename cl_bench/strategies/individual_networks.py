"""Individual networks: one copy of the backbone per task, every one starting from the same initial state.

The isolation upper bound of the parameter-isolation family (the "independent" /
"separate networks" baseline of e.g. Rusu et al. 2016, Sec. 5, and De Lange et al.,
TPAMI 2021; Piggyback's and PackNet's "Individual Networks": an ImageNet-trained network
fine-tuned separately for each dataset, Mallya et al. 2018, Table 1): no transfer, no
interference, T times the parameters. Network k is trained on task k only and predicts
task k; the task id picks the network, so the strategy is task-IL only. Works with any
backbone: a copy of the backbone as built (the backbone's own initialisation, and its
pretrained weights if any) is kept at setup, and every network starts as an exact copy
of it, so with a pretrained backbone every task fine-tunes the pretrained weights (not a
random re-init: torch's generic `reset_parameters` would replace the backbone's own
initialisation and drop pretrained weights). Only the current network is in the
optimizer and runs forward passes while training, so earlier ones (weights and
batch-norm statistics) never change. `summary()` reports the storage of each task as
Piggyback counts it: a full float32 copy of the network (`storage_vs_copy_per_task` 1).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from cl_bench.data.stream import Task
from cl_bench.models.masked import FP32_BYTES, float_numel, size_summary
from cl_bench.strategies.base import Strategy


class IndividualNetworks(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    changes_model_shape = True
    scenarios = ("task_il",)

    def setup(self, model, stream, train_cfg, device) -> None:
        self.initial = copy.deepcopy(model).cpu()  # the state every network starts from
        super().setup(nn.ModuleList([model]), stream, train_cfg, device)

    def _add_network(self) -> None:
        self.model.append(copy.deepcopy(self.initial).to(self.device))

    def before_task(self, task: Task) -> None:
        while len(self.model) <= task.id:
            self._add_network()
        for k, net in enumerate(self.model):
            net.requires_grad_(k == task.id)
        self.current = task.id
        self.optimizer = self.make_optimizer(self.model[task.id].parameters())

    def train_step(self, batch) -> dict:
        loss = self.loss(self.model[self.current](batch.x), batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach()}

    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        if task_id >= len(self.model):  # no network yet: an untrained task scores uniformly
            return x.new_zeros(len(x), self.stream.num_outputs)
        return self.model[task_id](x)

    def summary(self) -> dict:
        sizes = [sum(p.numel() for p in net.parameters()) for net in self.model]
        copies = [FP32_BYTES * float_numel(net) for net in self.model]
        return size_summary(sum(sizes), sizes, 0, networks=len(sizes), copy_bytes=copies[0], storage_base_bytes=0,
                            storage_bytes_per_task=copies, storage_vs_copy_per_task=[c / copies[0] for c in copies],
                            mask_bytes_per_task=[0] * len(copies), mask_bits_per_weight=[0.0] * len(copies))

    def state_dict(self) -> dict:
        return {"networks": len(self.model)}

    def load_state_dict(self, state: dict) -> None:
        while len(self.model) < state["networks"]:
            self._add_network()
