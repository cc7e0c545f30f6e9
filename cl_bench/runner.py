"""The task loop: train each task in turn, evaluate every task after each one.

Owns seeding, device placement, batching, evaluation, timing and checkpoints. After
each task the full state (model, strategy, optimizer, RNG states, the matrix so far)
is saved to `checkpoint.pt` in the run folder, so a killed run started again on the
same folder continues after the last finished task and ends with the same matrix.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import cl_bench
from cl_bench import CLBenchError
from cl_bench.config import build, preflight
from cl_bench.data.stream import Stream, iterate_batches
from cl_bench.metrics import all_metrics
from cl_bench.results import atomic_write_bytes, print_summary, write_results
from cl_bench.strategies.base import Batch, Strategy

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = {"version", "fingerprint", "model", "strategy", "optimizer", "rng", "progress"}
# Keys that may differ between a run and its resumption without changing its results.
_RESUME_FREE_KEYS = ("resume", "progress", "output_dir", "checkpoint", "objective")


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

    One host sync for the whole module (a stacked flag), so it is cheap once per epoch.
    """
    named = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    if not named:
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
    data.get("device", {}).pop("num_threads", None)
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
    acc, acc_aware = np.zeros(len(stream)), np.zeros(len(stream))
    for task in stream.tasks:
        outputs = torch.tensor(task.outputs, device=strategy.device)
        correct = torch.zeros((), dtype=torch.long, device=strategy.device)
        correct_aware = torch.zeros_like(correct)
        task_id = task.id if stream.task_id_at_test else None
        data = task.val if split == "val" else task.test
        for start in range(0, len(data), batch_size):
            # .to() is a no-op for data on the device; host-resident (pinned) data is copied per batch
            x = stream.transform(data.x[start : start + batch_size].to(strategy.device, non_blocking=True))
            y = data.y[start : start + batch_size].to(strategy.device, non_blocking=True)
            scores = strategy.predict(x, task_id)
            if strategy.inactive is not None:  # class-IL with train.active_classes
                scores = scores.masked_fill(strategy.inactive, float("-inf"))
            pred_aware = outputs[scores[:, outputs].argmax(1)]
            pred = pred_aware if stream.task_id_at_test else scores.argmax(1)
            correct += (pred == y).sum()
            correct_aware += (pred_aware == y).sum()
        acc[task.id] = correct.item() / len(data)
        acc_aware[task.id] = correct_aware.item() / len(data)
    return acc, acc_aware


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
        if cfg.device.num_threads > 0:
            torch.set_num_threads(cfg.device.num_threads)
        seed_everything(cfg.seed)
        scenario = getattr(cfg.scenario, "value", cfg.scenario)
        stream = build(cfg.dataset, "dataset", scenario=scenario, seed=cfg.seed)
        if not isinstance(stream, Stream):
            raise CLBenchError(f"dataset._target_ must return a Stream, got {type(stream).__name__}")
        self.eval_split = getattr(cfg.eval_split, "value", cfg.eval_split)
        if self.eval_split == "val" and any(t.val is None or len(t.val) == 0 for t in stream.tasks):
            raise CLBenchError("eval_split=val needs a validation split: set dataset.val_fraction > 0 (e.g. 0.2)")
        self.stream = stream.to(self.device)
        model = build(
            cfg.backbone, "backbone", input_shape=stream.input_shape, num_outputs=stream.num_outputs
        )
        self.strategy: Strategy = build(cfg.strategy, "strategy")
        if not isinstance(self.strategy, Strategy):
            raise CLBenchError(f"strategy._target_ must build a Strategy, got {type(self.strategy).__name__}")
        self.strategy.setup(model.to(self.device), self.stream, cfg.train, self.device)
        self.data_generator = torch.Generator().manual_seed(cfg.seed)
        # torch imports its compiler stack lazily at the first optimizer construction
        # (seconds); pay that here so task 0's train time measures training.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

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
        return state

    def _set_rng_state(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        self.data_generator.set_state(state["data"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _save_checkpoint(self, progress: dict) -> None:
        opt = self.strategy.optimizer
        ckpt = {
            "version": CHECKPOINT_VERSION,
            "fingerprint": config_fingerprint(self.cfg),
            "model": self.strategy.model.state_dict(),
            "strategy": self.strategy.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else None,
            "rng": self._rng_state(),
            "progress": progress,
        }
        import io

        buf = io.BytesIO()
        torch.save(ckpt, buf)
        atomic_write_bytes(self.output_dir / CHECKPOINT, buf.getvalue())

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
        if ckpt["version"] != CHECKPOINT_VERSION or ckpt["fingerprint"] != config_fingerprint(self.cfg):
            raise CLBenchError(
                f"the checkpoint in {self.output_dir} was made with a different config; "
                "use a new run folder or resume=false to start over"
            )
        # The strategy first: it may rebuild a grown model before the weights are loaded.
        self.strategy.load_state_dict(ckpt["strategy"])
        self.strategy.model.load_state_dict(ckpt["model"])
        if ckpt["optimizer"] is not None and not self.cfg.train.reset_optimizer:
            self.strategy.optimizer = self.strategy.make_optimizer(self.strategy.model.parameters())
            self.strategy.optimizer.load_state_dict(ckpt["optimizer"])
        self._set_rng_state(ckpt["rng"])
        return ckpt["progress"]

    # ----- divergence guard ---------------------------------------------------------------
    def _diverged(self, task, where: str, loss: Optional[float] = None, weights: bool = True) -> None:
        """Fail the run when the loss (summed on the device over the epoch, so one NaN or
        inf step makes it non-finite) or, with `weights`, any weight/buffer of the model is
        not finite. Weights are checked after a task's last epoch and after its end-of-task
        phase (a non-finite weight earlier makes the next epoch's loss non-finite anyway);
        the per-epoch check is the loss alone, one host sync."""
        t = self.cfg.train
        bad = nonfinite_tensors(self.strategy.model) if weights else []
        loss_bad = loss is not None and not (math.isfinite(loss) and (t.max_loss <= 0 or loss <= t.max_loss))
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
        strategy, stream, cfg = self.strategy, self.stream, self.cfg.train
        strategy.begin_task(task)
        strategy.before_task(task)
        data = strategy.training_data(task)
        steps_per_epoch = -(-len(data) // cfg.batch_size)
        bar = None
        if progress_bar is not None:
            bar = progress_bar.add_task(f"task {task.id}", total=cfg.epochs * steps_per_epoch, loss=float("nan"))
        loss_sum, steps = torch.zeros((), device=self.device), 0
        for epoch in range(cfg.epochs):
            strategy.set_training(True)
            epoch_loss = torch.zeros((), device=self.device)
            for idx in iterate_batches(len(data), cfg.batch_size, self.data_generator, self.device):
                raw, y = data.batch(idx, self.device)  # plain indexing when the data is on the device
                batch = Batch(stream.transform(raw, train=True, generator=self.data_generator), y, raw, task)
                out = strategy.train_step(batch)
                epoch_loss += out["loss"]
                steps += 1
            loss_sum += epoch_loss
            epoch_mean = (epoch_loss / steps_per_epoch).item()  # the one host sync of the epoch
            self._diverged(task, f"epoch {epoch}", epoch_mean, weights=epoch == cfg.epochs - 1)
            if bar is not None:
                progress_bar.update(bar, advance=steps_per_epoch, loss=epoch_mean)
        strategy.after_task(task)
        self._diverged(task, "after the task (the strategy's consolidation)")
        return {
            "mean_loss": (loss_sum / max(steps, 1)).item(),
            "steps": steps,
            "samples": len(data) * cfg.epochs,
            "parameters": count_parameters(strategy.model),
            "strategy": strategy.summary(),
        }

    def prepare(self) -> None:
        """Build everything and read the checkpoint, writing nothing: every error raised
        here is a refused run that leaves the run folder as it was."""
        self._t_start = time.perf_counter()
        self.build()
        self._progress = self._load_checkpoint()

    def run(self) -> dict:
        if not hasattr(self, "_progress"):
            self.prepare()
        t_start = self._t_start
        T = len(self.stream)
        progress = self._progress
        if progress is None:
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
        elif progress["tasks_done"] > 0:
            self.console.print(f"resuming from {self.output_dir / CHECKPOINT}: {progress['tasks_done']}/{T} tasks done")

        bar_ctx = self._progress_bar()
        with bar_ctx as bar:
            for task in self.stream.tasks[progress["tasks_done"] :]:
                self._sync()
                t0 = time.perf_counter()
                log = self._train_task(task, bar)
                self._sync()
                t1 = time.perf_counter()
                acc, acc_aware = evaluate(self.strategy, self.stream, self.cfg.train.eval_batch_size, self.eval_split)
                t2 = time.perf_counter()
                progress["R"][task.id], progress["R_aware"][task.id] = acc, acc_aware
                progress["train_s"].append(t1 - t0)
                progress["eval_s"].append(t2 - t1)
                progress["train_log"].append(log)
                progress["tasks_done"] = task.id + 1
                self._log_warnings(progress)
                self._save_artifacts(task)
                if self.cfg.checkpoint:
                    self._save_checkpoint(progress)

        summary = self._summary(progress, time.perf_counter() - t_start)
        R = progress["R"]
        R_aware = progress["R_aware"] if self.stream.scenario == "class_il" else None
        write_results(self.output_dir, summary, R, R_aware)
        return summary

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
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            console=self.console,
        )

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
            "class_order": list(stream.class_order),
            "parameters": count_parameters(self.strategy.model),
            "strategy_info": self.strategy.summary(),
            "metrics": metrics,
            "metrics_task_aware": all_metrics(R_aware, progress["init_aware"]) if stream.scenario == "class_il" else None,
            "accuracy_matrix": R.tolist(),
            "random_init_accuracy": progress["init"].tolist(),
            "timing": {
                "train_s": progress["train_s"],
                "eval_s": progress["eval_s"],
                "total_s": wall_s,
            },
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

    def report(self, summary: dict) -> None:
        from rich.console import Console

        R = np.asarray(summary["accuracy_matrix"])
        R_aware = summary.get("accuracy_matrix_task_aware")
        print_summary(Console(), summary, R, np.asarray(R_aware) if R_aware is not None else None)
