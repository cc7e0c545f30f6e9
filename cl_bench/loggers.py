"""Experiment loggers: the run's numbers where researchers already look.

`logger=[csv,tensorboard,wandb,mlflow]` (Hydra config group `conf/logger/`, several at
once; default `[csv]`, `logger=[]` for none). Each option is a `_target_` node: the class
below and its keyword arguments, checked like every other `_target_` (`config.check_kwargs`).

What every logger receives (the runner calls `RunLoggers`):

- `log_steps`: the training loss of every optimizer step, under the global step (steps
  over all tasks, from 1), with the task, the epoch and the learning rate. The runner
  keeps the losses on the device and hands them over once per epoch (and before a
  mid-task checkpoint), so logging adds no host sync per step.
- `log_scalars`: named scalars at a global step (`train/lr`, `val/loss`, ...).
- `log_eval`: after each task, every task's accuracy (and the task-aware one in class-IL).
- `log_final`: the final metrics, the accuracy matrix, timing and peak memory.
- `start` gets the full config, flattened (`train.lr`, ...), as hyperparameters.

Resume (a run continued from its checkpoint at global step C): the steps after C are
trained again, so what the killed process logged after C must not count twice. The CSV
logger drops its rows past C; TensorBoard opens its writer with `purge_step=C+1`; W&B
resumes the same run id (kept in the run folder's `loggers.json`, `resume="allow"`): online
it continues after the last step the server holds, offline each process writes an
offline-run folder of the same id (sync them in order); MLflow continues the same run id and
skips metrics at steps it already holds. Each task's evaluation is logged after its
checkpoint is written, so it is never logged twice.
"""

from __future__ import annotations

import csv
import io
import json
import math
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from cl_bench import CLBenchError

STATE_FILE = "loggers.json"  # the W&B and MLflow run ids of this run folder, for resumes
STEPS_CSV, EVALS_CSV, SCALARS_CSV = "steps.csv", "evals.csv", "scalars.csv"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"train.lr": 0.05, ...}; lists stay values."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _scalar(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def final_scalars(summary: dict) -> dict[str, float]:
    """The numbers of a finished run's summary under logger names (None and non-finite left out)."""
    out: dict[str, Any] = {}
    for key, value in (summary.get("metrics") or {}).items():
        out[f"final/{key}"] = value
    for key, value in (summary.get("metrics_task_aware") or {}).items():
        out[f"final_task_aware/{key}"] = value
    timing = summary.get("timing") or {}
    out["time/total_s"] = timing.get("total_s")
    out["time/train_s"] = sum(timing.get("train_s") or [])
    out["time/eval_s"] = sum(timing.get("eval_s") or [])
    out["time/train_samples_per_s"] = timing.get("train_samples_per_s")
    out["time/eval_samples_per_s"] = timing.get("eval_samples_per_s")
    out["memory/peak_bytes"] = summary.get("peak_memory_bytes")
    out["model/parameters"] = summary.get("parameters")
    return {k: v for k, v in ((k, _scalar(v)) for k, v in out.items()) if v is not None}


def eval_scalars(task: int, acc, acc_aware=None) -> dict[str, float]:
    """After training task `task`: every task's accuracy and the mean over the tasks seen."""
    out = {f"eval/acc/task_{j}": float(a) for j, a in enumerate(acc)}
    out["eval/acc_seen"] = float(sum(acc[: task + 1]) / (task + 1))
    if acc_aware is not None:
        out.update({f"eval_task_aware/acc/task_{j}": float(a) for j, a in enumerate(acc_aware)})
        out["eval_task_aware/acc_seen"] = float(sum(acc_aware[: task + 1]) / (task + 1))
    return out


def matrix_markdown(R) -> str:
    header = "| after task | " + " | ".join(f"task {j}" for j in range(len(R))) + " |"
    rows = [f"| {i} | " + " | ".join("" if v != v else f"{v:.4f}" for v in row) + " |" for i, row in enumerate(R)]
    return "\n".join([header, "|" + "---|" * (len(R) + 1), *rows])


def _read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_state(folder: Path, **values: Any) -> None:
    from cl_bench.results import atomic_write_text

    state = {**_read_state(folder), **values}
    atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=2) + "\n")


