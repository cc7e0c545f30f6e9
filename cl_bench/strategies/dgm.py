"""Dynamic Generative Memory (DGM-w, DGM-a): Ostapenko, Puscas, Klein, Jaehnichen & Nabi,
"Learning to Remember: A Synaptic Plasticity Driven Framework for Continual Learning",
CVPR 2019.

One conditional generator for all tasks (`models.gan_masks.MaskedGenerator`) learns a
binary mask per task over its weights (`mask: weights`, DGM-w) or its activations
(`mask: activations`, DGM-a); what earlier tasks' masks use is frozen, a sparsity
regulariser keeps each task's mask small, and after each task the network grows by as
many units as the task reserved (dynamic expansion). Past classes are generated through
their own task's binary mask, so they are never forgotten by the generator.

Discriminator and classifier (Sec. 3, AC-GAN with WGAN-GP): as in the paper, the
classifier evaluated at test time is the discriminator's auxiliary classification head.
Here the discriminator is the run's backbone (`model.features`) with two heads: the run's
class head (`model.head`, the AC head) and a linear critic head, so `predict` is the
default `model(x)` and the classifier's size is the run's parameter count. Images reach
the discriminator through the stream's normalisation. Losses of task t:
    L_D = E[D(G(z, c, M_t))] - E[D(x)] + lambda_GP * GP
          + aux * (CE(D_cls(x), y) + t * CE(D_cls(x'), y'))          x' = replay of past tasks
    L_G = -E[D(G(z, c, M_t))] + aux * CE(D_cls(G(z, c, M_t)), c) + lambda_RU * R(M_t)
CE is over the classes seen so far when `train.active_classes` is set (`Strategy.loss`).
The discriminator is also trained to classify replayed samples of the past classes
(generated through the past tasks' binary masks), first during the runner's epochs
(classification only, see `generative_replay`) and then jointly with the GAN.

Choices the paper leaves open: masks follow HAT (embeddings N(0, 1) at each task start,
s annealed over the task's generator iterations, binarised at e > 0 when it ends); the
mask embeddings get their own Adam step size `mask_lr` (with Adam, HAT's gradient
compensation alone cannot make them move at the generator's learning rate). In the
summary `discriminator_parameters` counts the critic head only: the rest of the
discriminator is the classifier (`classifier_parameters`). On a batch-norm backbone the
GAN phase runs the critic's batch norms on their running statistics (a WGAN-GP critic
must not normalise across the batch, Gulrajani et al. 2017 Sec. 4).
"""

from __future__ import annotations

import torch
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.gan_masks import MaskedGenerator
from cl_bench.strategies.generative_replay import GenerativeReplay


