"""Variational Continual Learning (Nguyen, Li, Bui & Turner, ICLR 2018).

The network is a mean-field Gaussian Bayesian MLP (`cl_bench.models.bayesian`) built in
`setup` with the hidden sizes of the configured MLP backbone. Task t maximises the ELBO
(Eq. 4) with the previous posterior as the prior (Eq. 2):

    L_t(q) = E_q[ log p(D_t | theta) ] - KL(q_t(theta) || q_{t-1}(theta)),

estimated per mini-batch as mean NLL over `train_samples` weight samples plus KL / N_t
(N_t the task's training-set size, as in the authors' code); q_0 = N(0, 1). As in the
authors' code, the means of the first task are initialised by maximum likelihood
(`mle_init`: the same number of epochs of plain training of the means) and all log
variances start at `init_log_var` = -6. The output units of each new task start as a
fresh head (new means, log variance -6, prior N(0, 1)), as the authors' multi-head
network creates a new head per task; in domain-IL the one shared head is kept.

Coreset (Alg. 1, optional): `coreset_size` random training samples per task are held
out of that task's training data. The propagated posterior q_t never sees them; for
prediction a copy of it is further trained on the union of all coresets (prior: q_t)
for `coreset_epochs` epochs (0: train.epochs) and that copy predicts. Prediction
averages the softmax over `test_samples` weight samples (in task-IL over the task's
own outputs, the shared-head form of the paper's multi-head network) and returns the
log of the averaged probabilities.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Split, Stream, Task, iterate_batches
from cl_bench.models.bayesian import BayesianMLP
from cl_bench.strategies.base import Batch, Strategy
from cl_bench.strategies.importance import check_positive


class VCL(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    def __init__(
        self,
        train_samples: int = 10,
        test_samples: int = 100,
        init_log_var: float = -6.0,
        mle_init: bool = True,
        coreset_size: int = 0,
        coreset_epochs: int = 0,
    ) -> None:
        for name, value in (("train_samples", train_samples), ("test_samples", test_samples)):
            check_positive(name, value)
        for name, value in (("coreset_size", coreset_size), ("coreset_epochs", coreset_epochs)):
            check_positive(name, value, allow_zero=True)
        self.train_samples, self.test_samples = int(train_samples), int(test_samples)
        self.init_log_var, self.mle_init = float(init_log_var), bool(mle_init)
        self.coreset_size, self.coreset_epochs = int(coreset_size), int(coreset_epochs)
        self.coresets: list[Split] = []
        self.coreset_model: Optional[BayesianMLP] = None

    def setup(self, model: nn.Module, stream: Stream, train_cfg, device: torch.device) -> None:
        super().setup(model, stream, train_cfg, device)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears or any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules()):
            raise CLBenchError("strategy=vcl builds a Bayesian MLP and needs backbone=mlp")
        hidden = [m.out_features for m in linears[:-1]]
        self.model = BayesianMLP(math.prod(stream.input_shape), hidden, stream.num_outputs, self.init_log_var)
        self.model.to(device)

    # ----- data ---------------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        self.train_split = task.train
        if self.coreset_size:
            perm = torch.randperm(len(task.train)).to(self.device)
            self.coresets.append(task.train.subset(perm[: self.coreset_size]))
            self.train_split = task.train.subset(perm[self.coreset_size :])
        if self.stream.scenario != "domain_il":
            self.model.head.reset_outputs(task.outputs, self.init_log_var)
        if task.id == 0 and self.mle_init:
            self._maximum_likelihood_init(self.train_split)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self._check_step_stability()

    def _check_step_stability(self) -> None:
        """KL(q || q_{t-1}) / N is a quadratic anchor of each mean, (mu - mu_prior)^2 / (2 N sigma_prior^2),
        of curvature 1 / (N sigma_prior^2); plain SGD on it diverges when lr times that exceeds 2.
        Warn once (at half that bound, as the quadratic penalties do) when the narrowest prior gets there."""
        name = getattr(self.train_cfg.optimizer, "value", self.train_cfg.optimizer)
        if name != "sgd" or self.__dict__.get("_stability_warned"):
            return
        precision = max(
            float((-torch.cat([layer.prior_weight_log_var.flatten(), layer.prior_bias_log_var.flatten()])).exp().max())
            for layer in self.model.layers()
        )
        value = float(self.train_cfg.lr) * precision / len(self.train_split)
        if value > 1.0 + float(self.train_cfg.momentum):
            self._stability_warned = True
            self.warn(
                f"VCL: train.lr * KL curvature = {self.train_cfg.lr:g} / (N={len(self.train_split)} * narrowest prior "
                f"variance {1 / precision:.3g}) = {value:.3g} > {1.0 + float(self.train_cfg.momentum):g} (plain SGD "
                f"on the KL term diverges above {2 * (1.0 + float(self.train_cfg.momentum)):g}); lower train.lr or "
                f"use train.optimizer=adam"
            )

    def training_data(self, task: Task) -> Split:
        return self.train_split

    def _maximum_likelihood_init(self, data: Split) -> None:
        means = [p for n, p in self.model.named_parameters() if n.endswith("_mu")]
        optimizer = self.make_optimizer(means)
        epochs, batch_size = self.train_cfg.epochs, self.train_cfg.batch_size
        with self.progress("maximum-likelihood init", total=epochs * -(-len(data) // batch_size)) as advance:
            for _ in range(epochs):
                for idx in iterate_batches(len(data), batch_size, None, self.device):
                    x = self.stream.transform(data.x[idx], train=True)
                    loss = self.loss(self.model.forward_mean(x), data.y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    advance()  # batches

    # ----- training -----------------------------------------------------------------------
    def elbo_loss(self, model: BayesianMLP, x: torch.Tensor, y: torch.Tensor, n_data: int) -> tuple:
        logits = model(x, self.train_samples)
        nll = self.loss(logits.flatten(0, 1), y.repeat(self.train_samples))
        kl = model.kl() / n_data
        return nll + kl, nll, kl

    def train_step(self, batch: Batch) -> dict:
        loss, nll, kl = self.elbo_loss(self.model, batch.x, batch.y, len(self.train_split))
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach(), "nll": nll.detach(), "kl": kl.detach()}

    def after_task(self, task: Task) -> None:
        self.model.posterior_to_prior()
        if self.coresets:
            self.coreset_model = self._train_on_coresets()

    def _train_on_coresets(self) -> BayesianMLP:
        model = copy.deepcopy(self.model)  # its prior is q_t, just set
        data = Split.cat(self.coresets)
        optimizer = self.make_optimizer(model.parameters())
        model.train()
        epochs, batch_size = self.coreset_epochs or self.train_cfg.epochs, self.train_cfg.batch_size
        with self.progress("coreset training", total=epochs * -(-len(data) // batch_size)) as advance:
            for _ in range(epochs):
                for idx in iterate_batches(len(data), batch_size, None, self.device):
                    x = self.stream.transform(data.x[idx], train=True)
                    loss = self.elbo_loss(model, x, data.y[idx], len(data))[0]
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    advance()  # batches
        return model

    # ----- inference ----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        model = self.coreset_model if self.coreset_model is not None else self.model
        probs = torch.zeros(len(x), self.stream.num_outputs, device=x.device)
        mask = None
        if task_id is not None:
            mask = torch.ones(self.stream.num_outputs, dtype=torch.bool, device=x.device)
            mask[torch.tensor(self.stream.tasks[task_id].outputs, device=x.device)] = False
        for start in range(0, self.test_samples, 10):  # chunks of weight samples bound the memory
            logits = model(x, min(10, self.test_samples - start))
            if mask is not None:
                logits = logits.masked_fill(mask, float("-inf"))
            probs += F.softmax(logits, dim=-1).sum(0)
        return (probs / self.test_samples).log()

    def summary(self) -> dict:
        sigma = torch.cat([(0.5 * layer.weight_log_var.detach()).exp().flatten() for layer in self.model.layers()])
        return {
            "coreset_samples": sum(len(c) for c in self.coresets),
            "posterior_sigma_mean": float(sigma.mean()),
            "kl_to_prior": float(self.model.kl().detach()),
        }

    # ----- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "coresets": [(c.x, c.y) for c in self.coresets],
            "coreset_model": self.coreset_model.state_dict() if self.coreset_model is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.coresets = [Split(x.to(self.device), y.to(self.device)) for x, y in state["coresets"]]
        self.coreset_model = None
        if state["coreset_model"] is not None:
            self.coreset_model = copy.deepcopy(self.model)
            self.coreset_model.load_state_dict(state["coreset_model"])
