"""Typed run schema (Hydra structured configs) and checked instantiation of `_target_` nodes.

The top-level keys and the `train`/`device` groups are typed dataclasses registered in
Hydra's ConfigStore, so a misspelled key or a wrong type fails at composition time and
names the key. The `dataset`, `backbone` and `strategy` groups hold a `_target_` and
that target's keyword arguments; `build` checks those against the target's signature
(names and annotated types) before calling it, so `strategy.lamda=1` or
`strategy.lambda_=abc` fails with a message naming the key instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cl_bench import CLBenchError
from cl_bench import rundir  # noqa: F401  (registers ${clbench_run_id:}, used by conf/config.yaml's run folders)


class Scenario(str, enum.Enum):
    class_il = "class_il"
    task_il = "task_il"
    domain_il = "domain_il"


class EvalSplit(str, enum.Enum):
    test = "test"
    val = "val"


class OptimizerName(str, enum.Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class SchedulerName(str, enum.Enum):
    none = "none"
    multistep = "multistep"
    cosine = "cosine"


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    optimizer: OptimizerName = OptimizerName.sgd
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    # A fresh optimizer at each task start (the usual protocol); false keeps its state.
    reset_optimizer: bool = True
    eval_batch_size: int = 2048
    # class-IL: losses and predictions cover only the classes of the tasks seen so far
    # (van de Ven & Tolias's "active classes"); false: the whole head from the start (Mammoth).
    active_classes: bool = False
    # An epoch whose mean training loss (penalties included) is above this is a diverged run
    # (the run fails with a one-line error, no results). Cross-entropy starts near
    # ln(classes); a loss this large means the weights have blown up. 0 switches the bound
    # off (NaN/inf always fail).
    max_loss: float = 1.0e6
    # 32 (float32), bf16 or fp16: training steps and evaluation under torch.autocast with
    # bfloat16 / float16 (the weights, the optimizer and the strategies' end-of-task phases,
    # e.g. Fisher/importance passes, stay float32); fp16 adds dynamic loss scaling
    # (cl_bench.strategies.base.LossScaler) to every training step
    precision: str = "32"
    # torch.compile the strategy's model after its setup (nn.Module.compile: model(x) calls run
    # compiled; state dicts and checkpoints are unchanged). A strategy whose model changes
    # shape from task to task (PNN, DEN, CPG, individual networks) runs eagerly, with a
    # one-line warning. compile_backend: torch.compile's backend (inductor; eager or
    # aot_eager trace without generating code).
    compile: bool = False
    compile_backend: str = "inductor"
    # Learning-rate schedule within each task (it restarts at every task), applied to the
    # optimizers of the strategy's training steps (its `optimizer` and `scheduled_optimizers`,
    # e.g. Piggyback's mask optimizer), every param group scaled from its own base lr: none, multistep (x gamma at each epoch of `milestones`) or cosine (from the base lr
    # to min_lr over the task's epochs). Set per epoch; the warm-up (linear from ~0, then the
    # schedule) per step. See runner.lr_factor.
    scheduler: SchedulerName = SchedulerName.none
    milestones: List[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    # cosine's floor for train.lr (groups with another base lr: the same fraction of theirs)
    min_lr: float = 0.0
    # clip the total gradient norm of the optimizer's parameters before each step (FACIL's
    # clipgrad); 0 or null: off
    clip_grad_norm: Optional[float] = None
    # evaluate the current task's validation split (dataset.val_fraction > 0) after each
    # epoch: loss and accuracy to the loggers and the task's train_log entry
    validate: bool = False
    # early stopping (needs validate): stop a task after this many epochs without a lower
    # validation loss and go back to the best epoch's weights (FACIL); 0: off
    patience: int = 0


@dataclass
class DeviceConfig:
    # cpu, cuda, cuda:N or auto (cuda when available, else cpu)
    name: str = "cpu"
    # torch intra-op threads (>= 1); null leaves torch's default (in a sweep: the worker's share of the cores)
    num_threads: Optional[int] = None
    # cuDNN picks deterministic algorithms (and no autotuning): the same numbers on every run
    # of a GPU; false lets cuDNN benchmark and choose the fastest. Recorded in metrics.json.
    deterministic: bool = True
    # The model's weights and every image batch in channels-last memory format (NHWC), the
    # fast layout for convolutions with mixed precision on recent GPUs; no effect on
    # non-image inputs. Recorded in metrics.json.
    channels_last: bool = False
    # At most this share of the GPU's memory (torch.cuda.set_per_process_memory_fraction), so
    # that runs sharing a GPU cannot take each other's memory; null: no cap. A local parallel
    # sweep with more workers than GPUs sets it to each run's share (cl_bench.sweep.assign_gpu).
    memory_fraction: Optional[float] = None


@dataclass
class RunConfig:
    dataset: Any = None
    backbone: Any = None
    strategy: Any = None
    device: DeviceConfig = field(default_factory=DeviceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scenario: Scenario = Scenario.class_il
    seed: int = 0
    # Continue from the checkpoint in the run folder when one exists.
    resume: bool = True
    # Save a checkpoint after each task (needed for resume).
    checkpoint: bool = True
    # Also checkpoint inside a task: every N epochs ("2epochs"), every N optimizer steps
    # ("500steps") or when that much wall time passed since the last save ("30min", "90s",
    # "1h"); empty: only after each task. Parsed by runner.parse_checkpoint_every.
    checkpoint_every: str = ""
    progress: bool = True
    # Optional output folder; empty means Hydra's run directory.
    output_dir: str = ""
    # Split evaluated after each task: test, or val (each task's validation split, held out
    # from training by dataset.val_fraction > 0) so hyperparameter tuning never reads the test set.
    eval_split: EvalSplit = EvalSplit.test
    # Metric the app returns to Hydra's sweepers (Optuna): acc, bwt, fwt, forgetting or avg_inc_acc.
    objective: str = "acc"
    # The active experiment loggers (conf/logger/, `logger=[csv,tensorboard,wandb,mlflow]`):
    # {name: {_target_: ..., options}}; null or empty: none. See cl_bench.loggers.
    logger: Any = None


def register_schema() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


register_schema()


_RESERVED = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def _omegaconf_type(annotation: Any) -> Any:
    """The annotation if OmegaConf can validate it, else Any."""
    if annotation in (int, float, bool, str) or (
        inspect.isclass(annotation) and issubclass(annotation, enum.Enum)
    ):
        return annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and len(args) == 2 and type(None) in args:
        inner = _omegaconf_type(next(a for a in args if a is not type(None)))
        return Optional[inner] if inner is not Any else Any
    if origin in (list, tuple, typing.List, typing.Sequence) and args:
        inner = _omegaconf_type(args[0])
        if inner is not Any:
            return typing.List[inner]
    return Any


def check_kwargs(target: Any, node: DictConfig, where: str, provided: set[str] = frozenset()) -> dict:
    """Validate a config node's keys and value types against `target`'s signature.

    Returns the node's keyword arguments converted to the annotated types.
    `provided` are arguments the runner passes itself (e.g. `input_shape`); the config
    must not set them.
    """
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolved forward references: fall back to no type checks
        hints = {}
    params = {
        name: p
        for name, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in provided
    }
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    keys = [k for k in node.keys() if k not in _RESERVED]
    unknown = [k for k in keys if k not in params]
    if unknown and not accepts_any:
        valid = ", ".join(sorted(params)) or "(none)"
        raise CLBenchError(
            f"unknown key {where}.{unknown[0]} for {_name(target)}; valid keys: {valid}"
        )
    missing = [
        n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in keys
    ]
    if missing:
        raise CLBenchError(f"{where}.{missing[0]} is required by {_name(target)}; set it in the config")
    fields = [(k, _omegaconf_type(hints.get(k, Any))) for k in keys if k in params]
    schema = dataclasses.make_dataclass(f"{_name(target)}Args", fields)
    values = {k: node[k] for k in keys}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise CLBenchError(f"bad value for {where}.{key}: {msg}") from None
    return OmegaConf.to_container(merged, resolve=True)


def _name(target: Any) -> str:
    return getattr(target, "__qualname__", getattr(target, "__name__", str(target)))


def _target_of(node: DictConfig, where: str) -> Any:
    if node is None or "_target_" not in node:
        raise CLBenchError(f"the {where} config has no _target_")
    try:
        return get_object(node["_target_"])
    except Exception:
        raise CLBenchError(f"{where}._target_={node['_target_']!r} cannot be imported") from None


def build(node: DictConfig, where: str, **runtime_kwargs: Any) -> Any:
    """Instantiate a `_target_` node after checking its arguments (see `check_kwargs`)."""
    target = _target_of(node, where)
    kwargs = check_kwargs(target, node, where, provided=set(runtime_kwargs))
    return target(**kwargs, **accepted(target, runtime_kwargs))


def accepted(target: Any, runtime_kwargs: dict) -> dict:
    """The runner's arguments that `target` takes: a user's dataset function need not take
    `seed` or `scenario`, nor a backbone `input_shape` (the runner checks what they build)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return runtime_kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return runtime_kwargs
    return {k: v for k, v in runtime_kwargs.items() if k in params}