class Logger:
    """One logger. `requires` names the module it imports and the pip extra that installs it."""

    requires: Optional[tuple[str, str]] = None
    wants_steps = True
    default_name = "clbench"  # the run's display name unless configured (set by RunLoggers.start)

    @classmethod
    def check_available(cls, name: str) -> None:
        """Refuse the run (before anything is written) when the logger's library is missing."""
        if cls.requires is None:
            return
        module, extra = cls.requires
        try:
            __import__(module)
        except ImportError:
            raise CLBenchError(
                f"logger={name} needs the {extra} package: pip install 'clbench[{extra}]'"
            ) from None

    def start(self, folder: Path, config: dict, resume_step: Optional[int]) -> None:
        """`resume_step`: None for a fresh run, else the global step of the checkpoint."""

    def log_steps(self, task: int, epoch: int, start: int, losses: list[float], lr: Optional[float]) -> None:
        pass

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_eval(self, task: int, step: int, acc, acc_aware) -> None:
        self.log_scalars(eval_scalars(task, acc, acc_aware), step)

    def log_final(self, summary: dict, step: int) -> None:
        self.log_scalars(final_scalars(summary), step)

    def close(self, status: str) -> None:
        """`status`: finished, failed or interrupted."""


# ----- CSV ------------------------------------------------------------------------------------
class CSVLogger(Logger):
    """steps.csv (step, task, epoch, loss, lr: one row per optimizer step), evals.csv (step,
    after_task, task, acc[, acc_task_aware]: every task after each task), scalars.csv (step,
    name, value: everything else). Rows are written once per epoch (and before a mid-task
    checkpoint), one write per file."""

    def start(self, folder: Path, config: dict, resume_step: Optional[int]) -> None:
        self.folder = folder
        self.class_il = str(config.get("scenario")) == "class_il"
        heads = {
            STEPS_CSV: ["step", "task", "epoch", "loss", "lr"],
            EVALS_CSV: ["step", "after_task", "task", "acc"] + (["acc_task_aware"] if self.class_il else []),
            SCALARS_CSV: ["step", "name", "value"],
        }
        self.files = {}
        self.lr_changes: list[tuple[int, float]] = []  # (step, lr) of the `train/lr` logged so far
        for name, head in heads.items():
            path = folder / name
            kept = self._rows_upto(path, resume_step) if resume_step is not None else []
            text = self._format([head, *kept])
            with open(path, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            self.files[name] = open(path, "a", encoding="utf-8", newline="")

    @staticmethod
    def _rows_upto(path: Path, step: int) -> list[list[str]]:
        """The rows of an earlier process up to global step `step` (the checkpoint's)."""
        try:
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))[1:]
        except OSError:
            return []
        kept = []
        for row in rows:
            try:
                if int(row[0]) <= step and not (len(row) > 1 and row[1].startswith("final/")):
                    kept.append(row)
            except (ValueError, IndexError):
                continue  # a line cut short by the kill
        return kept

    @staticmethod
    def _format(rows: list[list[Any]]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue()

    def _write(self, name: str, rows: list[list[Any]]) -> None:
        f = self.files[name]
        f.write(self._format(rows))
        f.flush()

    def log_steps(self, task, epoch, start, losses, lr) -> None:
        rows = []
        for i, value in enumerate(losses):
            step = start + i + 1
            rows.append([step, task, epoch, repr(value), self._lr_at(step, lr)])
        self._write(STEPS_CSV, rows)

    def _lr_at(self, step: int, fallback: Optional[float]) -> str:
        """The learning rate of `step`: the last `train/lr` logged at or before it (a schedule
        logs each change before the step that uses it), else the optimizer's at the flush."""
        changes = self.lr_changes
        while len(changes) > 1 and changes[1][0] <= step:
            changes.pop(0)
        if changes and changes[0][0] <= step:
            return repr(changes[0][1])
        return "" if fallback is None else repr(float(fallback))

    def log_scalars(self, metrics, step) -> None:
        if "train/lr" in metrics:
            self.lr_changes.append((step, float(metrics["train/lr"])))
        self._write(SCALARS_CSV, [[step, k, repr(float(v))] for k, v in metrics.items()])

    def log_eval(self, task, step, acc, acc_aware) -> None:
        rows = []
        for j, a in enumerate(acc):
            row = [step, task, j, repr(float(a))]
            if self.class_il and acc_aware is not None:
                row.append(repr(float(acc_aware[j])))
            rows.append(row)
        self._write(EVALS_CSV, rows)

    def log_final(self, summary, step) -> None:
        pass  # metrics.json, accuracy_matrix*.csv and results.md hold them

    def close(self, status) -> None:
        for f in getattr(self, "files", {}).values():
            f.close()
        self.files = {}


# ----- TensorBoard ------------------------------------------------------------------------------
class TensorBoardLogger(Logger):
    """Event files in <run folder>/tensorboard (`tensorboard --logdir <run folder or sweep dir>`)."""

    requires = ("tensorboard", "tensorboard")

    def __init__(self, subdir: str = "tensorboard", flush_secs: int = 30) -> None:
        self.subdir, self.flush_secs = subdir, flush_secs

    def start(self, folder, config, resume_step) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = folder / self.subdir
        if resume_step is None:
            shutil.rmtree(log_dir, ignore_errors=True)  # a fresh run: no curves of an earlier one
        # On a resume, events at the steps trained again (after the checkpoint) are dropped.
        self.writer = SummaryWriter(
            log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1,
            flush_secs=self.flush_secs,
        )
        if resume_step is None:
            from torch.utils.tensorboard.summary import hparams

            flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flatten(config).items()}
            metric_names = {f"final/{m}": 0.0 for m in ("acc", "bwt", "fwt", "forgetting", "avg_inc_acc")}
            for summary in hparams(flat, metric_names):
                self.writer.file_writer.add_summary(summary)
            text = "\n".join(f"    {line}" for line in json.dumps(config, indent=2, default=str).splitlines())
            self.writer.add_text("config", text, 0)

    def log_steps(self, task, epoch, start, losses, lr) -> None:
        add = self.writer.add_scalar
        for i, value in enumerate(losses):
            add("train/loss", value, start + i + 1)
        self.writer.flush()

    def log_scalars(self, metrics, step) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_final(self, summary, step) -> None:
        super().log_final(summary, step)
        self.writer.add_text("accuracy_matrix", matrix_markdown(summary["accuracy_matrix"]), step)
        if summary.get("accuracy_matrix_task_aware") is not None:
            self.writer.add_text("accuracy_matrix_task_aware", matrix_markdown(summary["accuracy_matrix_task_aware"]), step)

    def close(self, status) -> None:
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.close()
            self.writer = None


