"""Shared mechanics of generative replay (DGR, MeRGAN, DGM): replay instead of stored data.

A `GenerativeReplay` strategy keeps no real images of past tasks. At task t it

1. trains the classifier (the run's model) on the current task's real batch mixed with
   `replay_ratio` x batch replayed samples of the past classes, produced by the strategy's
   frozen generative memory (`replay`). Following Shin et al. (2017, Sec. 3.2) the two
   losses are mixed as r * CE(real) + (1 - r) * CE(replay) with r = 1/(t+1), the
   importance of the new task that the DGR paper uses so each class counts equally;
2. after the classifier's epochs, trains its generator on task t (`train_generator`),
   timed apart from the classifier (`generator_train_s` in the summary);
3. freezes what the next task will replay from (`consolidate`).

Generators produce images in [0, 1] pixel space; before they reach the classifier they
go through the stream's own normalisation (`stream.transform`, which skips the /255 for
float input), exactly like stored uint8 images, so real and replayed inputs match.

The generator's length of training scales with the protocol: `generator_passes` passes
over the task's data per classifier epoch, i.e.
generator_passes * train.epochs * ceil(N_task / generator_batch_size) generator iterations, each with `critic_iterations` critic updates (WGAN-GP,
Gulrajani et al. 2017: Adam, betas (0.5, 0.9)). All sampling happens on the training
device with the global torch RNG, which the runner checkpoints, so resuming reproduces
the run.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Task
from cl_bench.models.generative import check_image_shape, gradient_penalty
from cl_bench.strategies.base import Batch, Strategy


def frozen_copy(module: nn.Module) -> nn.Module:
    copy_ = copy.deepcopy(module).eval()
    for p in copy_.parameters():
        p.requires_grad_(False)
    return copy_


def count_parameters(*modules: Optional[nn.Module]) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


class GenerativeReplay(Strategy):
    supports_loss_scaling = True  # every training-step gradient goes through backward/optimizer_step
    scenarios = ("class_il",)

    def __init__(
        self,
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
        values = dict(
            replay_ratio=replay_ratio, latent_dim=latent_dim, generator_width=generator_width,
            discriminator_width=discriminator_width, generator_passes=generator_passes,
            generator_batch_size=generator_batch_size, generator_lr=generator_lr,
            critic_iterations=critic_iterations, gp_weight=gp_weight, grid_samples_per_class=grid_samples_per_class,
        )
        may_be_zero = ("replay_ratio", "generator_passes", "gp_weight", "grid_samples_per_class")
        for key, value in values.items():
            if value < 0 or (value == 0 and key not in may_be_zero):
                need = "non-negative" if key in may_be_zero else "positive"
                raise CLBenchError(f"strategy.{key} must be {need}, got {value}")
        self.replay_ratio = replay_ratio
        self.latent_dim = latent_dim
        self.generator_width = generator_width
        self.discriminator_width = discriminator_width
        self.generator_passes = generator_passes
        self.generator_batch_size = generator_batch_size
        self.generator_lr = generator_lr
        self.critic_iterations = critic_iterations
        self.gp_weight = gp_weight
        self.grid_samples_per_class = grid_samples_per_class

    # ----- to implement ----------------------------------------------------------------
    def build_modules(self) -> None:
        """Create the generator(s)/discriminator once the stream's image shape is known."""
        raise NotImplementedError

    def replay(self, n: int, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples of the classes of tasks < task.id in [0, 1] pixel space, with labels."""
        raise NotImplementedError

    def train_generator(self, task: Task) -> None:
        raise NotImplementedError

    def consolidate(self, task: Task) -> None:
        """Freeze the memory the next task replays from."""

    def class_samples(self, labels: torch.Tensor) -> torch.Tensor:
        """Generated images of the given classes (for the sample grids)."""
        raise NotImplementedError

    def generative_modules(self) -> dict[str, Optional[nn.Module]]:
        """Modules that make up the strategy's state, by name (None while absent)."""
        raise NotImplementedError

    # ----- hooks ---------------------------------------------------------------------
    def setup(self, model, stream, train_cfg, device) -> None:
        super().setup(model, stream, train_cfg, device)
        self.image_shape = check_image_shape(stream.input_shape)
        self.generator_train_s: list[float] = []
        self.generator_iterations_done: list[int] = []
        self.build_modules()

    def past_outputs(self, task: Task) -> torch.Tensor:
        return torch.tensor([o for t in self.stream.tasks[: task.id] for o in t.outputs], device=self.device)

    def replay_size(self, n: int, task: Task) -> int:
        return 0 if task.id == 0 else int(round(self.replay_ratio * n))

    def mixed_loss(self, logits: torch.Tensor, y: torch.Tensor, logits_replay, y_replay, task: Task) -> torch.Tensor:
        """r * CE(current) + (1 - r) * CE(replay), r = 1/(t+1) (Shin et al. 2017, Sec. 3.2).
        `self.loss` is plain cross-entropy here (class-IL) unless `train.active_classes`
        masks the classes not seen yet."""
        loss = self.loss(logits, y)
        if logits_replay is None:
            return loss
        r = 1.0 / (task.id + 1)
        return r * loss + (1 - r) * self.loss(logits_replay, y_replay)

    def train_step(self, batch: Batch) -> dict:
        n_replay = self.replay_size(len(batch.y), batch.task)
        if n_replay:
            with torch.no_grad():
                x_r, y_r = self.replay(n_replay, batch.task)
            logits = self.model(torch.cat([batch.x, self.stream.transform(x_r)]))
            loss = self.mixed_loss(logits[: len(batch.y)], batch.y, logits[len(batch.y) :], y_r, batch.task)
        else:
            loss = self.mixed_loss(self.model(batch.x), batch.y, None, None, batch.task)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        self._sync()
        start = time.perf_counter()
        self.train_generator(task)
        self._sync()
        self.generator_train_s.append(time.perf_counter() - start)
        self.generator_iterations_done.append(self.generator_iterations(task))
        self.consolidate(task)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----- shared generator-training pieces -------------------------------------------
    def generator_iterations(self, task: Task) -> int:
        steps = math.ceil(len(task.train) / self.generator_batch_size)
        return self.generator_passes * self.train_cfg.epochs * steps

    def real_batch(self, task: Task, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n random training samples of `task` in [0, 1] pixel space."""
        idx = torch.randint(len(task.train), (n,), device=self.device)
        x = task.train.x[idx]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x, task.train.y[idx]

    def mixed_batch(self, task: Task, n: int, replay_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Current real data mixed with replay of the t past tasks in proportion t/(t+1),
        so a generator retrained on it models all tasks seen so far (DGR's generator, MeRGAN-JTR)."""
        n_replay = (n * task.id) // (task.id + 1)
        x, y = self.real_batch(task, n - n_replay)
        if n_replay:
            with torch.no_grad():
                x_r, y_r = (replay_fn or self.replay)(n_replay, task)
            x, y = torch.cat([x, x_r]), torch.cat([y, y_r])
        return x, y

    def adam(self, *modules: nn.Module, params=None) -> torch.optim.Optimizer:
        params = list(params) if params is not None else [p for m in modules for p in m.parameters()]
        return torch.optim.Adam(params, lr=self.generator_lr, betas=(0.5, 0.9))

    def wgan_gp_iteration(
        self,
        real_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        fake_fn: Callable[[torch.Tensor], torch.Tensor],
        discriminate: Callable[[torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]],
        d_opt: torch.optim.Optimizer,
        g_opt: torch.optim.Optimizer,
        aux_weight: float = 0.0,
        d_extra: Optional[Callable[[], torch.Tensor]] = None,
        g_extra: Optional[Callable[[], torch.Tensor]] = None,
        before_g_step: Optional[Callable[[], None]] = None,
        aux_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> dict:
        """One generator iteration of (AC-)WGAN-GP: `critic_iterations` critic updates, then
        one generator update. Losses (Gulrajani et al. 2017, Alg. 1; Odena et al. 2017):
            L_D = E[D(G(z, c))] - E[D(x)] + lambda_GP * GP + aux * CE(D_cls(x), y) (+ d_extra)
            L_G = -E[D(G(z, c))] + aux * CE(D_cls(G(z, c)), c) (+ g_extra)
        Fake labels c are the real batch's labels, so both share one class distribution.
        `aux_loss` is the CE of the class head (DGM: the run's head, via `self.loss`)."""
        for _ in range(self.critic_iterations):
            x, y = real_fn()
            with torch.no_grad():
                fake = fake_fn(y)
            score_real, logits_real = discriminate(x)
            score_fake, _ = discriminate(fake)
            d_loss = score_fake.mean() - score_real.mean()
            if self.gp_weight:
                d_loss = d_loss + self.gp_weight * gradient_penalty(lambda v: discriminate(v)[0], x, fake)
            if aux_weight and logits_real is not None:
                d_loss = d_loss + aux_weight * aux_loss(logits_real, y)
            if d_extra is not None:
                d_loss = d_loss + d_extra()
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        fake = fake_fn(y)
        score_fake, logits_fake = discriminate(fake)
        g_loss = -score_fake.mean()
        if aux_weight and logits_fake is not None:
            g_loss = g_loss + aux_weight * aux_loss(logits_fake, y)
        if g_extra is not None:
            g_loss = g_loss + g_extra()
        g_opt.zero_grad(set_to_none=True)
        d_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        if before_g_step is not None:
            before_g_step()
        g_opt.step()
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}

    # ----- reporting, images, state -----------------------------------------------------
    def generator_parameters(self) -> int:
        return count_parameters(self.generative_modules().get("generator"))

    def summary(self) -> dict:
        mods = self.generative_modules()
        return {
            "classifier_parameters": count_parameters(self.model),
            "generator_parameters": self.generator_parameters(),
            "discriminator_parameters": count_parameters(mods.get("discriminator")),
            "generator_train_s": self.generator_train_s[-1] if self.generator_train_s else 0.0,
            "generator_train_s_total": sum(self.generator_train_s),
            "generator_iterations": self.generator_iterations_done[-1] if self.generator_iterations_done else 0,
            "replay_ratio": self.replay_ratio,
        }

    def grid_size(self, num_classes: int) -> int:
        # one row per class: the runner lays N images out in round(sqrt(N)) columns
        return self.grid_samples_per_class or num_classes

    @torch.no_grad()
    def artifacts(self, task: Task) -> dict:
        seen = torch.tensor([o for t in self.stream.tasks[: task.id + 1] for o in t.outputs], device=self.device)
        k = self.grid_size(len(seen))
        return {"samples": self.class_samples(seen.repeat_interleave(k)).clamp(0, 1)}

    def state_dict(self) -> dict:
        return {
            "modules": {k: (m.state_dict() if m is not None else None) for k, m in self.generative_modules().items()},
            "generator_train_s": list(self.generator_train_s),
            "generator_iterations": list(self.generator_iterations_done),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator_train_s = list(state["generator_train_s"])
        self.generator_iterations_done = list(state["generator_iterations"])
        for name, sd in state["modules"].items():
            if sd is not None:
                self.restore_module(name, sd)

    def restore_module(self, name: str, sd: dict) -> None:
        """Load a saved module; frozen snapshots that do not exist yet are created first."""
        module = self.generative_modules()[name]
        if module is None:
            source = {"prev_generator": "generator", "prev_solver": "model"}[name]
            module = frozen_copy(self.model if source == "model" else self.generative_modules()[source])
            setattr(self, name, module)
        module.load_state_dict(sd)