def plain_train_config(node: Any) -> Any:
    """The `train` group as a plain `TrainConfig` (enums kept), for code that reads it every
    step: a key of an OmegaConf node costs ~15 us to read, a dataclass field ~0.02 us. A
    node that is not a `TrainConfig` (a config composed without the schema) becomes a
    namespace with the same attributes. Anything else is returned as it is."""
    if not OmegaConf.is_config(node):
        return node
    if OmegaConf.get_type(node) is TrainConfig:
        return OmegaConf.to_object(node)
    import types

    return types.SimpleNamespace(**OmegaConf.to_container(node, resolve=True))


# What the runner passes to each group's target itself (`build(..., **runtime_kwargs)`).
RUNTIME_KWARGS = {"dataset": {"scenario", "seed"}, "backbone": {"input_shape", "num_outputs"}}
_SCHEMA = {"": RunConfig, "train": TrainConfig, "device": DeviceConfig}


def _check_schema_keys(cfg: DictConfig) -> None:
    """Keys added with `+key=...` bypass the typed schema: refuse every key it does not know."""
    for where, schema in _SCHEMA.items():
        node = cfg if not where else cfg.get(where)
        if not isinstance(node, DictConfig):
            continue
        known = {f.name for f in dataclasses.fields(schema)}
        unknown = sorted(set(node.keys()) - known)
        if unknown:
            name = f"{where}.{unknown[0]}" if where else unknown[0]
            raise CLBenchError(f"unknown key {name}; valid keys{' of ' + where if where else ''}: {', '.join(sorted(known))}")


