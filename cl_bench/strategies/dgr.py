"""Deep Generative Replay (DGR): Shin, Lee, Kim & Kim, "Continual Learning with Deep
Generative Replay", NeurIPS 2017.

The "scholar" is a generator plus a solver (the run's model). At task t:

- Solver (Sec. 3.2, Eq. 2): trained on real samples (x, y) of task t and on replayed
  inputs x' ~ G_{t-1} labelled by the previous solver, y' = argmax S_{t-1}(x') over the
  classes seen before t, with loss r * CE(S(x), y) + (1 - r) * CE(S(x'), y'),
  r = 1/(t+1) (see `generative_replay`). `replay_ratio` sets how many x' per real x.
- Generator (Sec. 3.1): retrained on a mix of task t's real inputs and samples of
  G_{t-1}, in proportion 1 : t, so that G_t models all tasks seen so far. The paper uses
  an unconditional WGAN-GP generator; `generator: vae` swaps in a VAE (as many DGR
  re-implementations do, e.g. van de Ven & Tolias 2018), trained on the same mix.

After task t the strategy keeps frozen copies G_t and S_t to replay at task t+1; no real
images are stored. The sample grid sorts G_t's samples into rows by S_t's label.
"""

from __future__ import annotations

from typing import Optional

import torch

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.generative import VAE, ACDiscriminator, ConditionalGenerator
from cl_bench.strategies.generative_replay import GenerativeReplay, frozen_copy


class DGR(GenerativeReplay):
    def __init__(
        self,
        generator: str = "gan",
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
        if generator not in ("gan", "vae"):
            raise CLBenchError(f"strategy.generator must be gan or vae, got {generator!r}")
        self.generator_kind = generator
        super().__init__(
            replay_ratio, latent_dim, generator_width, discriminator_width, generator_passes,
            generator_batch_size, generator_lr, critic_iterations, gp_weight, grid_samples_per_class,
        )

    def build_modules(self) -> None:
        if self.generator_kind == "vae":
            self.generator = VAE(self.image_shape, self.latent_dim, self.generator_width).to(self.device)
            self.discriminator = None
        else:
            self.generator = ConditionalGenerator(self.image_shape, self.latent_dim, 0, self.generator_width).to(self.device)
            self.discriminator = ACDiscriminator(self.image_shape, 0, self.discriminator_width).to(self.device)
        self.prev_generator: Optional[torch.nn.Module] = None
        self.prev_solver: Optional[torch.nn.Module] = None

    def generative_modules(self) -> dict:
        return {
            "generator": self.generator,
            "discriminator": self.discriminator,
            "prev_generator": self.prev_generator,
            "prev_solver": self.prev_solver,
        }

    def generator_parameters(self) -> int:
        # the VAE's encoder is only needed to train it; the replaying part is its decoder
        gen = self.generator.decoder if self.generator_kind == "vae" else self.generator
        return sum(p.numel() for p in gen.parameters())

    def label(self, solver: torch.nn.Module, x: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """The solver's hard labels for generated inputs, among `outputs` (the classes it has seen)."""
        return outputs[solver(self.stream.transform(x))[:, outputs].argmax(1)]

    def replay(self, n: int, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prev_generator.sample(n)
        return x, self.label(self.prev_solver, x, self.past_outputs(task))

    def unlabelled_replay(self, n: int, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        # the generator is unconditional: its training mix needs no labels
        return self.prev_generator.sample(n), torch.zeros(n, dtype=torch.long, device=self.device)

    def train_generator(self, task: Task) -> None:
        iterations, n = self.generator_iterations(task), self.generator_batch_size
        self.generator.train()
        with self.progress("generator training", total=iterations) as advance:
            if self.generator_kind == "vae":
                opt = self.adam(self.generator)
                for _ in range(iterations):
                    loss = self.generator.loss(self.mixed_batch(task, n, self.unlabelled_replay)[0])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    advance()
            else:
                d_opt, g_opt = self.adam(self.discriminator), self.adam(self.generator)
                for _ in range(iterations):
                    self.wgan_gp_iteration(
                        lambda: self.mixed_batch(task, n, self.unlabelled_replay),
                        lambda y: self.generator.sample(len(y)),
                        self.discriminator,
                        d_opt,
                        g_opt,
                    )
                    advance()
        self.generator.eval()

    def consolidate(self, task: Task) -> None:
        self.prev_generator = frozen_copy(self.generator)
        self.prev_solver = frozen_copy(self.model)

    def class_samples(self, labels: torch.Tensor) -> torch.Tensor:
        """An unconditional generator has no classes: draw a pool, label it with the solver,
        and fill each class's slots with samples the solver puts in that class (blank if too few)."""
        self.model.eval()
        classes, counts = labels.unique_consecutive(return_counts=True)
        pool = self.generator.sample(40 * len(labels))
        pool_y = self.label(self.model, pool, classes)
        out = torch.zeros(len(labels), *self.image_shape, device=self.device)
        start = 0
        for c, k in zip(classes.tolist(), counts.tolist()):
            mine = pool[pool_y == c][:k]
            out[start : start + len(mine)] = mine
            start += k
        return out
