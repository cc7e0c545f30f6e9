"""Helpers for sweeps: skip what is done, mark failures, threads per parallel worker.

A run folder is in one of four states, read by `clbench report` and by the app when a
sweep is started again on the same `hydra.sweep.dir`:

- complete:   `metrics.json` exists (the runner writes it last, atomically);
- failed:     `failed.json` exists (written atomically by the app when the run raised);
- unfinished: neither, but Hydra's `.hydra/` is there (killed, preempted, or running),
              possibly with a `checkpoint.pt` the runner resumes from;
- absent:     not started.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from cl_bench import CLBenchError

METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"


def completed_summary(output_dir: Path, cfg: DictConfig) -> Optional[dict]:
    """The stored summary when `output_dir` already holds complete results of this config.

    None when the folder holds no `metrics.json`. A folder holding the results of a
    different config (e.g. a reused sweep dir whose job numbers now mean other
    overrides) is an error rather than a silent skip or overwrite.
    """
    from cl_bench.runner import config_fingerprint

    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        stored = config_fingerprint(OmegaConf.create(summary["config"]))
    except Exception:
        return None  # unreadable: treat as not done, the run rewrites it
    if stored != config_fingerprint(cfg):
        raise CLBenchError(
            f"{output_dir} already holds results of a different config; use a new "
            "hydra.sweep.dir (or hydra.run.dir), or resume=false to overwrite them"
        )
    return summary


def write_failure(output_dir: Path, exc: BaseException) -> None:
    """Mark a run as failed (atomically), with the error; no result files are written."""
    from cl_bench.results import atomic_write_text

    record = {
        "status": "failed",
        "error_type": type(exc).__name__,
        "error": str(exc),
        "traceback": traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(Path(output_dir) / FAILED_FILE, json.dumps(record, indent=2) + "\n")


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks set by Slurm/cgroups)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def parallel_workers(launcher: Any, cores: int) -> int:
    """How many jobs of a sweep share this machine's cores under `launcher` (Hydra's config)."""
    target = str((launcher or {}).get("_target_", ""))
    if target.endswith(("JoblibLauncher", "ForkLauncher")):
        n = launcher.get("n_jobs", -1)
        if n is None:
            return 1
        n = int(n)
        return max(1, cores + 1 + n if n < 0 else n)  # joblib's convention: -1 = all cores
    if target.endswith("LocalLauncher"):  # submitit's local executor: one process per job
        return max(1, min(cores, int(launcher.get("array_parallelism", cores) or cores)))
    return 1  # basic launcher (sequential) or a cluster launcher (one allocation per job)


def threads_per_worker(launcher: Any, cores: Optional[int] = None) -> int:
    """torch intra-op threads per job so that parallel workers do not oversubscribe the cores."""
    cores = cores or available_cores()
    cpus = (launcher or {}).get("cpus_per_task")
    if cpus:  # submitit: the cores each job was given
        return max(1, min(int(cpus), cores))
    return max(1, cores // parallel_workers(launcher, cores))


def gpu_assignment(launcher: Any, job_num: int, gpus: int, cores: Optional[int] = None) -> Optional[tuple[int, float]]:
    """(GPU index, share of its memory) for job `job_num` of a sweep on one machine with
    `gpus` visible GPUs; None when the launcher runs one job at a time here (the basic
    launcher) or gives each job its own allocation (a cluster launcher), or there is no GPU.

    Jobs go round-robin over the visible GPUs (`CUDA_VISIBLE_DEVICES` decides which those
    are): with as many workers as GPUs each worker has its own, with more workers
    (`hydra.launcher.n_jobs` > GPUs) several small runs share one, each capped at its share
    of the GPU's memory so that together they never oversubscribe it. Parallel workers take
    jobs in order, so jobs running at the same time are consecutive and spread evenly.
    """
    if gpus < 1:
        return None
    target = str((launcher or {}).get("_target_", ""))
    if not target.endswith(("JoblibLauncher", "ForkLauncher", "LocalLauncher")):
        return None
    workers = parallel_workers(launcher, cores or available_cores())
    if workers < 2:
        return None
    sharing = -(-workers // gpus)  # runs at the same time on one GPU
    return job_num % gpus, 1.0 / sharing


def assign_gpu(cfg: DictConfig, launcher: Any, job_num: int) -> None:
    """Put job `job_num` of a local parallel sweep on its GPU (see `gpu_assignment`) when its
    device is `cuda` or `auto` without an index; `cuda:N` is left as the user set it."""
    name = str(cfg.device.name).strip().lower()
    if name not in ("cuda", "auto"):
        return
    import torch

    if not torch.cuda.is_available():
        return  # auto: the CPU; cuda: the runner refuses it in one line
    placed = gpu_assignment(launcher, job_num, torch.cuda.device_count())
    if placed is not None:
        cfg.device.name = f"cuda:{placed[0]}"
        if cfg.device.memory_fraction is None and placed[1] < 1:
            cfg.device.memory_fraction = placed[1]


# Beyond this many jobs, `check_sweep` varies one swept key at a time instead of composing
# every combination.
_MAX_CHECKED_COMBINATIONS = 64


def check_sweep(args: list[str]) -> Optional[str]:
    """The first problem of any job of the sweep `args` (`clbench run -m ...`), found by
    composing each job's config and running the up-front checks, before any job starts;
    None when every job passes. A key swept over a search space that only the sweeper
    expands (Optuna's `interval(...)`) keeps its default in the check; a sweep over a
    user's own config folder (`--config-dir`, `hydra.searchpath`) is left to the jobs."""
    return check_sweep_jobs(args)[0]


def check_sweep_jobs(args: list[str]) -> tuple[Optional[str], frozenset]:
    """`check_sweep`'s problem, and the jobs whose configs were composed and passed, each as
    the frozenset of its overrides (none when the check was left to the jobs or sampled
    beyond `_MAX_CHECKED_COMBINATIONS`): Hydra's basic sweeper need not compose those again
    before it launches them (`skip_checked_jobs`)."""
    import itertools

    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_bench.config import preflight
    from cl_bench.errors import describe

    from cl_bench.cli import own_config_folder

    if own_config_folder(args):
        return None, frozenset()
    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        return describe(exc, args), frozenset()
    choices: list[list[str]] = []
    # each choice as Hydra's basic sweeper writes it in a job's overrides (None: not one of them)
    job_forms: list[list[Optional[str]]] = []
    for text, override in zip(overrides, parsed):
        key = override.get_key_element()
        if override.is_sweep_override():
            try:
                values = forms = [f"{key}={v}" for v in override.sweep_string_iterator()]
            except Exception:  # a search space (interval, tag): its bounds are the sweeper's business
                continue
        else:
            values, forms = [text], [f"{key}={override.get_value_element_as_str()}"]
        choices.append(values)
        job_forms.append([None] * len(forms) if override.is_hydra_override() else list(forms))
    combos = list(itertools.islice(itertools.product(*choices), _MAX_CHECKED_COMBINATIONS + 1))
    jobs = frozenset(frozenset(f for f in forms if f is not None)
                     for forms in itertools.islice(itertools.product(*job_forms), _MAX_CHECKED_COMBINATIONS + 1))
    sampled = False
    if len(combos) > _MAX_CHECKED_COMBINATIONS:  # each value of each key once, the others at their first
        first = [c[0] for c in choices]
        combos = [tuple(first[:i] + [v] + first[i + 1 :]) for i, c in enumerate(choices) for v in c]
        sampled = True
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="cl_bench.conf", version_base="1.3"):
            for combo in combos:
                try:
                    preflight(compose("config", overrides=list(combo)))
                except Exception as exc:
                    job = " ".join(o for o, c in zip(combo, choices) if len(c) > 1) or " ".join(combo)
                    return f"{describe(exc, list(combo))} (in the sweep job {job}); no job was started", frozenset()
    finally:
        GlobalHydra.instance().clear()
    return None, frozenset() if sampled else jobs


@contextlib.contextmanager
def skip_checked_jobs(checked: frozenset):
    """While a sweep launches: Hydra's basic sweeper composes every job's config before it
    launches a batch (`validate_batch_is_legal`, one composition per job, ~60 ms each, in the
    sweep's own process before any job starts); the jobs `check_sweep_jobs` already composed
    and checked (the same overrides) are not composed again. Any other job (an override the
    sweeper added, a sampled check, an Optuna trial) still is. Patched on Hydra's `Sweeper`
    base class: its plugin scan may load the sweeper modules again, as new class objects."""
    from hydra.plugins.sweeper import Sweeper

    original = Sweeper.validate_batch_is_legal
    if not checked:
        yield
        return

    def validate(self, batch):
        rest = [overrides for overrides in batch if frozenset(overrides) not in checked]
        if rest:
            original(self, rest)

    Sweeper.validate_batch_is_legal = validate
    try:
        yield
    finally:
        Sweeper.validate_batch_is_legal = original