PRECISIONS = ("32", "bf16", "fp16")


def check_compile_backend(backend: str) -> None:
    """train.compile_backend must be one of torch.compile's registered backends."""
    from torch._dynamo import list_backends

    known = list_backends(exclude_tags=())
    if backend not in known:
        raise CLBenchError(f"train.compile_backend={backend!r} is not a torch.compile backend; choose one of {', '.join(known)}")


def check_training_controls(cfg: DictConfig) -> None:
    """train.scheduler/milestones/gamma/warmup_epochs/min_lr/clip_grad_norm/validate/patience and
    dataset.first_task_classes: values that cannot work are refused in one line."""
    t, ds = cfg.train, cfg.dataset
    scheduler = getattr(t.scheduler, "value", t.scheduler)
    milestones = list(t.milestones)
    if milestones and scheduler != "multistep":
        raise CLBenchError(f"train.milestones={milestones} need train.scheduler=multistep (it is {scheduler})")
    if scheduler == "multistep" and not milestones:
        raise CLBenchError("train.scheduler=multistep needs train.milestones (epochs within a task, e.g. [49,63])")
    if any(m < 1 for m in milestones) or milestones != sorted(set(milestones)):
        raise CLBenchError(f"train.milestones must be increasing epochs >= 1 within a task, got {milestones}")
    if not (math.isfinite(t.gamma) and t.gamma > 0):
        raise CLBenchError(f"train.gamma must be a positive finite number, got {t.gamma}")
    if not 0 <= t.warmup_epochs <= t.epochs:
        raise CLBenchError(f"train.warmup_epochs must be in [0, train.epochs={t.epochs}], got {t.warmup_epochs}")
    if not (math.isfinite(t.min_lr) and 0 <= t.min_lr <= t.lr):
        raise CLBenchError(f"train.min_lr must be in [0, train.lr={t.lr}], got {t.min_lr}")
    if t.min_lr > 0 and scheduler != "cosine":
        raise CLBenchError(f"train.min_lr is the floor of train.scheduler=cosine (it is {scheduler}); leave it at 0")
    clip = t.clip_grad_norm
    if clip is not None and not (math.isfinite(clip) and clip >= 0):
        raise CLBenchError(f"train.clip_grad_norm must be a positive finite number (0 or null: off), got {clip}")
    if t.patience < 0:
        raise CLBenchError(f"train.patience must be >= 0 (0: no early stopping), got {t.patience}")
    if (t.validate or t.patience > 0) and ds.get("val_fraction", None) == 0:
        what = "train.validate" if t.validate else f"train.patience={t.patience}"
        raise CLBenchError(f"{what} needs a validation split: set dataset.val_fraction > 0 (e.g. 0.1)")
    first = ds.get("first_task_classes", None)
    if first is not None or "num_tasks" in ds:
        from cl_bench.data.stream import check_task_split

        num_classes = getattr(_target_of(ds, "dataset"), "num_classes", None)  # known for the bundled datasets
        known = num_classes if isinstance(num_classes, int) and "num_tasks" in ds else None
        check_task_split(known, ds.get("num_tasks", 2), first)


