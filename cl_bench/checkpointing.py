"""Mid-task checkpoint support: `checkpoint_every`, the stop signals' exception, and the
snapshot of a strategy's state as its training steps changed it (see `cl_bench.runner`'s
docstring for the design)."""

from __future__ import annotations

import math
import re
import signal
from typing import Any, Optional

import numpy as np
import torch

from cl_bench import CLBenchError
from cl_bench.strategies.base import Strategy

# The signals that stop a run cleanly: Slurm and most schedulers send SIGTERM, submitit
# SIGUSR1/SIGUSR2 before preemption or the time limit, Ctrl-C is SIGINT.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2") if hasattr(signal, name)
)


class RunInterrupted(Exception):
    """A stop signal ended the run at a boundary; the checkpoint (if on) lets the same
    command continue. `exit_code` is 128 + the signal number (143 SIGTERM, 130 SIGINT)."""

    def __init__(self, signum: int, where: str, saved: bool) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        self.where = where
        self.saved = saved
        tail = (
            "checkpoint saved: run the same command to continue"
            if saved
            else "checkpoint=false, so nothing was saved: the run starts over when run again"
        )
        super().__init__(f"interrupted by {signal.Signals(self.signum).name} {where}; {tail}")


_EVERY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)")
_EVERY_UNITS = {
    "epoch": "epochs", "epochs": "epochs", "step": "steps", "steps": "steps",
    "s": "seconds", "sec": "seconds", "secs": "seconds", "second": "seconds", "seconds": "seconds",
    "min": "minutes", "mins": "minutes", "minute": "minutes", "minutes": "minutes", "m": "minutes",
    "h": "hours", "hour": "hours", "hours": "hours",
}


def parse_checkpoint_every(value: Any) -> Optional[tuple[str, float]]:
    """`checkpoint_every` as ("epochs" | "steps", N) or ("seconds", S); None when empty
    (checkpoints only after each task)."""
    text = "" if value is None else str(value).strip().lower()
    if text == "":
        return None
    match = _EVERY.fullmatch(text)
    unit = _EVERY_UNITS.get(match.group(2)) if match else None
    number = float(match.group(1)) if match else 0.0
    if unit in ("epochs", "steps") and number != int(number):
        unit = None
    if unit is None or not (math.isfinite(number) and number > 0):
        raise CLBenchError(
            f"checkpoint_every={value!r} is not understood; use N epochs, N steps or a wall time, "
            "e.g. 2epochs, 500steps, 30min, 90s or 1h (empty: only after each task)"
        )
    if unit == "minutes":
        return "seconds", number * 60
    if unit == "hours":
        return "seconds", number * 3600
    return unit, (int(number) if unit != "seconds" else number)


# ----- mid-task strategy state ---------------------------------------------------------------
# Attributes the runner restores itself (or that hold the data / config, never changed by steps).
_NOT_TASK_STATE = frozenset({"model", "stream", "optimizer", "train_cfg", "device", "_reporter"})
_SKIP = object()


def _is_data(value: Any) -> bool:
    from cl_bench.data.stream import Split, Stream, Task

    return isinstance(value, (Split, Stream, Task))


