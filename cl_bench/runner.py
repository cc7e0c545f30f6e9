"""The task loop: train each task in turn, evaluate every task after each one.

Owns seeding, device placement, batching, evaluation, timing and checkpoints.

Checkpoints (`checkpoint.pt` in the run folder, one file, always written atomically):

- After each task the full state (model, strategy, optimizer, RNG states, the matrix
  so far, the time spent) is saved, so a killed run started again on the same folder
  continues after the last finished task and ends with the same matrix.
- With `checkpoint_every` (N epochs, N optimizer steps or a wall time) and when a stop
  signal arrives, the runner also saves *inside* a task. Design: the file keeps the
  state at the start of the task in progress (the last task boundary, exactly what the
  between-task checkpoint holds) plus a mid-task snapshot under "mid". A mid-task
  resume loads the boundary state, reruns the task start (`begin_task`,
  `before_task`, `training_data`) from it, so whatever a strategy derives from the
  model at the task start (LwF's teacher, EWC's anchors, SI's start point, PackNet's
  masks, hooks, ...) is recomputed from the same weights and RNG states as the first
  time, and then loads the snapshot on top: model, optimizer, all RNG states (the
  data generator drives the data order and the augmentation), the epoch's
  permutation and position, the running loss sums, the task's validation history and
  early-stopping state (best loss, epoch and weights, epochs without gain; the lr schedule
  is a function of the position, see `lr_factor`), and the strategy state that the
  task's training steps changed (`capture_task_state`: every tensor, module, optimizer,
  generator, buffer and plain value among the strategy's attributes, restored in place;
  a strategy may define `task_state()` / `load_task_state(state)` to do this itself).
  On the CPU the resumed run ends bit-identical to an uninterrupted one.
- SIGTERM, SIGUSR1/SIGUSR2 (Slurm, submitit) and SIGINT only set a flag; at the next
  step boundary (or after the task's evaluation, when the signal came outside the
  training loop) the runner saves a checkpoint and raises `RunInterrupted`, or, when a
  Python handler was installed before (e.g. submitit's requeue handler), calls that.
- `progress["elapsed_s"]` (and the snapshot's) carry the time spent by every process
  that worked on the run, so the timing in metrics.json covers all of them.
"""

from __future__ import annotations

import hashlib
import json
import io
import math
import platform
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

import cl_bench
from cl_bench import CLBenchError
from cl_bench.config import build, plain_train_config, preflight
from cl_bench.data.stream import Stream, output_columns
from cl_bench.metrics import all_metrics
from cl_bench.results import atomic_write_bytes, write_results
from cl_bench.checkpointing import (  # noqa: F401  (RunInterrupted, parse_checkpoint_every: public here)
    STOP_SIGNALS,
    RunInterrupted,
    capture_task_state,
    parse_checkpoint_every,
    restore_task_state,
)
from cl_bench.strategies.base import Batch, LossScaler, PhaseProgress, Strategy, loss_diverged, precision_autocast

CHECKPOINT = "checkpoint.pt"
# Strategy.after_task as defined (it does nothing): a strategy that keeps it changes no weight at a task's end
_NO_CONSOLIDATION = Strategy.after_task
# 2: "mid" (a mid-task snapshot or None) and progress["elapsed_s"].
CHECKPOINT_VERSION = 2
_CHECKPOINT_KEYS = {"version", "fingerprint", "model", "strategy", "optimizer", "rng", "progress"}
# Keys that may differ between a run and its resumption without changing its results.
# The clock of checkpoint_every's wall-time form (a name of its own so tests can drive it).
_monotonic = time.monotonic
_RESUME_FREE_KEYS = ("resume", "progress", "output_dir", "checkpoint", "checkpoint_every", "objective", "logger")
def _group_names(opt: Optional[torch.optim.Optimizer], model: torch.nn.Module) -> Optional[list[list[str]]]:
    """The optimizer's parameter groups as lists of the model's parameter names (None when
    it holds a parameter outside the model), so that a resumed run rebuilds the same groups
    (e.g. HAT's: no weight decay on the task embeddings) before loading the optimizer state."""
    if opt is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names.get(id(p)) for p in g["params"]] for g in opt.param_groups]
    return None if any(n is None for g in groups for n in g) else groups


def _param_groups(groups: Optional[list[list[str]]], model: torch.nn.Module) -> Optional[list[dict]]:
    if not groups:
        return None
    params = dict(model.named_parameters())
    if any(n not in params for g in groups for n in g):
        return None
    return [{"params": [params[n] for n in g]} for g in groups]


