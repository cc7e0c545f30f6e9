"""The fork launcher (see the package docstring).

No `from __future__ import annotations` here: Hydra's plugin scan executes this module without
registering it in sys.modules, and a dataclass with string annotations looks its module up there."""

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class ForkLauncherConf:
    _target_: str = "hydra_plugins.clbench_launcher.fork_launcher.ForkLauncher"
    # parallel workers; joblib's convention: -1 = all cores, -2 = all but one
    n_jobs: int = -1


ConfigStore.instance().store(group="hydra/launcher", name="fork", node=ForkLauncherConf, provider="clbench")

# What a forked worker needs, set by the parent just before it forks (inherited, never pickled). Kept
# when Hydra's plugin scan executes this module again in the same module object (a worker's job can
# trigger a rescan), so a worker's later jobs still find it.
_STATE: dict[str, Any] = globals().get("_STATE", {})


def workers(n_jobs: Optional[int], cores: int) -> int:
    """joblib's convention: n >= 1 workers; -1 all cores, -2 all but one, ...; null: 1."""
    if n_jobs is None:
        return 1
    n = int(n_jobs)
    return max(1, cores + 1 + n if n < 0 else n)


def _warm_imports() -> None:
    """Import, in the parent, what every run imports, so forked workers start with it loaded.
    No tensor is computed and CUDA is not touched (neither is fork-safe)."""
    import torch

    import cl_bench.runner  # noqa: F401  (the runner, strategies' base, metrics, results)
    import cl_bench.strategies  # noqa: F401

    # torch imports its optimizer and compiler stack lazily at the first optimizer construction
    # (about a second); constructing one on a CPU tensor runs no parallel region
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _execute(idx: int, overrides: Sequence[str]) -> JobReturn:
    hydra_context: HydraContext = _STATE["hydra_context"]
    setup_globals()
    Singleton.set_state(_STATE["singletons"])
    sweep_config = hydra_context.config_loader.load_sweep_config(_STATE["config"], list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, config=sweep_config, task_function=_STATE["task_function"],
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def _job(args: tuple[int, Sequence[str]]) -> JobReturn:
    ret = _execute(*args)
    ret.hydra_cfg = None  # the parent does not need it back (and it holds the whole Hydra config)
    return ret


class ForkLauncher(Launcher):
    def __init__(self, n_jobs: int = -1) -> None:
        self.n_jobs = n_jobs
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import multiprocessing

        from cl_bench import CLBenchError
        from cl_bench.sweep import available_cores

        if not hasattr(os, "fork") or "fork" not in multiprocessing.get_all_start_methods():
            raise CLBenchError("hydra/launcher=fork needs os.fork (Linux); use hydra/launcher=joblib here")
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        n = min(workers(self.n_jobs, available_cores()), len(job_overrides))
        log.info(f"ForkLauncher({n} workers) is launching {len(job_overrides)} jobs in {sweep_dir}")
        for i, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(overrides))}")
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        # the pool finds `_job` (and so `_STATE`) by name: use the module under that name
        module = importlib.import_module(__name__)
        module._STATE.update(hydra_context=self.hydra_context, config=self.config, task_function=self.task_function,
                      singletons=Singleton.get_state())
        if n < 2:  # nothing to run side by side: in this process, as the basic launcher would
            return [module._execute(*job) for job in jobs]
        _warm_imports()
        with multiprocessing.get_context("fork").Pool(n) as pool:
            return list(pool.imap(module._job, jobs, chunksize=1))


def register() -> None:
    """Make the launcher known to Hydra where its plugin scan cannot see it (an editable
    install maps `hydra_plugins.clbench_launcher` through an import hook that Hydra's scan of
    the `hydra_plugins` folders does not walk). Importing this module has already stored
    `hydra/launcher=fork` in Hydra's ConfigStore."""
    from hydra.core.plugins import Plugins

    Plugins.instance().class_name_to_class.setdefault(f"{ForkLauncher.__module__}.{ForkLauncher.__name__}",
                                                      ForkLauncher)