# ----- Weights & Biases -------------------------------------------------------------------------
class WandbLogger(Logger):
    """A W&B run, offline by default: files under <run folder>/wandb, upload later with
    `wandb sync <run folder>/wandb/offline-run-*` (or `mode=online` to stream)."""

    requires = ("wandb", "wandb")

    def __init__(self, project: str = "clbench", name: Optional[str] = None, entity: Optional[str] = None,
                 tags: Optional[list[str]] = None, group: Optional[str] = None, notes: Optional[str] = None,
                 mode: str = "offline") -> None:
        if mode not in ("offline", "online", "disabled"):
            raise CLBenchError(f"logger.wandb.mode must be offline, online or disabled, got {mode!r}")
        self.options = dict(project=project, name=name, entity=entity, tags=list(tags or []) or None,
                            group=group, notes=notes, mode=mode)

    def start(self, folder, config, resume_step) -> None:
        import wandb

        state = _read_state(folder)
        run_id = state.get("wandb_id") if resume_step is not None else None
        if run_id is None:
            if resume_step is None:
                shutil.rmtree(folder / "wandb", ignore_errors=True)  # a fresh run replaces an earlier one
            run_id = secrets.token_hex(4)
            _write_state(folder, wandb_id=run_id)
        name = self.options["name"] or self.default_name
        self.run = wandb.init(
            **{**self.options, "name": name}, dir=str(folder), id=run_id, resume="allow",
            config=flatten(config), settings=wandb.Settings(console="off", silent=True),
        )
        # W&B keeps a run's steps increasing; a resumed online run starts after the last step the
        # server holds, so the steps an earlier process logged after the checkpoint are not logged again
        self.step = int(getattr(self.run, "starting_step", 0) or 0)
        # Scalars logged ahead of the losses (a learning rate logged before its step, whose loss
        # arrives at the epoch's end) wait for them, so that W&B receives the steps in order.
        self.pending: dict[int, dict] = {}
        self.flushed = resume_step or 0  # the last step whose loss was logged

    def _log(self, metrics: dict, step: int) -> None:
        if step >= self.step:
            self.run.log(metrics, step=step)
            self.step = step

    def _emit(self, upto: float) -> None:
        for step in sorted(s for s in self.pending if s <= upto):
            self._log(self.pending.pop(step), step)

    def log_steps(self, task, epoch, start, losses, lr) -> None:
        for i, value in enumerate(losses):
            step = start + i + 1
            if self.pending:
                self._emit(step - 1)
            self._log({**self.pending.pop(step, {}), "train/loss": value}, step)
        self.flushed = max(self.flushed, start + len(losses))

    def log_scalars(self, metrics, step) -> None:
        self.pending.setdefault(step, {}).update(metrics)
        if step <= self.flushed:
            self._emit(step)

    def log_final(self, summary, step) -> None:
        import wandb

        self._emit(math.inf)
        scalars = final_scalars(summary)
        self.run.summary.update(scalars)
        R = summary["accuracy_matrix"]
        table = wandb.Table(columns=["after_task", *[f"task_{j}" for j in range(len(R))]],
                            data=[[i, *row] for i, row in enumerate(R)])
        self._log({**scalars, "accuracy_matrix": table}, step)

    def close(self, status) -> None:
        run = getattr(self, "run", None)
        if run is not None:
            self._emit(math.inf)
            run.finish(exit_code=0 if status == "finished" else 1)
            self.run = None
            # stop W&B's background service too: its offline files are complete once this
            # returns (finish alone can leave the last records to the service, seen under load)
            import wandb

            wandb.teardown()