def _capture(value: Any, depth: int = 0) -> Any:
    """A tagged, picklable snapshot of `value` (see `capture_task_state`), or _SKIP."""
    if depth > 8:
        return _SKIP
    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach())
    if isinstance(value, torch.nn.Module):
        return ("module", value.state_dict())
    if isinstance(value, torch.optim.Optimizer):
        return ("optimizer", value.state_dict())
    if isinstance(value, torch.Generator):
        return ("generator", value.get_state())
    if value is None or isinstance(value, (bool, int, float, str, bytes, np.ndarray, np.generic)):
        return ("value", value)
    if isinstance(value, (list, tuple)):
        items = [_capture(v, depth + 1) for v in value]
        return _SKIP if any(i is _SKIP for i in items) else ("tuple" if isinstance(value, tuple) else "list", items)
    if isinstance(value, (set, frozenset)):
        items = [_capture(v, depth + 1) for v in value]
        return _SKIP if any(i is _SKIP for i in items) else ("set", items)
    if isinstance(value, dict):
        items = {k: _capture(v, depth + 1) for k, v in value.items()}
        return _SKIP if any(i is _SKIP for i in items.values()) else ("dict", items)
    if callable(value) or _is_data(value):
        return _SKIP
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        return ("stateful", value.state_dict())
    if type(value).__module__.startswith("cl_bench.") and hasattr(value, "__dict__"):
        fields = {k: _capture(v, depth + 1) for k, v in vars(value).items()}
        return ("object", {k: v for k, v in fields.items() if v is not _SKIP})
    return _SKIP


@torch.no_grad()
def _restore(current: Any, snap: tuple, device: torch.device) -> Any:
    """The value `snap` describes, written into `current` where it can be (tensors copied
    in place, modules/optimizers/generators loaded), so aliases of it stay aliases."""
    kind, data = snap
    if kind == "tensor":
        if (
            isinstance(current, torch.Tensor)
            and current.shape == data.shape
            and current.dtype == data.dtype
            and current.device == data.device
        ):
            if not torch.equal(current, data):
                try:
                    current.copy_(data)
                except RuntimeError:  # e.g. an expanded view, written through nowhere else
                    return data.clone()
            return current
        return data
    if kind in ("module", "optimizer", "stateful"):
        if current is None:
            raise CLBenchError(
                f"cannot resume mid-task: the strategy created a {kind} during the task's training "
                "steps; give the strategy task_state()/load_task_state(), or use checkpoint_every="
            )
        current.load_state_dict(data)
        return current
    if kind == "generator":
        current = current if isinstance(current, torch.Generator) else torch.Generator()
        current.set_state(data.cpu())
        return current
    if kind == "value":
        return data
    if kind in ("list", "tuple", "set"):
        old = list(current) if isinstance(current, (list, tuple)) and len(current) == len(data) else [None] * len(data)
        items = [_restore(c, s, device) for c, s in zip(old, data)]
        if kind == "list":
            if isinstance(current, list):
                current[:] = items
                return current
            return items
        return tuple(items) if kind == "tuple" else set(items)
    if kind == "dict":
        old = current if isinstance(current, dict) else {}
        items = {k: _restore(old.get(k), s, device) for k, s in data.items()}
        if isinstance(current, dict):
            current.clear()
            current.update(items)
            return current
        return items
    if kind == "object":
        if current is None:
            raise CLBenchError("cannot resume mid-task: a strategy attribute was created during the task's steps")
        _restore_attributes(current, data, device)
        return current
    raise CLBenchError(f"not a mid-task snapshot entry: {kind!r}")


def _restore_attributes(obj: Any, fields: dict, device: torch.device) -> None:
    for name, snap in fields.items():
        setattr(obj, name, _restore(getattr(obj, name, None), snap, device))


def capture_task_state(strategy: Strategy) -> dict:
    """The strategy's state as its training steps may have changed it (see the module
    docstring): `strategy.task_state()` when it defines one, else every attribute that
    is a tensor, module, optimizer, generator, object with state_dict, plain value or a
    container of those (functions, data and the runner-owned model/optimizer left out)."""
    own = getattr(strategy, "task_state", None)
    if callable(own):
        return {"own": own()}
    fields = {k: _capture(v) for k, v in vars(strategy).items() if k not in _NOT_TASK_STATE}
    return {"fields": {k: v for k, v in fields.items() if v is not _SKIP}}


def restore_task_state(strategy: Strategy, state: dict, device: torch.device) -> None:
    if "own" in state:
        strategy.load_task_state(state["own"])
    else:
        _restore_attributes(strategy, state["fields"], device)