def resolve_device(name: str) -> torch.device:
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CLBenchError(
                f"device={name} was requested but CUDA is not available here "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}); "
                "use device=cpu, or device=auto to take a GPU only when there is one"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLBenchError(
                f"device={name} was requested but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        return device
    raise CLBenchError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")


class DivergenceError(CLBenchError):
    """Training produced a non-finite loss or non-finite weights: no correct number can come out."""


def nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of `module`'s floating-point parameters and buffers holding NaN or inf.

    One host sync for the whole module. The common case (all finite) is decided from each
    tensor's sum, which is NaN or inf when any element is (and costs a twentieth of an
    elementwise `isfinite`); only when a sum is not finite (a bad weight, or finite weights
    large enough to overflow the sum) are the tensors checked element by element.
    """
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    if not named:
        return []
    sums = torch.stack([t.detach().sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
                        for _, t in named])
    if bool(torch.isfinite(sums).all()):
        return []
    flags = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(flags.all()):
        return []
    return [n for (n, _), ok in zip(named, flags.tolist()) if not ok]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def config_fingerprint(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in _RESUME_FREE_KEYS:
        data.pop(key, None)
    for key in ("num_threads", "memory_fraction"):  # how fast, not what is computed
        data.get("device", {}).pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.inference_mode()
def evaluate(
    strategy: Strategy, stream: Stream, batch_size: int, split: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy on every task's test set: (as the scenario allows, restricted to the task's outputs).

    The first is the scenario's accuracy: task-IL gives the task id (prediction among
    the task's outputs), class-IL and domain-IL do not. The second always restricts
    the prediction to the task's outputs (the task-aware view reported for class-IL).
    `split="val"` evaluates each task's validation split instead (for tuning).
    """
    strategy.set_training(False)
    device, aware_only = strategy.device, stream.task_id_at_test
    # per-batch counts of correct predictions, stacked and brought to the host once at the end
    # (no running sum per task: a task's test set is usually a single batch)
    sums, owners = [], []  # owners[i]: (task index, 0 = scenario's / 1 = task-aware) of sums[i]
    for i, task in enumerate(stream.tasks):
        columns = output_columns(task.outputs, device)  # a slice for consecutive outputs: no gather
        task_id = task.id if aware_only else None
        data = task.val if split == "val" else task.test
        for start in range(0, len(data), batch_size):
            # .to() is a no-op for data on the device; host-resident (pinned) data is copied per batch
            x = stream.transform(data.x[start : start + batch_size].to(device, non_blocking=True))
            y = data.y[start : start + batch_size].to(device, non_blocking=True)
            scores = strategy.predict(x, task_id)
            if strategy.inactive is not None:  # class-IL with train.active_classes
                scores = scores.masked_fill(strategy.inactive, float("-inf"))
            pred_aware = scores[:, columns].argmax(1)
            if not isinstance(columns, slice):
                pred_aware = columns[pred_aware]
            elif columns.start:
                pred_aware += columns.start
            sums.append((pred_aware == y).sum())  # task-IL: the scenario's accuracy is this one
            owners.append((i, 1))
            if not aware_only:
                sums.append((scores.argmax(1) == y).sum())
                owners.append((i, 0))
    counts = np.zeros((len(stream.tasks), 2), dtype=np.int64)
    for (i, kind), c in zip(owners, torch.stack(sums).tolist() if sums else []):
        counts[i, kind] += c
    if aware_only:
        counts[:, 0] = counts[:, 1]
    sizes = np.array([len(task.val if split == "val" else task.test) for task in stream.tasks], dtype=np.float64)
    return counts[:, 0] / sizes, counts[:, 1] / sizes  # exact counts, one correctly rounded division each


def lr_factor(train_cfg: Any, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The factor on every param group's base lr at the task's step `step` (0-based, in epoch
    `epoch`); the schedule restarts at each task.

    multistep: gamma ** (number of milestones <= epoch), as torch's MultiStepLR stepped once per
    epoch (the iCaRL/LUCIR/PyCIL protocols); cosine: from 1 at the end of the warm-up to
    min_lr / lr, one value per epoch, as CosineAnnealingLR(T_max = epochs - warmup) stepped per
    epoch (PODNet); warm-up: linear per step, (step + 1) / (warmup_epochs * steps_per_epoch),
    multiplying the schedule, so the lr rises smoothly instead of in a few large jumps.
    """
    scheduler = getattr(train_cfg.scheduler, "value", train_cfg.scheduler)
    warmup = int(train_cfg.warmup_epochs)
    factor = 1.0
    if scheduler == "multistep":
        factor = float(train_cfg.gamma) ** sum(1 for m in train_cfg.milestones if epoch >= m)
    elif scheduler == "cosine":
        span = int(train_cfg.epochs) - warmup
        if epoch >= warmup and span > 0:
            floor = float(train_cfg.min_lr) / float(train_cfg.lr)
            factor = floor + (1.0 - floor) * (1.0 + math.cos(math.pi * (epoch - warmup) / span)) / 2.0
    warmup_steps = warmup * steps_per_epoch
    if step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    return factor


@torch.no_grad()
def validate_task(strategy: Strategy, stream: Stream, task, batch_size: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the strategy on `task`'s validation split, in the
    scenario's sense (as `evaluate`): task-IL gives the task id and scores among the task's
    outputs; class-IL and domain-IL score over the whole head (classes masked by
    train.active_classes left out). The loss is the cross-entropy of softmax(scores) for the
    scores `strategy.validation_scores(x, task_id)` gives: `predict`'s by default (logits for
    most strategies, VCL's log of the predictive probabilities), the network's logits for
    iCaRL (whose nearest-mean scores do not exist yet for a task's new classes).
    No augmentation and no draw from the data generator."""
    strategy.set_training(False)
    device, data = strategy.device, task.val
    outputs = torch.tensor(task.outputs, device=device)
    position = torch.full((stream.num_outputs,), -1, dtype=torch.long, device=device)
    position[outputs] = torch.arange(len(outputs), device=device)
    task_id = task.id if stream.task_id_at_test else None
    score = strategy.validation_scores
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(data), batch_size):
        x = stream.transform(data.x[start : start + batch_size].to(device, non_blocking=True))
        y = data.y[start : start + batch_size].to(device, non_blocking=True)
        scores = score(x, task_id).float()
        if strategy.inactive is not None:  # class-IL with train.active_classes
            scores = scores.masked_fill(strategy.inactive, float("-inf"))
        if stream.task_id_at_test:
            scores = scores[:, outputs]
            loss_sum += F.cross_entropy(scores, position[y], reduction="sum")
            pred = outputs[scores.argmax(1)]
        else:
            loss_sum += F.cross_entropy(scores, y, reduction="sum")
            pred = scores.argmax(1)
        correct += (pred == y).sum()
    loss, hits = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).tolist()  # one host sync
    return loss / len(data), hits / len(data)