# ----- MLflow -------------------------------------------------------------------------------------
class MLflowLogger(Logger):
    """An MLflow run. Default store: <run folder>/mlflow.db (SQLite, MLflow's local default;
    its file store is deprecated), artifacts in <run folder>/mlartifacts. Browse with
    `mlflow ui --backend-store-uri sqlite:///<run folder>/mlflow.db`."""

    requires = ("mlflow", "mlflow")
    _BATCH = 1000  # MLflow's limit of metrics per log_batch call
    _PARAMS = 100  # ... and of params

    def __init__(self, tracking_uri: Optional[str] = None, experiment_name: str = "clbench",
                 run_name: Optional[str] = None, tags: Optional[dict] = None) -> None:
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self.run_name, self.tags = run_name, dict(tags or {})

    def start(self, folder, config, resume_step) -> None:
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        local = self.tracking_uri is None
        if local and resume_step is None:
            (folder / "mlflow.db").unlink(missing_ok=True)  # a fresh run replaces an earlier one
            shutil.rmtree(folder / "mlartifacts", ignore_errors=True)
        uri = self.tracking_uri or f"sqlite:///{(folder / 'mlflow.db').absolute()}"
        for name in ("mlflow.store.db.utils", "alembic", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)  # the SQLite store's set-up chatter
        self.client = client = MlflowClient(tracking_uri=uri)
        run = None
        run_id = _read_state(folder).get("mlflow_run_id") if resume_step is not None else None
        if run_id is not None:
            try:
                run = client.get_run(run_id)
            except Exception:
                run = None  # not in this store (the store changed): a new run
        self.last = -1
        if run is None:
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                artifacts = (folder / "mlartifacts").absolute().as_uri() if local else None
                experiment_id = client.create_experiment(self.experiment_name, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
            tags = {"clbench.run_folder": str(folder.absolute()), **{str(k): str(v) for k, v in self.tags.items()}}
            run = client.create_run(experiment_id, run_name=self.run_name or self.default_name, tags=tags)
            _write_state(folder, mlflow_run_id=run.info.run_id)
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            # metrics the earlier process logged after the checkpoint stay; they are not logged twice
            for key in run.data.metrics:
                self.last = max([self.last, *(m.step for m in client.get_metric_history(run.info.run_id, key))])
        self.run_id = run.info.run_id
        known = set(run.data.params)
        params = [Param(k[:250], json.dumps(v) if not isinstance(v, str) else v)
                  for k, v in flatten(config).items() if k[:250] not in known]
        params = [Param(p.key, p.value[:6000]) for p in params]
        for i in range(0, len(params), self._PARAMS):
            client.log_batch(self.run_id, params=params[i : i + self._PARAMS])

    def _metrics(self, items: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in items if s > self.last]
        for i in range(0, len(metrics), self._BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + self._BATCH])

    def log_steps(self, task, epoch, start, losses, lr) -> None:
        self._metrics([("train/loss", v, start + i + 1) for i, v in enumerate(losses)])

    def log_scalars(self, metrics, step) -> None:
        self._metrics([(k, v, step) for k, v in metrics.items()])

    def log_final(self, summary, step) -> None:
        super().log_final(summary, step)
        self.client.log_text(self.run_id, matrix_markdown(summary["accuracy_matrix"]), "accuracy_matrix.md")
        self.client.log_dict(self.run_id, {k: summary.get(k) for k in
                                           ("metrics", "metrics_task_aware", "accuracy_matrix",
                                            "accuracy_matrix_task_aware", "timing", "peak_memory_bytes")},
                             "summary.json")

    def close(self, status) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.set_terminated(self.run_id, {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))
            self.client = None


