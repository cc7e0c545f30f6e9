"""The Strategy base class: a few broad hooks with working defaults.

The runner owns the loop, seeding, devices, evaluation, timing and checkpoints; a
strategy decides what one training step does and what happens around each task:

    setup(model, stream, train_cfg, device)   once, before anything else
    before_task(task)                         fresh optimizer by default
    training_data(task) -> Split              what the runner iterates (joint: all seen tasks)
    train_step(batch) -> dict of scalars      one optimisation step
    after_task(task)                          consolidation (Fisher, exemplars, pruning, ...)
    summary() -> dict                         facts to report per task (memory, growth, ...)
    warn(message)                             a warning the runner logs once and writes to metrics.json
    progress(description, total) -> advance   progress of a long phase outside the training steps
    artifacts(task) -> {name: images}         image grids the runner saves as PNG (e.g. samples)
    predict(x, task_id=None) -> scores        scores over the head's outputs
    state_dict() / load_state_dict(state)     everything beyond the model needed to resume

A strategy declares the scenarios it supports in `scenarios`; the runner refuses any
other before training. Strategies return scalars and never print or write files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_bench import CLBenchError
from cl_bench.data.stream import Split, Stream, Task


@dataclass
class Batch:
    x: torch.Tensor  # model input: transformed (normalised, augmented) samples on the device
    y: torch.Tensor  # labels in output space
    raw: torch.Tensor  # the stored samples (uint8 images) the batch was drawn from, for memories
    task: Task


class PhaseProgress:
    """What `Strategy.progress` returns: a context manager giving an `advance(n=1)` callable.
    This one shows nothing; the runner's subclass draws a bar."""

    def __enter__(self):
        return self.advance

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class ClipGradNorm:
    """Optimizer step pre-hook: scale the gradients of the optimizer's parameters so that
    their total L2 norm is at most `max_norm` (torch.nn.utils.clip_grad_norm_, no host sync)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def __call__(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch.nn.utils.clip_grad_norm_(grads, self.max_norm)


class LossScaler:
    """Dynamic loss scaling for float16 training (train.precision=fp16; Micikevicius et al.
    2018, "Mixed Precision Training", Sec. 3.2), with torch.amp.GradScaler's defaults: losses
    are multiplied by `value` (2^16 at first) before backward so small float16 gradients do
    not flush to zero; before the optimizer step the gradients are divided by it again
    (`unscale`), and a step whose gradients hold inf/NaN is skipped and halves the scale;
    after `growth_interval` finite steps in a row the scale doubles. Scales are powers of
    two, so scaling and unscaling are exact in float32.

    clbench's own class rather than GradScaler because the strategies need what GradScaler
    keeps private: whether a step's gradients were finite (SI's path integral skips a
    skipped step), unscaling gradients a strategy reads or rewrites before the step (GEM's
    projection, EWC's penalty gradient), and unscaling tensors that are not `.grad`
    (GEM's reference gradients)."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.value, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # finite steps since the last change of scale
        self.steps = 0  # optimizer steps taken through the scaler (skipped ones included)
        self.skipped = 0
        self._unscaled: dict[int, bool] = {}  # id(param) -> finite, for this step's gradients

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.value

    @torch.no_grad()
    def unscale_tensors(self, tensors: list[torch.Tensor]) -> bool:
        """Divide `tensors` by the scale in place; True when all of them are finite."""
        tensors = [t for t in tensors if t is not None]
        if not tensors:
            return True
        torch._foreach_mul_(tensors, 1.0 / self.value)
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def unscale(self, params) -> bool:
        """Unscale the `.grad` of `params` (each once per step); True when all are finite."""
        todo = [p for p in params if p.grad is not None and id(p) not in self._unscaled]
        finite = self.unscale_tensors([p.grad for p in todo])
        for p in todo:
            self._unscaled[id(p)] = finite
        return all(self._unscaled.get(id(p), True) for p in params)

    def update(self, finite: bool) -> None:
        self._unscaled.clear()
        self.steps += 1
        if not finite:
            self.value *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.value *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"value": self.value, "good_steps": self.good_steps, "steps": self.steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.good_steps = float(state["value"]), int(state["good_steps"])
        self.steps, self.skipped = int(state["steps"]), int(state["skipped"])


def loss_diverged(loss: float, max_loss: float) -> bool:
    """The divergence rule of `train.max_loss` for an epoch's mean training loss: not finite,
    or above `max_loss` (which `max_loss <= 0` turns off). The runner applies it to every
    epoch, a strategy to the loops it runs itself (LwF's warm-up)."""
    return not (math.isfinite(loss) and (max_loss <= 0 or loss <= max_loss))


def precision_autocast(precision: str, device_type: str):
    """torch.autocast for train.precision bf16/fp16, else a context that does nothing.
    cache_enabled=False: the runner keeps one context around a whole task, and autocast's
    cache of low-precision weight copies would serve the first step's weights to every later
    forward pass (the optimizer updates the float32 weights in place)."""
    from contextlib import nullcontext

    if precision not in ("bf16", "fp16"):
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=False)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class Strategy:
    scenarios: tuple[str, ...] = ("class_il", "task_il", "domain_il")
    # float16 training (train.precision=fp16) needs every gradient of a training step to go
    # through `backward`/`scaled` and `optimizer_step` (loss scaling); a strategy says so here
    # and the runner refuses fp16 for one that does not
    supports_loss_scaling: bool = False
    # set by the runner for train.precision=fp16
    scaler: Optional[LossScaler] = None
    # True where the model gains or swaps modules from task to task (a column, units, a
    # network per task): train.compile then runs it eagerly instead of recompiling each task
    changes_model_shape: bool = False

    model: nn.Module
    stream: Stream
    device: torch.device
    optimizer: Optional[torch.optim.Optimizer]

    def setup(self, model: nn.Module, stream: Stream, train_cfg: Any, device: torch.device) -> None:
        if stream.scenario not in self.scenarios:
            raise CLBenchError(
                f"strategy {type(self).__name__} does not support scenario={stream.scenario}; "
                f"it supports {', '.join(self.scenarios)}"
            )
        self.model = model
        self.stream = stream
        self.train_cfg = train_cfg
        self.device = device
        self.optimizer = None
        self._label_masks = self._build_label_masks(stream).to(device)
        self.inactive: Optional[torch.Tensor] = None  # outputs of classes not yet seen (active_classes)
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        """Record a warning for the user: the runner prints each one once, in the log, and
        writes all of them to `metrics.json` ("warnings"). Strategies never print."""
        warnings = self.__dict__.setdefault("warnings", [])
        if message not in warnings:
            warnings.append(message)

    def begin_task(self, task: Task) -> None:
        """Called by the runner before `before_task`: with `train.active_classes` in class-IL,
        the outputs of tasks after `task` are masked out of every loss and prediction."""
        if self.stream.scenario == "class_il" and self.train_cfg.active_classes:
            seen = [o for t in self.stream.tasks[: task.id + 1] for o in t.outputs]
            self.inactive = torch.ones(self.stream.num_outputs, dtype=torch.bool, device=self.device)
            self.inactive[seen] = False

    def progress(self, description: str, total: Optional[int] = None) -> "PhaseProgress":
        """Show the progress of a long phase outside the training steps (generator training,
        a Fisher or importance pass, pruning and retraining, a bias-correction stage,
        exemplar selection), on the runner's progress display:

            with self.progress("Fisher", total=len(data)) as advance:
                for ...:
                    ...
                    advance()      # or advance(n)

        `total` counts whatever `advance` counts (batches, epochs, samples); None: unknown.
        Without a display (progress=false, or the strategy used outside the runner) it does nothing.
        """
        reporter = self.__dict__.get("_reporter")
        return PhaseProgress() if reporter is None else reporter(description, total)

    # ----- hooks -------------------------------------------------------------------
    def before_task(self, task: Task) -> None:
        if self.optimizer is None or self.train_cfg.reset_optimizer:
            self.optimizer = self.make_optimizer(self.model.parameters())

    def training_data(self, task: Task) -> Split:
        return task.train

    def train_step(self, batch: Batch) -> dict:
        loss = self.loss(self.model(batch.x), batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.optimizer_step()
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        pass

    def predict(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        return self.model(x)

    def validation_scores(self, x: torch.Tensor, task_id: Optional[int] = None) -> torch.Tensor:
        """Scores whose softmax cross-entropy is the validation loss of `train.validate` and
        `train.patience` (the runner's per-epoch validation): `predict`'s by default; a
        strategy whose `predict` is not logits-like during a task overrides it."""
        return self.predict(x, task_id)

    def set_training(self, training: bool) -> None:
        """Put `self.model`'s modules in training or evaluation mode (an override may keep
        some in eval, e.g. frozen batch norm). Set module flags only: the runner calls
        `set_training(True)` at the start of each task's training and again at an epoch's start
        only when some module's flag differs from what the last call left."""
        self.model.train(training)

    def summary(self) -> dict:
        """JSON-able facts the benchmark should report after each task (memory used,
        parameters per task, generator size, time spent in extra phases, ...)."""
        return {}

    def artifacts(self, task: Task) -> dict:
        """Images to save after `task`, as {file name: (N, C, H, W) float tensor in [0, 1]}.

        The runner writes each as a PNG grid under `<run dir>/artifacts/` (e.g. a
        generative-replay strategy's samples per class); strategies never write files.
        """
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ----- gradient steps (float16 loss scaling) -------------------------------------
    def autocast(self):
        """The run's autocast (train.precision bf16/fp16) for training a strategy does in its own
        loop outside the runner's steps (e.g. GDumb's training on its memory); else nothing."""
        return precision_autocast(str(getattr(self.train_cfg, "precision", "32")), self.device.type)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` times the loss scale under train.precision=fp16, else `loss`: for gradients
        taken with torch.autograd.grad (unscale them with `unscale_tensors`)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, loss-scaled under train.precision=fp16. A strategy that reads or
        changes gradients before `optimizer_step` calls `unscale()` first."""
        self.scaled(loss).backward()

    def unscale(self, optimizer: Optional[torch.optim.Optimizer] = None) -> bool:
        """Divide the gradients of `optimizer`'s parameters (default: the strategy's optimizer)
        by the loss scale, once per step; True when they are finite (always without fp16)."""
        if self.scaler is None:
            return True
        return self.scaler.unscale(_optimizer_params(optimizer or self.optimizer))

    def unscale_tensors(self, *tensors: torch.Tensor) -> bool:
        """Unscale gradient tensors that are not `.grad` (e.g. from torch.autograd.grad of a
        `scaled` loss); True when finite."""
        return True if self.scaler is None else self.scaler.unscale_tensors(list(tensors))

    def optimizer_step(self, *optimizers: torch.optim.Optimizer) -> bool:
        """`step()` of each optimizer (default: the strategy's). Under fp16: unscale first, and
        skip every step when any gradient is inf/NaN (the scale then shrinks). Returns
        whether the step was taken."""
        optimizers = optimizers or (self.optimizer,)
        if self.scaler is None:
            for optimizer in optimizers:
                optimizer.step()
            return True
        finite = all([self.unscale(optimizer) for optimizer in optimizers])
        if finite:
            for optimizer in optimizers:
                optimizer.step()
        self.scaler.update(finite)
        return finite

    # ----- shared pieces -----------------------------------------------------------
    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """train.optimizer over `params` (tensors or param-group dicts). With
        `train.clip_grad_norm`, every step first clips the total gradient norm of the
        optimizer's parameters (a step pre-hook: after whatever the strategy did to the
        gradients, e.g. GEM's projection or a FreezeGuard's zeroing)."""
        cfg = self.train_cfg
        name = getattr(cfg.optimizer, "value", cfg.optimizer)
        if name == "sgd":
            optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif name == "adam":
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            raise CLBenchError(f"unknown train.optimizer={name!r}; choose sgd, adam or adamw")
        clip = getattr(cfg, "clip_grad_norm", None)
        if clip:
            optimizer.register_step_pre_hook(ClipGradNorm(float(clip)))
        return optimizer

    def restrict(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """In task-IL, mask each sample's logits to the outputs of its own task.

        This is the shared-head equivalent of a head per task: the loss and the
        prediction only compete among the task's classes. Class-IL with
        `train.active_classes`: the classes not yet seen are masked. Else unchanged.
        """
        if self.stream.scenario != "task_il":
            return logits if self.inactive is None else logits.masked_fill(self.inactive, float("-inf"))
        return logits.masked_fill(~self._label_masks[y], float("-inf"))

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.restrict(logits, y), y)

    @staticmethod
    def _build_label_masks(stream: Stream) -> torch.Tensor:
        """masks[c] = the outputs of the task that label c belongs to (task-IL only)."""
        n = stream.num_outputs
        masks = torch.ones(n, n, dtype=torch.bool)
        if stream.scenario == "task_il":
            masks.zero_()
            for task in stream.tasks:
                outs = torch.tensor(task.outputs)
                masks[outs.unsqueeze(1), outs.unsqueeze(0)] = True
        return masks