class Runner:
    def __init__(
        self,
        cfg: DictConfig,
        output_dir: str | Path,
        names: Optional[dict[str, str]] = None,
        console: Any = None,
    ) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.names = names or {}
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self.console = console

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ----- building ------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        preflight(cfg)
        self.device = resolve_device(cfg.device.name)
        if cfg.device.num_threads is not None:
            torch.set_num_threads(cfg.device.num_threads)
        if self.device.type == "cuda" and cfg.device.memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(float(cfg.device.memory_fraction), self.device)
        torch.backends.cudnn.deterministic = bool(cfg.device.deterministic)
        torch.backends.cudnn.benchmark = not cfg.device.deterministic
        seed_everything(cfg.seed)
        scenario = getattr(cfg.scenario, "value", cfg.scenario)
        stream = build(cfg.dataset, "dataset", scenario=scenario, seed=cfg.seed)
        if not isinstance(stream, Stream):
            raise CLBenchError(f"dataset._target_ must return a Stream, got {type(stream).__name__}")
        if stream.scenario != scenario:
            raise CLBenchError(
                f"dataset {cfg.dataset._target_} built a {stream.scenario} stream but scenario={scenario}; "
                "give the dataset function a `scenario` argument and pass it on to the Stream"
            )
        self.eval_split = getattr(cfg.eval_split, "value", cfg.eval_split)
        if self.eval_split == "val" and any(t.val is None or len(t.val) == 0 for t in stream.tasks):
            raise CLBenchError("eval_split=val needs a validation split: set dataset.val_fraction > 0 (e.g. 0.2)")
        if (cfg.train.validate or cfg.train.patience > 0) and any(t.val is None or len(t.val) == 0 for t in stream.tasks):
            raise CLBenchError("train.validate and train.patience need a validation split: set dataset.val_fraction > 0 (e.g. 0.1)")
        self.stream = stream.to(self.device)
        model = build(
            cfg.backbone, "backbone", input_shape=stream.input_shape, num_outputs=stream.num_outputs
        )
        self.backbone_weights = getattr(model, "pretrained_weights", None)
        self.strategy: Strategy = build(cfg.strategy, "strategy")
        if not isinstance(self.strategy, Strategy):
            raise CLBenchError(f"strategy._target_ must build a Strategy, got {type(self.strategy).__name__}")
        if cfg.device.channels_last and len(stream.input_shape) == 3:
            model = model.to(memory_format=torch.channels_last)
            self.stream.transform.memory_format = torch.channels_last
        # a plain snapshot of `train` for the loop and the strategies: reading a key of an OmegaConf node
        # costs ~15 us, which the per-step paths (lr schedule, strategies' batch sizes) would pay every step
        self.train_cfg = plain_train_config(cfg.train)
        self.strategy.setup(model.to(self.device), self.stream, self.train_cfg, self.device)
        if str(cfg.train.precision) == "fp16":
            self.strategy.scaler = LossScaler()
        if cfg.train.compile:
            self._compile_model(cfg.train.compile_backend)
        self.data_generator = torch.Generator().manual_seed(cfg.seed)
        # torch imports its compiler stack lazily at the first optimizer construction
        # (seconds); pay that here so task 0's train time measures training.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    def _compile_model(self, backend: str) -> None:
        """train.compile: torch.compile the strategy's model in place (its model(x) calls), or
        say in one line why the run stays eager."""
        strategy = self.strategy
        self._compiled = False
        if strategy.changes_model_shape:
            strategy.warn(
                f"train.compile: {type(strategy).__name__} changes its model's shape from task to task; "
                "the run stays eager (no compilation)"
            )
            return
        if type(strategy.model).forward is torch.nn.Module.forward:  # containers (ModuleList, ...)
            strategy.warn(f"train.compile: {type(strategy.model).__name__} has no forward to compile; the run stays eager")
            return
        strategy.model.compile(backend=backend)
        self._compiled = True

    # ----- checkpoints -----------------------------------------------------------------
    def _rng_state(self) -> dict:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "data": self.data_generator.get_state(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.strategy.scaler is not None:  # not random, but saved and restored at the same points
            state["loss_scaler"] = self.strategy.scaler.state_dict()
        return state

    def _set_rng_state(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"].cpu())
        self.data_generator.set_state(state["data"].cpu())
        if "loss_scaler" in state:
            self.strategy.scaler.load_state_dict(state["loss_scaler"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)

    def _elapsed(self) -> float:
        """Seconds spent on this run by every process so far (earlier ones up to their last save)."""
        return self._elapsed_before + (time.perf_counter() - self._t_start)

    def _boundary_state(self, progress: dict) -> dict:
        opt = self.strategy.optimizer
        return {
            "version": CHECKPOINT_VERSION,
            "fingerprint": config_fingerprint(self.cfg),
            "model": self.strategy.model.state_dict(),
            "strategy": self.strategy.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else None,
            "optimizer_groups": _group_names(opt, self.strategy.model),
            "rng": self._rng_state(),
            "progress": progress,
            "mid": None,
        }

    def _save_checkpoint(self, progress: dict) -> None:
        """The between-task checkpoint; also the boundary a later mid-task snapshot builds on."""
        progress["elapsed_s"] = self._elapsed()
        buf = io.BytesIO()
        torch.save(self._boundary_state(progress), buf)
        atomic_write_bytes(self.output_dir / CHECKPOINT, buf.getvalue())
        self._set_boundary(buf.getvalue())

    def _set_boundary(self, data: Optional[bytes]) -> None:
        """Keep the serialised state at the start of the next task (a deep copy: training
        changes the live tensors in place); mid-task saves write it again next to their snapshot."""
        self._boundary_bytes, self._boundary_cache = data, None
        self._mark_saved()

    def _mark_saved(self) -> None:
        self._steps_since_save, self._last_save = 0, _monotonic()

    def _save_mid(self, task, position: dict) -> None:
        """Write the boundary state plus a snapshot of the task in progress (see the module docstring)."""
        if position.get("order") is not None:
            self._flush_step_losses()  # the loggers hold every step up to the snapshot
        if self._boundary_cache is None:
            ckpt = torch.load(io.BytesIO(self._boundary_bytes), map_location="cpu", weights_only=False)
            self._boundary_cache = {k: ckpt[k] for k in ("model", "strategy", "optimizer", "optimizer_groups", "rng")}
        strategy, opt = self.strategy, self.strategy.optimizer
        mid = {
            "task": task.id,
            **position,
            "model": strategy.model.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else None,
            "strategy": capture_task_state(strategy),
            "rng": self._rng_state(),
            "train_s": self._task_train_before + (time.perf_counter() - self._task_t0),
            "elapsed_s": self._elapsed(),
            # validation history and early-stopping state (best loss, epoch and weights, epochs without gain)
            "controls": getattr(self, "_controls", None),
        }
        ckpt = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": config_fingerprint(self.cfg),
            **self._boundary_cache,
            "progress": self._live_progress,
            "mid": mid,
        }
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        atomic_write_bytes(self.output_dir / CHECKPOINT, buf.getvalue())
        self._mark_saved()

    def _load_mid(self, mid: dict) -> None:
        """Put the mid-task snapshot over the state the rerun task start produced."""
        strategy = self.strategy
        restore_task_state(strategy, mid["strategy"], self.device)
        strategy.model.load_state_dict(mid["model"])
        if mid["optimizer"] is not None:
            if strategy.optimizer is None:
                strategy.optimizer = strategy.make_optimizer(strategy.model.parameters())
            strategy.optimizer.load_state_dict(mid["optimizer"])
        self._set_rng_state(mid["rng"])

    def _load_checkpoint(self) -> Optional[dict]:
        path = self.output_dir / CHECKPOINT
        if not (self.cfg.resume and path.exists()):
            return None
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise CLBenchError(f"cannot read the checkpoint {path} ({exc}); delete it or pass resume=false") from None
        if not (isinstance(ckpt, dict) and _CHECKPOINT_KEYS <= ckpt.keys()):
            raise CLBenchError(f"{path} is not a clbench checkpoint; delete it or pass resume=false")
        if ckpt["version"] != CHECKPOINT_VERSION:
            raise CLBenchError(
                f"{path} was written by another clbench version (checkpoint format {ckpt['version']}, this one "
                f"reads {CHECKPOINT_VERSION}); finish the run with that version, or pass resume=false to start over"
            )
        if ckpt["fingerprint"] != config_fingerprint(self.cfg):
            raise CLBenchError(
                f"the checkpoint in {self.output_dir} was made with a different config; "
                "use a new run folder or resume=false to start over"
            )
        # The strategy first: it may rebuild a grown model before the weights are loaded.
        self.strategy.load_state_dict(ckpt["strategy"])
        self.strategy.model.load_state_dict(ckpt["model"])
        if ckpt["optimizer"] is not None and not self.cfg.train.reset_optimizer:
            model = self.strategy.model
            self.strategy.optimizer = self.strategy.make_optimizer(
                _param_groups(ckpt.get("optimizer_groups"), model) or model.parameters()
            )
            self.strategy.optimizer.load_state_dict(ckpt["optimizer"])
        self._set_rng_state(ckpt["rng"])
        progress, mid = ckpt["progress"], ckpt.get("mid")
        if mid is not None and mid["task"] != progress["tasks_done"]:
            raise CLBenchError(f"{path} is not a clbench checkpoint; delete it or pass resume=false")
        self._resume_mid = mid
        self._elapsed_before = float(mid["elapsed_s"] if mid is not None else progress.get("elapsed_s", 0.0))
        if self.cfg.checkpoint:
            self._boundary_bytes = path.read_bytes()  # the state at the start of the task in progress
        return progress

    # ----- divergence guard ---------------------------------------------------------------
    def _diverged(self, task, where: str, loss: Optional[float] = None, weights: bool = True) -> None:
        """Fail the run when the loss (summed on the device over the epoch, so one NaN or
        inf step makes it non-finite) or, with `weights`, any weight/buffer of the model is
        not finite. Weights are checked after a task's last epoch and after its end-of-task
        phase (a non-finite weight earlier makes the next epoch's loss non-finite anyway);
        the per-epoch check is the loss alone, one host sync."""
        t = self.train_cfg
        bad = nonfinite_tensors(self.strategy.model) if weights else []
        loss_bad = loss is not None and loss_diverged(loss, t.max_loss)
        if not (loss_bad or bad):
            return
        if loss_bad:
            what = f"the training loss is {loss:.4g}" + (f" (above train.max_loss={t.max_loss:g})" if math.isfinite(loss) else "")
        else:
            what = f"{len(bad)} weight tensor(s) are not finite (e.g. {bad[0]})"
        causes = getattr(self.strategy, "warnings", [])
        cause = causes[-1] if causes else (
            f"train.lr={t.lr} is too large for train.optimizer={getattr(t.optimizer, 'value', t.optimizer)}, "
            "or the strategy's penalty strength is too large for it; lower either"
        )
        raise DivergenceError(f"training diverged in task {task.id}, {where}: {what}; likely cause: {cause}")

    # ----- the loop --------------------------------------------------------------------
    def _train_task(self, task, progress_bar) -> dict:
        strategy, cfg = self.strategy, self.train_cfg
        mid, self._resume_mid = getattr(self, "_resume_mid", None), None
        # On a mid-task resume the task start reruns from the boundary state first (see
        # the module docstring), then the snapshot goes on top.
        strategy.begin_task(task)
        strategy.before_task(task)
        data = strategy.training_data(task)
        steps_per_epoch = -(-len(data) // cfg.batch_size)
        loss_sum, steps = torch.zeros((), device=self.device), 0
        first_epoch, first_batch, order, epoch_loss = 0, 0, None, None
        # per-epoch validation and early stopping of this task (in every mid-task snapshot)
        self._controls = {"val": [], "best_loss": math.inf, "best_epoch": None, "best_state": None,
                          "bad_epochs": 0, "epochs_run": None}
        if mid is not None:
            self._load_mid(mid)
            first_epoch, first_batch, order, steps = mid["epoch"], mid["batch"], mid["order"], mid["steps"]
            loss_sum = mid["loss_sum"].to(self.device)
            epoch_loss = None if mid["epoch_loss"] is None else mid["epoch_loss"].to(self.device)
            if mid.get("controls") is not None:
                self._controls = mid["controls"]
        bar = None
        if progress_bar is not None:
            bar = progress_bar.add_task(
                f"task {task.id}", total=cfg.epochs * steps_per_epoch, loss="", unit="steps",
                completed=first_epoch * steps_per_epoch + (first_batch if order is not None else 0),
            )
        # the global step (over all tasks) before this task's first step, for the loggers
        self._step_offset = self._global_step(getattr(self, "_live_progress", {"train_log": []}))
        with self._autocast():
            steps, loss_sum = self._train_epochs(task, data, bar, progress_bar, first_epoch, first_batch, order,
                                                 steps, loss_sum, epoch_loss)
        controls = self._controls
        epochs_run = controls["epochs_run"] or cfg.epochs
        if controls["best_state"] is not None:  # early stopping: the best validation epoch's weights
            strategy.model.load_state_dict(controls["best_state"])
        strategy.after_task(task)  # consolidation (Fisher, pruning, generators, ...) in float32
        if strategy.scaler is not None and steps and strategy.scaler.steps == 0:
            raise CLBenchError(
                f"train.precision=fp16: {type(strategy).__name__} trained {int(steps)} steps without loss scaling "
                "(none went through Strategy.optimizer_step); use train.precision=bf16 or 32"
            )
        # weights were last checked after the last epoch; check them again when something changed them since
        if type(strategy).after_task is not _NO_CONSOLIDATION or controls["best_state"] is not None:
            self._diverged(task, "after the task (the strategy's consolidation)")
        log = {
            "mean_loss": (loss_sum / max(steps, 1)).item(),
            "steps": steps,
            "samples": len(data) * epochs_run,
            "parameters": count_parameters(strategy.model),
            "strategy": strategy.summary(),
        }
        if controls["val"]:
            log["val"] = controls["val"]
        if cfg.patience > 0:
            log["early_stopping"] = {"epochs_run": epochs_run, "stopped_early": epochs_run < cfg.epochs,
                                     "best_epoch": controls["best_epoch"], "best_val_loss": controls["best_loss"]}
        self._controls = None
        return log

    def _autocast(self):
        """torch.autocast for train.precision=bf16/fp16 (training steps and evaluation), else nothing."""
        return precision_autocast(str(self.train_cfg.precision), self.device.type)

    def _train_epochs(self, task, data, bar, progress_bar, first_epoch, first_batch, order, steps, loss_sum,
                      epoch_loss):
        """The epochs of one task (from a mid-task position on a resume); (steps, loss sum)."""
        strategy, stream, cfg = self.strategy, self.stream, self.train_cfg
        n, batch_size = len(data), cfg.batch_size
        steps_per_epoch = -(-n // batch_size)
        every = self._every
        # Per-step losses stay on the device and reach the loggers once per epoch (and before
        # a mid-task save), so logging costs no host sync per step.
        step_losses: Optional[list] = [] if self._log_step_losses else None
        scheduled = getattr(cfg.scheduler, "value", cfg.scheduler) != "none" or cfg.warmup_epochs > 0
        validating = cfg.validate or cfg.patience > 0
        logged_lr = None
        clock, shown = time.perf_counter, 0.0
        modes = None  # every module's training flag right after the last set_training(True)
        model, modules = None, []  # the model's modules, listed once per task (or when the model is replaced)
        for epoch in range(first_epoch, cfg.epochs):
            # Training mode again only where a flag changed since (a strategy's step that left a
            # module in eval; validation restores the mode itself): set_training walks every module,
            # about 60 us for the MLP, while reading the flags of the listed modules costs one.
            if strategy.model is not model:
                model, modules, modes = strategy.model, list(strategy.model.modules()), None
            if modes is None or modes != [m.training for m in modules]:
                strategy.set_training(True)
                modes = [m.training for m in modules]
            if order is None:  # a fresh epoch: the same draw as data.stream.iterate_batches
                order = torch.randperm(n, generator=self.data_generator)
                first_batch, epoch_loss = 0, torch.zeros((), device=self.device)
            self._pending_log = (task, epoch, steps, step_losses)
            order_on_device = order.to(self.device)
            pending = 0  # steps not yet shown on the progress bar (it is refreshed at most 20 times a second)
            for b in range(first_batch, steps_per_epoch):
                if scheduled or logged_lr is None:
                    lr = self._set_lr(lr_factor(cfg, epoch, steps, steps_per_epoch)) if scheduled else self._lr()
                    if lr != logged_lr and lr is not None:
                        self._log({"train/lr": lr}, self._step_offset + steps + 1)
                    logged_lr = lr
                idx = order_on_device[b * batch_size : (b + 1) * batch_size]
                raw, y = data.batch(idx, self.device)  # plain indexing when the data is on the device
                batch = Batch(stream.transform(raw, train=True, generator=self.data_generator), y, raw, task)
                loss = strategy.train_step(batch)["loss"]
                epoch_loss += loss
                if step_losses is not None:
                    step_losses.append(loss)  # no device op per step: stacked at the flush
                steps += 1
                if bar is not None:
                    pending += 1
                    if clock() - shown >= 0.05:
                        progress_bar.update(bar, advance=pending)
                        pending, shown = 0, clock()
                if self._watch:  # a stop signal came, or checkpoint_every is set: no cost otherwise
                    self._step_boundary(task, dict(
                        epoch=epoch, batch=b + 1, order=order, steps=steps, loss_sum=loss_sum, epoch_loss=epoch_loss,
                    ))
            loss_sum += epoch_loss
            self._flush_step_losses()
            epoch_mean = (epoch_loss / steps_per_epoch).item()  # the one host sync of the epoch
            self._diverged(task, f"epoch {epoch}", epoch_mean, weights=epoch == cfg.epochs - 1)
            if bar is not None:
                progress_bar.update(bar, advance=pending, loss=f"loss {epoch_mean:.4f}")
            order, first_batch = None, 0
            if validating and self._validate_epoch(task, epoch, steps):
                self._controls["epochs_run"] = epoch + 1
                break  # early stopping: out of patience
            if every is not None and every[0] == "epochs" and (epoch + 1) % every[1] == 0:
                self._save_mid(task, dict(
                    epoch=epoch + 1, batch=0, order=None, steps=steps, loss_sum=loss_sum, epoch_loss=None,
                ))
        return steps, loss_sum

    # ----- training controls: lr schedule, validation, early stopping -------------------------
    def _lr(self) -> Optional[float]:
        opt = self.strategy.optimizer
        return float(opt.param_groups[0]["lr"]) if opt is not None and opt.param_groups else None

    def _set_lr(self, factor: float) -> Optional[float]:
        """Every param group of the strategy's optimizer at `factor` x its base lr (kept in the
        group as "initial_lr", like torch's schedulers, so a kept optimizer restarts from it and
        the value travels in the optimizer's state_dict); the first group's lr."""
        # a strategy's other optimizers of its training steps (Piggyback's mask optimizer) follow the schedule too
        optimizers = [self.strategy.optimizer, *(getattr(self.strategy, "scheduled_optimizers", None) or ())]
        for opt in optimizers:
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        return self._lr()

    def _validate_epoch(self, task, epoch: int, steps: int) -> bool:
        """Validation loss and accuracy of the current task after `epoch` (logged and kept for the
        train_log); with train.patience, the early-stopping bookkeeping. True: stop the task."""
        cfg, controls, strategy = self.train_cfg, self._controls, self.strategy
        # the strategy's predict may draw random numbers (e.g. VCL's weight samples): fork every torch
        # RNG so that validation changes nothing in training
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            loss, acc = validate_task(strategy, self.stream, task, cfg.eval_batch_size)
        strategy.set_training(True)  # as the epoch left it (the strategy's end-of-task phase expects it)
        controls["val"].append({"epoch": epoch, "loss": loss, "acc": acc})
        self._log({"val/loss": loss, "val/acc": acc}, self._step_offset + steps)
        if cfg.patience <= 0:
            return False
        if not math.isfinite(loss):  # nothing to compare: this epoch neither improves nor counts against patience
            strategy.warn(
                f"train.patience: the validation loss of task {task.id} is not finite ({loss}: the strategy's "
                "validation_scores give some of the task's classes no finite score while it trains); "
                "such epochs do not count for early stopping"
            )
            return False
        if loss < controls["best_loss"]:
            controls["best_loss"], controls["best_epoch"], controls["bad_epochs"] = loss, epoch, 0
            controls["best_state"] = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
            return False
        controls["bad_epochs"] += 1
        return controls["bad_epochs"] >= cfg.patience

    # ----- logging --------------------------------------------------------------------------
    # The run's loggers (cl_bench.loggers) receive scalars under a global step: the number of
    # optimizer steps over all tasks so far.
    _log_step_losses = False  # true when a logger wants the loss of every step

    def _flush_step_losses(self) -> None:
        """Send the losses of the current epoch's steps not yet logged to the loggers."""
        if self._pending_log is None:
            return
        task, epoch, steps_before, losses = self._pending_log
        if losses:
            values = torch.stack([loss.float() for loss in losses]).tolist()  # one host sync
            losses.clear()
            self._log_steps(task, epoch, self._step_offset + steps_before, values)
            steps_before += len(values)
        self._pending_log = (task, epoch, steps_before, losses)

    _loggers = None  # cl_bench.loggers.RunLoggers while run() runs

    def _log_steps(self, task, epoch: int, start: int, losses: list[float]) -> None:
        """Per-step training losses: `losses[i]` is global step `start + i + 1`."""
        if self._loggers is None:
            return
        self._loggers.log_steps(getattr(task, "id", task), epoch, start, losses, self._lr())

    def _log(self, metrics: dict, step: int) -> None:
        """Scalars (name -> float) at global step `step`, for every active logger."""
        if self._loggers is not None:
            self._loggers.log_scalars(metrics, step)

    def _global_step(self, progress: dict) -> int:
        """Optimizer steps over the tasks finished so far (the global step at a task boundary)."""
        return sum(log["steps"] for log in progress["train_log"])

    def _start_loggers(self, progress: dict, fresh: bool) -> None:
        """Start the run's loggers (the config as hyperparameters). A resumed run gives them the
        checkpoint's global step: what an earlier process logged after it is not logged twice."""
        from cl_bench.loggers import RunLoggers

        loggers = RunLoggers(self.cfg)
        if not loggers.loggers:
            return
        mid = self._resume_mid
        resume_step = None if fresh else self._global_step(progress) + (int(mid["steps"]) if mid else 0)
        self._loggers = loggers
        self._log_step_losses = loggers.wants_steps
        names = self.names
        name = (f"{names.get('strategy', type(self.strategy).__name__.lower())} "
                f"{names.get('dataset', self.stream.name)} seed={self.cfg.seed} ({self.output_dir.name})")
        loggers.start(self.output_dir, OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True), resume_step,
                      name)

    def _log_task(self, task, progress: dict, acc, acc_aware) -> None:
        """After a task's evaluation (and checkpoint): every task's accuracy, the task's time and loss."""
        if self._loggers is None:
            return
        log = progress["train_log"][-1]
        extra = {"time/task_train_s": progress["train_s"][-1], "time/task_eval_s": progress["eval_s"][-1],
                 "train/task_mean_loss": log["mean_loss"]}
        aware = acc_aware if self.stream.scenario == "class_il" else None
        self._loggers.log_eval(task.id, self._global_step(progress), acc, aware, extra)

    def _close_loggers(self, status: str) -> None:
        loggers, self._loggers = self._loggers, None
        if loggers is not None:
            loggers.close(status)

    # ----- stop signals and mid-task checkpoints ------------------------------------------
    def _step_boundary(self, task, position: dict) -> None:
        if self._stop_signal is not None:
            self._stop(f"in task {task.id}, epoch {position['epoch']} (step {position['steps']})",
                       lambda: self._save_mid(task, position))
            return
        kind, amount = self._every
        if kind == "steps":
            self._steps_since_save += 1
            due = self._steps_since_save >= amount
        else:
            due = kind == "seconds" and _monotonic() - self._last_save >= amount
        if due:
            self._save_mid(task, position)

    def _stop(self, where: str, save) -> None:
        """Act on the pending stop signal at a boundary: save (when checkpointing is on and
        `save` is given; None: the checkpoint was just written), then hand the signal to
        the handler installed before ours, or raise RunInterrupted."""
        signum, frame = self._stop_signal, self._stop_frame
        if self.cfg.checkpoint and save is not None:
            save()
        self._stop_signal, self._stop_frame, self._watch = None, None, self._every is not None
        previous = self._previous_handlers.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # e.g. submitit: requeue the job and exit; if it returns, go on
            return
        raise RunInterrupted(signum, where, saved=bool(self.cfg.checkpoint))

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (checkpoint writes are atomic)
        self._stop_signal, self._stop_frame, self._watch = signum, frame, True

    def _install_signal_handlers(self) -> None:
        self._previous_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue  # the launcher asked for this signal to be ignored (e.g. SIGINT under nohup &)
            self._previous_handlers[sig] = previous
            signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous_handlers = {}

    # ----- the run ------------------------------------------------------------------------
    def prepare(self) -> None:
        """Build everything and read the checkpoint, writing nothing: every error raised
        here is a refused run that leaves the run folder as it was."""
        self._t_start = time.perf_counter()
        self._every = parse_checkpoint_every(self.cfg.checkpoint_every) if self.cfg.checkpoint else None
        self._watch = self._every is not None
        self._stop_signal = self._stop_frame = None
        self._previous_handlers: dict = {}
        self._resume_mid: Optional[dict] = None
        self._elapsed_before = 0.0
        self._boundary_bytes: Optional[bytes] = None
        self._boundary_cache: Optional[dict] = None
        self._mark_saved()
        self._pending_log = None
        self.build()
        self._progress = self._load_checkpoint()

    def run(self) -> dict:
        """Train and evaluate every task not done yet; the summary (metrics.json's content).
        The run's loggers are closed however it ends."""
        try:
            summary = self._run_tasks()
        except BaseException as exc:
            self._close_loggers("interrupted" if isinstance(exc, (RunInterrupted, KeyboardInterrupt)) else "failed")
            raise
        self._close_loggers("finished")
        return summary

    def _run_tasks(self) -> dict:
        if not hasattr(self, "_progress"):
            self.prepare()
        T = len(self.stream)
        progress = self._progress
        mid = self._resume_mid
        if progress is None:
            with self._autocast():
                b, b_aware = evaluate(self.strategy, self.stream, self.cfg.train.eval_batch_size, self.eval_split)
            progress = {
                "tasks_done": 0,
                "R": np.full((T, T), np.nan),
                "R_aware": np.full((T, T), np.nan),
                "init": b,
                "init_aware": b_aware,
                "train_s": [],
                "eval_s": [],
                "train_log": [],
                "warnings": [],
            }
        elif progress["tasks_done"] > 0 or mid is not None:
            at = f"; task {mid['task']} continues at epoch {mid['epoch']}, step {mid['steps']}" if mid else ""
            self.console.print(
                f"resuming from {self.output_dir / CHECKPOINT}: {progress['tasks_done']}/{T} tasks done{at}",
                markup=False, highlight=False, soft_wrap=True,
            )
        if progress["tasks_done"] == T:
            stored = self._stored_summary(progress)
            if stored is not None:  # a finished run: report it, rewrite nothing
                return stored
        self._live_progress = progress
        self._start_loggers(progress, fresh=self._progress is None)

        self._install_signal_handlers()
        try:
            with self._progress_bar() as bar:
                self._live_bar = bar
                if bar is not None:
                    self.strategy._reporter = self._phase
                for task in self.stream.tasks[progress["tasks_done"] :]:
                    self._current_task = task.id
                    if self.cfg.checkpoint and self._boundary_bytes is None:
                        # The first task of a fresh run: keep its start state for mid-task saves.
                        buf = io.BytesIO()
                        torch.save(self._boundary_state(progress), buf)
                        self._set_boundary(buf.getvalue())
                    mid = self._resume_mid
                    self._task_train_before = float(mid["train_s"]) if mid is not None else 0.0
                    self._sync()
                    t0 = self._task_t0 = time.perf_counter()
                    log = self._train_task(task, bar)
                    self._sync()
                    t1 = time.perf_counter()
                    with self._autocast():
                        acc, acc_aware = evaluate(
                            self.strategy, self.stream, self.cfg.train.eval_batch_size, self.eval_split
                        )
                    t2 = time.perf_counter()
                    progress["R"][task.id], progress["R_aware"][task.id] = acc, acc_aware
                    progress["train_s"].append(self._task_train_before + (t1 - t0))
                    progress["eval_s"].append(t2 - t1)
                    progress["train_log"].append(log)
                    progress["tasks_done"] = task.id + 1
                    progress["peak_memory_bytes"] = max(progress.get("peak_memory_bytes", 0), self._peak_memory())
                    self._log_warnings(progress)
                    self._save_artifacts(task)
                    if self.cfg.checkpoint:
                        self._save_checkpoint(progress)
                    # logged once the checkpoint holds the task: a resume never logs it again
                    self._log_task(task, progress, acc, acc_aware)
                    if self._stop_signal is not None and task.id + 1 < T:
                        self._stop(f"after task {task.id}", save=None)  # saved just above
        finally:
            self._restore_signal_handlers()
            self.strategy.__dict__.pop("_reporter", None)

        summary = self._summary(progress, self._elapsed())
        R = progress["R"]
        R_aware = progress["R_aware"] if self.stream.scenario == "class_il" else None
        write_results(self.output_dir, summary, R, R_aware)
        if self._loggers is not None:
            self._loggers.log_final(summary, self._global_step(progress))
        return summary

    def _stored_summary(self, progress: dict) -> Optional[dict]:
        """metrics.json of this finished run (the matrix the checkpoint holds), else None."""
        try:
            summary = json.loads((self.output_dir / "metrics.json").read_text(encoding="utf-8"))
            stored = np.asarray(summary["accuracy_matrix"], dtype=float)
        except Exception:
            return None  # missing or unreadable: written again from the checkpoint
        return summary if np.array_equal(stored, progress["R"]) else None

    def _log_warnings(self, progress: dict) -> None:
        """Print each new strategy warning once and keep it (checkpointed) for metrics.json."""
        seen = progress.setdefault("warnings", [])
        for message in getattr(self.strategy, "warnings", []):
            if message not in seen:
                seen.append(message)
                self.console.print(f"clbench: warning: {message}", markup=False, highlight=False, soft_wrap=True)

    def _save_artifacts(self, task) -> None:
        images = self.strategy.artifacts(task)
        if not images:
            return
        import io

        from torchvision.utils import save_image

        folder = self.output_dir / "artifacts"
        for name, grid in images.items():
            buf = io.BytesIO()
            grid = grid.detach().float().cpu().clamp(0, 1)
            save_image(grid, buf, format="png", nrow=int(max(1, round(len(grid) ** 0.5))))
            atomic_write_bytes(folder / f"task{task.id}_{name}.png", buf.getvalue())

    def _progress_bar(self):
        from contextlib import nullcontext

        if not self.cfg.progress:
            return nullcontext(None)
        from rich.progress import (
            BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}  {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )

    def _phase(self, description: str, total: Optional[int]) -> PhaseProgress:
        """A line of its own on the live progress display for a strategy's long phase."""
        return _BarPhase(self._live_bar, f"task {self._current_task}: {description}", total)

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            import resource
        except ImportError:  # not on POSIX
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if platform.system() == "Darwin" else peak * 1024)  # bytes on macOS, KiB on Linux

    def _throughput(self, progress: dict) -> dict:
        """Training and evaluation samples per second over the whole run (every process)."""
        train_samples = sum(log["samples"] for log in progress["train_log"])
        split = "val" if self.eval_split == "val" else "test"
        per_eval = sum(len(getattr(t, split)) for t in self.stream.tasks)
        eval_samples = per_eval * len(progress["eval_s"])
        rate = lambda n, s: n / s if s > 0 else None  # noqa: E731
        return {
            "train_samples_per_s": rate(train_samples, sum(progress["train_s"])),
            "eval_samples_per_s": rate(eval_samples, sum(progress["eval_s"])),
        }

    def _summary(self, progress: dict, wall_s: float) -> dict:
        stream, cfg = self.stream, self.cfg
        R, R_aware = progress["R"], progress["R_aware"]
        metrics = all_metrics(R, progress["init"])
        summary = {
            "status": "completed",
            "strategy": self.names.get("strategy", type(self.strategy).__name__.lower()),
            "dataset": self.names.get("dataset", stream.name),
            "backbone": self.names.get("backbone", type(self.strategy.model).__name__.lower()),
            "scenario": stream.scenario,
            "eval_split": self.eval_split,
            "seed": int(cfg.seed),
            "device": str(self.device),
            "num_tasks": len(stream),
            "classes_per_task": [task.classes for task in stream.tasks],
            # the dataset of each task where tasks are whole datasets (dataset=sequence), else null
            "task_names": [task.name for task in stream.tasks],
            "class_order": list(stream.class_order),
            "parameters": count_parameters(self.strategy.model),
            # the backbone's pretrained weights (torchvision's enum name or the file), null when it started random
            "backbone_weights": self.backbone_weights,
            "strategy_info": self.strategy.summary(),
            "metrics": metrics,
            "metrics_task_aware": all_metrics(R_aware, progress["init_aware"]) if stream.scenario == "class_il" else None,
            "accuracy_matrix": R.tolist(),
            "random_init_accuracy": progress["init"].tolist(),
            "timing": {
                "train_s": progress["train_s"],
                "eval_s": progress["eval_s"],
                "total_s": wall_s,
                **self._throughput(progress),
            },
            # on CUDA torch's max_memory_allocated, on the CPU the process's peak resident set;
            # the largest over the processes that worked on the run
            "peak_memory_bytes": max(progress.get("peak_memory_bytes", 0), self._peak_memory()),
            "deterministic": bool(cfg.device.deterministic),
            # train.precision=fp16: the final loss scale and how many steps it skipped (inf/NaN gradients)
            "loss_scaling": None if self.strategy.scaler is None else {
                "final_scale": self.strategy.scaler.value, "steps": self.strategy.scaler.steps,
                "skipped_steps": self.strategy.scaler.skipped},
            "channels_last": bool(cfg.device.channels_last),
            "compiled": getattr(self, "_compiled", False),
            "train_log": progress["train_log"],
            "warnings": list(progress.get("warnings", [])),
            "versions": {
                "clbench": cl_bench.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            "output_dir": str(self.output_dir),
        }
        if stream.scenario == "class_il":
            summary["accuracy_matrix_task_aware"] = R_aware.tolist()
        return summary


class _BarPhase(PhaseProgress):
    """A strategy phase on the rich progress display (redrawn at most 20 times a second)."""

    def __init__(self, progress, description: str, total: Optional[int]) -> None:
        self.progress, self.done, self.shown = progress, 0, 0.0
        self.bar = progress.add_task(description, total=total, loss="", unit="")

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.shown >= 0.05:
            self.progress.update(self.bar, completed=self.done)
            self.shown = now

    def close(self) -> None:
        # a phase that ended early (e.g. CPG's growing once its accuracy goal is met) ends full
        self.progress.update(self.bar, completed=self.done, total=self.done)
        self.progress.stop_task(self.bar)
