"""AGS-CL: node-importance based Adaptive Group Sparse regularisation
(Jung, Ahn, Cha & Moon, NeurIPS 2020).

The groups are the hidden nodes of the MLP: a node's incoming weights and bias. After
task t each node gets an importance, its average ReLU activation over the task's
training data, accumulated as Omega^t = eta * Omega^{t-1} + Omega_new (the authors'
code). Training task t minimises (Eq. 3)

    L_t(theta) + mu * sum_{n: Omega_n = 0} ||theta_n||_2
               + lambda * sum_{n: Omega_n > 0} Omega_n ||theta_n - theta_n^{t-1}||_2

by proximal gradient descent: plain optimizer steps on L_t, and after each epoch (as
in the authors' code) the closed-form proximal operators of both group norms with
step size train.lr (Eq. 5-6): group soft-thresholding of unimportant nodes towards 0
(sparsity, which frees capacity) and of important nodes towards their previous values.

After each task (Sec. 3.3): connections from unimportant nodes into the next layer
are zeroed (for the head: the current task's outputs only, as with the authors'
multi-head network); a fraction `rho` of the unimportant nodes is re-initialised; and
while training later tasks, the incoming weights of important nodes from unimportant
nodes of the layer below are held at zero, so re-learned nodes cannot disturb old
tasks' features. The head is not regularised (a head per task in the paper; in
task-IL the shared head's restricted loss leaves old tasks' outputs untouched).
"""

from __future__ import annotations

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Stream, Task
from cl_bench.strategies.base import Batch, Strategy
from cl_bench.strategies.importance import check_positive, check_unit


class AGSCL(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    def __init__(self, lamb: float = 10.0, mu: float = 0.1, rho: float = 0.3, eta: float = 0.9) -> None:
        check_positive("lamb", lamb, allow_zero=True)
        check_positive("mu", mu, allow_zero=True)
        check_unit("rho", rho)
        check_unit("eta", eta)
        self.lamb, self.mu, self.rho, self.eta = float(lamb), float(mu), float(rho), float(eta)

    def setup(self, model: nn.Module, stream: Stream, train_cfg, device: torch.device) -> None:
        super().setup(model, stream, train_cfg, device)
        body = getattr(model, "body", None)
        allowed = (nn.Linear, nn.ReLU, nn.Flatten, nn.Dropout)
        if not isinstance(body, nn.Sequential) or not all(isinstance(m, allowed) for m in body):
            raise CLBenchError("strategy=ags_cl groups the nodes of an MLP and needs backbone=mlp")
        self.layers = [m for m in body if isinstance(m, nn.Linear)]
        self.omega: list[torch.Tensor] = []  # per hidden layer, per node
        self.old: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.freeze: list[torch.Tensor] = []
        self.steps = 0

    def important(self, layer: int) -> torch.Tensor:
        if not self.omega:
            return torch.zeros(self.layers[layer].out_features, dtype=torch.bool, device=self.device)
        return self.omega[layer] > 0

    def _build_freeze_masks(self) -> None:
        """mask[n, j] = 0 for important node n and unimportant input node j (layers after the first)."""
        self.freeze = []
        for l in range(1, len(self.layers)):
            mask = torch.ones_like(self.layers[l].weight)
            mask[self.important(l).unsqueeze(1) & ~self.important(l - 1).unsqueeze(0)] = 0
            self.freeze.append(mask)

    # ----- training -----------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.steps = 0
        self.steps_per_epoch = -(-len(self.training_data(task)) // self.train_cfg.batch_size)

    def train_step(self, batch: Batch) -> dict:
        out = super().train_step(batch)
        with torch.no_grad():
            if self.omega:
                for layer, mask in zip(self.layers[1:], self.freeze):
                    layer.weight.mul_(mask)
            self.steps += 1
            if self.steps % self.steps_per_epoch == 0:
                self.proximal_step(self.train_cfg.lr)
        return out

    @torch.no_grad()
    def proximal_step(self, lr: float) -> None:
        for l, layer in enumerate(self.layers):
            w, b = layer.weight, layer.bias
            imp = self.important(l)
            norm = (w.pow(2).sum(1) + b.pow(2)).sqrt()
            shrink = torch.clamp(1 - self.mu * lr / norm.clamp_min(1e-12), min=0)  # group lasso prox
            new_w, new_b = w * shrink.unsqueeze(1), b * shrink
            if self.omega:
                w_old, b_old = self.old[l]
                dist = ((w - w_old).pow(2).sum(1) + (b - b_old).pow(2)).sqrt()
                thresh = self.lamb * self.omega[l] * lr
                keep = torch.clamp(1 - thresh / dist.clamp_min(1e-12), min=0)  # prox towards old values
                new_w = torch.where(imp.unsqueeze(1), w_old + keep.unsqueeze(1) * (w - w_old), new_w)
                new_b = torch.where(imp, b_old + keep * (b - b_old), new_b)
            w.copy_(new_w)
            b.copy_(new_b)

    # ----- consolidation ------------------------------------------------------------------
    @torch.no_grad()
    def activation_importance(self, task: Task) -> list[torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        sums = [torch.zeros(l.out_features, device=self.device) for l in self.layers]
        data = task.train
        with self.progress("node importance", total=len(data)) as advance:  # samples
            for start in range(0, len(data), 1024):
                h, i = self.stream.transform(data.x[start : start + 1024]), 0
                for m in self.model.body:
                    h = m(h)
                    if isinstance(m, nn.ReLU):
                        sums[i] += h.sum(0)
                        i += 1
                advance(min(1024, len(data) - start))
        self.model.train(was_training)
        return [s / len(data) for s in sums]

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        new = self.activation_importance(task)
        self.omega = [self.eta * o + n for o, n in zip(self.omega, new)] if self.omega else new
        for l in range(1, len(self.layers)):
            self.layers[l].weight[:, ~self.important(l - 1)] = 0
        outputs = torch.tensor(task.outputs, device=self.device)
        self.model.head.weight[outputs.unsqueeze(1), (~self.important(len(self.layers) - 1)).nonzero().T] = 0
        for l, layer in enumerate(self.layers):
            free = (~self.important(l)).nonzero().flatten()
            chosen = free[torch.randperm(len(free))[: len(free) - int(len(free) * (1 - self.rho))].to(self.device)]
            fresh = nn.Linear(layer.in_features, layer.out_features).to(self.device)
            layer.weight[chosen] = fresh.weight[chosen]
            layer.bias[chosen] = fresh.bias[chosen]
        self.old = [(l.weight.detach().clone(), l.bias.detach().clone()) for l in self.layers]
        self._build_freeze_masks()

    def summary(self) -> dict:
        if not self.omega:
            return {}
        return {
            "important_nodes": [int((o > 0).sum()) for o in self.omega],
            "nodes": [l.out_features for l in self.layers],
        }

    # ----- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"omega": self.omega, "old": self.old}

    def load_state_dict(self, state: dict) -> None:
        self.omega = [o.to(self.device) for o in state["omega"]]
        self.old = [(w.to(self.device), b.to(self.device)) for w, b in state["old"]]
        if self.omega:
            self._build_freeze_masks()