def preflight(cfg: DictConfig) -> None:
    """Every check that needs no data: a run that fails one is refused before it writes anything.

    Also run by `clbench run -m` on every job of a sweep before the first one starts.
    """
    _check_schema_keys(cfg)
    for group in ("dataset", "backbone"):
        check_kwargs(_target_of(cfg[group], group), cfg[group], group, provided=RUNTIME_KWARGS[group])
    build(cfg.strategy, "strategy")  # its constructor checks its values (e.g. memory_size >= 0)
    from cl_bench.data.stream import check_cap

    check_cap(cfg.dataset.get("max_train_per_class"))
    t = cfg.train
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if t[key] < 1:
            raise CLBenchError(f"train.{key} must be at least 1, got {t[key]}")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise CLBenchError(f"train.lr must be a positive finite number, got {t.lr}")
    if not (math.isfinite(t.momentum) and 0 <= t.momentum < 1):
        raise CLBenchError(f"train.momentum must be in [0, 1), got {t.momentum}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise CLBenchError(f"train.weight_decay must be a finite number >= 0, got {t.weight_decay}")
    if math.isnan(t.max_loss) or t.max_loss < 0:
        raise CLBenchError(f"train.max_loss must be >= 0 (0 switches the bound off), got {t.max_loss}")
    if str(t.precision) not in PRECISIONS:
        raise CLBenchError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    if str(t.precision) == "fp16":
        strategy_class = _target_of(cfg.strategy, "strategy")
        if not getattr(strategy_class, "supports_loss_scaling", False):
            raise CLBenchError(
                f"train.precision=fp16: strategy {_name(strategy_class)} does not declare supports_loss_scaling "
                "(its gradients must go through Strategy.backward/optimizer_step to be loss-scaled); use "
                "train.precision=bf16 or 32"
            )
    if t.compile:
        check_compile_backend(str(t.compile_backend))
    check_training_controls(cfg)
    if not 0 <= cfg.seed < 2**32:
        raise CLBenchError(f"seed must be in [0, 2**32 - 1], got {cfg.seed}")
    fraction = cfg.device.memory_fraction
    if fraction is not None and not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise CLBenchError(f"device.memory_fraction must be in (0, 1] (null: no cap), got {fraction}")
    if cfg.device.num_threads is not None and cfg.device.num_threads < 1:
        raise CLBenchError(
            f"device.num_threads must be at least 1, got {cfg.device.num_threads} (null: torch's default)"
        )
    from cl_bench.results import METRIC_LABELS

    if cfg.objective not in METRIC_LABELS:
        raise CLBenchError(f"objective must be one of {', '.join(METRIC_LABELS)}, got {cfg.objective!r}")
    from cl_bench.runner import parse_checkpoint_every, resolve_device

    resolve_device(cfg.device.name)
    parse_checkpoint_every(cfg.checkpoint_every)
    from cl_bench.loggers import check_loggers

    check_loggers(cfg)  # each logger's options, and that its library is installed


__all__ = ["RunConfig", "TrainConfig", "DeviceConfig", "Scenario", "build", "check_kwargs", "preflight", "instantiate"]
