"""Memory Replay GANs (MeRGAN): Wu, Herranz, Liu, Wang, van de Weijer & Raducanu,
"Memory Replay GANs: learning to generate images from new categories without
forgetting", NeurIPS 2018.

A conditional generator G(z, c) trained as an AC-GAN with the WGAN-GP loss (Sec. 3, as
in the authors' code) keeps the past classes alive by replaying G_{t-1}, the frozen
generator of the previous task, in one of the paper's two ways (`variant`):

- `jtr`, joint training with replay (Sec. 4.1): G_t and D are trained on the union of
  task t's real data and a replay set {(G_{t-1}(z, c), c)} with c drawn from the past
  classes, in proportion 1 : t (so every class counts equally).
- `ra`, replay alignment (Sec. 4.2, Eq. 7): G_t and D see task t's real data only, and
  the generator loss gains lambda_RA * E_{z, c in past}[ ||G_t(z, c) - G_{t-1}(z, c)||^2 ]:
  the same latent code and label through the old and the new generator must give the
  same image (squared error averaged over pixels here; `alignment_weight` = lambda_RA).

The classifier (the run's model) is trained on real current data plus labelled replay
(G_{t-1}(z, c), c), c uniform over past classes (see `generative_replay`), the usual way
MeRGAN is used for class-incremental classification.
"""

from __future__ import annotations

from typing import Optional

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.generative import ACDiscriminator, ConditionalGenerator
from cl_bench.strategies.generative_replay import GenerativeReplay, frozen_copy


class MeRGAN(GenerativeReplay):
    def __init__(
        self,
        variant: str = "ra",
        alignment_weight: float = 10.0,
        aux_weight: float = 1.0,
        replay_ratio: float = 1.0,
        latent_dim: int = 64,
        generator_width: int = 32,
        discriminator_width: int = 32,
        generator_passes: int = 10,
        generator_batch_size: int = 64,
        generator_lr: float = 1e-3,
        critic_iterations: int = 2,
        gp_weight: float = 10.0,
        grid_samples_per_class: int = 0,
    ) -> None:
        if variant not in ("ra", "jtr"):
            raise CLBenchError(f"strategy.variant must be ra (replay alignment) or jtr (joint training with replay), got {variant!r}")
        if alignment_weight < 0:
            raise CLBenchError(f"strategy.alignment_weight must be non-negative, got {alignment_weight}")
        if aux_weight < 0:
            raise CLBenchError(f"strategy.aux_weight must be non-negative, got {aux_weight}")
        self.variant, self.alignment_weight, self.aux_weight = variant, alignment_weight, aux_weight
        super().__init__(
            replay_ratio, latent_dim, generator_width, discriminator_width, generator_passes,
            generator_batch_size, generator_lr, critic_iterations, gp_weight, grid_samples_per_class,
        )

    def build_modules(self) -> None:
        n = self.stream.num_outputs
        # no batch norm: replay alignment compares G_t and G_{t-1} sample by sample
        self.generator = ConditionalGenerator(self.image_shape, self.latent_dim, n, self.generator_width, batch_norm=False)
        self.generator.to(self.device)
        self.discriminator = ACDiscriminator(self.image_shape, n, self.discriminator_width).to(self.device)
        self.prev_generator: Optional[torch.nn.Module] = None

    def generative_modules(self) -> dict:
        return {"generator": self.generator, "discriminator": self.discriminator, "prev_generator": self.prev_generator}

    def past_labels(self, n: int, task: Task) -> torch.Tensor:
        past = self.past_outputs(task)
        return past[torch.randint(len(past), (n,), device=self.device)]

    def replay(self, n: int, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.past_labels(n, task)
        return self.prev_generator.sample(n, y), y

    def alignment_loss(self, task: Task) -> torch.Tensor:
        """Eq. 7: same z and past label c through G_t and G_{t-1}; squared error per pixel."""
        n = self.generator_batch_size
        y = self.past_labels(n, task)
        z = torch.randn(n, self.latent_dim, device=self.device)
        with torch.no_grad():
            target = self.prev_generator(z, y)
        return self.alignment_weight * (self.generator(z, y) - target).pow(2).mean()

    def train_generator(self, task: Task) -> None:
        n = self.generator_batch_size
        d_opt, g_opt = self.adam(self.discriminator), self.adam(self.generator)
        jtr = self.variant == "jtr" and task.id > 0
        ra = self.variant == "ra" and task.id > 0
        iterations = self.generator_iterations(task)
        with self.progress("generator training", total=iterations) as advance:
            for _ in range(iterations):
                self.wgan_gp_iteration(
                    (lambda: self.mixed_batch(task, n)) if jtr else (lambda: self.real_batch(task, n)),
                    lambda y: self.generator.sample(len(y), y),
                    self.discriminator,
                    d_opt,
                    g_opt,
                    aux_weight=self.aux_weight,
                    g_extra=(lambda: self.alignment_loss(task)) if ra else None,
                )
                advance()

    def consolidate(self, task: Task) -> None:
        self.prev_generator = frozen_copy(self.generator)

    def class_samples(self, labels: torch.Tensor) -> torch.Tensor:
        return self.generator.sample(len(labels), labels)