# ----- the run's loggers ----------------------------------------------------------------------------
def logger_nodes(cfg) -> dict:
    """{name: config node} of the active loggers (`logger=[...]`)."""
    node = cfg.get("logger")
    if node is None:
        return {}
    from omegaconf import DictConfig

    if not isinstance(node, DictConfig):
        raise CLBenchError("logger must be a list of logger options, e.g. logger=[csv,tensorboard]")
    return {str(k): v for k, v in node.items()}


def check_loggers(cfg) -> None:
    """Preflight: each active logger's options and library, before anything is written."""
    from cl_bench.config import _target_of, build, check_kwargs

    for name, node in logger_nodes(cfg).items():
        where = f"logger.{name}"
        target = _target_of(node, where)
        if not (isinstance(target, type) and issubclass(target, Logger)):
            raise CLBenchError(f"{where}._target_ must be a cl_bench.loggers.Logger class, got {node['_target_']!r}")
        check_kwargs(target, node, where)
        build(node, where)  # the constructor checks its values (e.g. wandb's mode)
        target.check_available(name)


class RunLoggers:
    """The active loggers of one run, driven by the runner."""

    def __init__(self, cfg) -> None:
        from cl_bench.config import build

        self.loggers = [build(node, f"logger.{name}") for name, node in logger_nodes(cfg).items()]
        self.wants_steps = any(lg.wants_steps for lg in self.loggers)
        self.lr_logged = False
        self.started: list[Logger] = []

    def start(self, folder: Path, config: dict, resume_step: Optional[int], name: Optional[str] = None) -> None:
        """`name`: the run's default display name (W&B, MLflow), e.g. "ewc split_digits seed=0 (3)"."""
        folder.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            (folder / STATE_FILE).unlink(missing_ok=True)  # run ids of an earlier run of the folder
        for lg in self.loggers:
            lg.default_name = name or folder.name
            lg.start(folder, config, resume_step)
            self.started.append(lg)

    def log_steps(self, task: int, epoch: int, start: int, losses: list[float], lr: Optional[float]) -> None:
        for lg in self.started:
            lg.log_steps(task, epoch, start, losses, lr)
            if lr is not None and not self.lr_logged and not isinstance(lg, CSVLogger):
                lg.log_scalars({"train/lr": lr}, start + 1)  # nobody else logs the learning rate

    def log_scalars(self, metrics: dict, step: int) -> None:
        if "train/lr" in metrics:
            self.lr_logged = True
        metrics = {k: float(v) for k, v in metrics.items()}
        for lg in self.started:
            lg.log_scalars(metrics, step)

    def log_eval(self, task: int, step: int, acc, acc_aware, extra: dict) -> None:
        for lg in self.started:
            lg.log_eval(task, step, acc, acc_aware)
            if extra:
                lg.log_scalars(extra, step)

    def log_final(self, summary: dict, step: int) -> None:
        for lg in self.started:
            lg.log_final(summary, step)

    def close(self, status: str) -> None:
        errors = []
        for lg in reversed(self.started):
            try:
                lg.close(status)
            except Exception as exc:  # close the others all the same
                errors.append(exc)
        self.started = []
        if errors and status == "finished":
            raise errors[0]