class DGM(GenerativeReplay):
    def __init__(
        self,
        mask: str = "weights",
        sparsity_weight: float = 0.75,
        s_max: float = 400.0,
        mask_lr: float = 0.02,
        aux_weight: float = 1.0,
        replay_ratio: float = 1.0,
        latent_dim: int = 64,
        generator_width: int = 32,
        generator_passes: int = 10,
        generator_batch_size: int = 64,
        generator_lr: float = 1e-3,
        critic_iterations: int = 2,
        gp_weight: float = 10.0,
        grid_samples_per_class: int = 0,
    ) -> None:
        if mask not in ("weights", "activations"):
            raise CLBenchError(f"strategy.mask must be weights (DGM-w) or activations (DGM-a), got {mask!r}")
        for key, value in (("sparsity_weight", sparsity_weight), ("aux_weight", aux_weight)):
            if value < 0:
                raise CLBenchError(f"strategy.{key} must be non-negative, got {value}")
        if mask_lr <= 0:
            raise CLBenchError(f"strategy.mask_lr must be positive, got {mask_lr}")
        self.mask_lr = mask_lr
        if s_max < 1:
            raise CLBenchError(f"strategy.s_max must be at least 1, got {s_max}")
        self.mask, self.sparsity_weight, self.s_max, self.aux_weight = mask, sparsity_weight, s_max, aux_weight
        super().__init__(
            replay_ratio, latent_dim, generator_width, 1, generator_passes,
            generator_batch_size, generator_lr, critic_iterations, gp_weight, grid_samples_per_class,
        )

    def build_modules(self) -> None:
        if not hasattr(self.model, "features") or not hasattr(self.model, "head"):
            raise CLBenchError("DGM needs a backbone with features() and head (its discriminator)")
        n = self.stream.num_outputs
        self.generator = MaskedGenerator(self.image_shape, self.latent_dim, n, self.generator_width, self.mask)
        self.generator.to(self.device)
        self.critic = nn.Linear(self.model.head.in_features, 1).to(self.device)
        self.units_added: list[dict] = []

    def generative_modules(self) -> dict:
        return {"generator": self.generator, "discriminator": self.critic}

    def discriminate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.features(self.stream.transform(x))
        return self.critic(f).squeeze(1), self.model.head(f)

    def replay(self, n: int, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """Equally many samples of each past task, each through its own binary mask."""
        xs, ys = [], []
        for s in range(task.id):
            k = n // task.id + (s < n % task.id)
            if k:
                outs = torch.tensor(self.stream.tasks[s].outputs, device=self.device)
                y = outs[torch.randint(len(outs), (k,), device=self.device)]
                xs.append(self.generator.sample(y, s))
                ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def train_generator(self, task: Task) -> None:
        n, iterations = self.generator_batch_size, self.generator_iterations(task)
        gen = self.generator
        # The critic is the classifier: batch-norm layers run on their running statistics
        # (from the classifier's real data), so the per-sample gradient penalty is valid
        # (Gulrajani et al. 2017, Sec. 4: no batch norm in a WGAN-GP critic) and fake or
        # interpolated images never enter the classifier's statistics.
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        gen.start_task()
        d_opt = self.adam(self.model, self.critic)
        # the mask embeddings get their own (larger) step: with Adam, HAT's gradient
        # compensation cannot speed them up, and at generator_lr they would barely move
        g_opt = torch.optim.Adam(
            [
                {"params": [gen.w1, gen.b1, gen.w2, gen.b2, gen.w3, gen.b3]},
                {"params": list(gen.embeddings.values()), "lr": self.mask_lr},
            ],
            lr=self.generator_lr,
            betas=(0.5, 0.9),
        )
        n_replay = self.replay_size(n, task)

        def classify_replay() -> torch.Tensor:
            with torch.no_grad():
                x, y = self.replay(n_replay, task)
            return self.aux_weight * task.id * self.loss(self.discriminate(x)[1], y)

        with self.progress("generator training", total=iterations) as advance:
            for i in range(iterations):
                gen.s = 1 / self.s_max + (self.s_max - 1 / self.s_max) * i / max(1, iterations - 1)
                self.wgan_gp_iteration(
                    lambda: self.real_batch(task, n),
                    lambda y: gen.sample(y, task.id),
                    self.discriminate,
                    d_opt,
                    g_opt,
                    aux_weight=self.aux_weight,
                    d_extra=classify_replay if n_replay else None,
                    g_extra=lambda: self.sparsity_weight * gen.sparsity_loss(),
                    before_g_step=lambda: gen.restrict_gradients(self.s_max),
                    aux_loss=self.loss,
                )
                gen.clamp_embeddings()
                advance()

    def consolidate(self, task: Task) -> None:
        self.units_added.append(self.generator.end_task())

    def class_samples(self, labels: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(labels), *self.image_shape, device=self.device)
        for t in self.stream.tasks[: len(self.generator.task_masks)]:
            sel = torch.isin(labels, torch.tensor(t.outputs, device=self.device))
            if sel.any():
                out[sel] = self.generator.sample(labels[sel], t.id)
        return out

    def summary(self) -> dict:
        used = self.generator.used()
        return {
            **super().summary(),
            "classifier": "discriminator auxiliary head (run's backbone + head)",
            "mask": self.mask,
            "generator_hidden_units": list(self.generator.hidden_units),
            "units_added": self.units_added[-1] if self.units_added else {},
            "mask_used_fraction": {k: float(v.float().mean()) for k, v in used.items()},
        }

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["modules"].pop("generator")
        state["generator_state"] = self.generator.get_state()
        state["units_added"] = list(self.units_added)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
        self.units_added = list(state["units_added"])
        super().load_state_dict(state)
