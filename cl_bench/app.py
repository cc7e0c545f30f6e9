"""The Hydra application behind `clbench run`.

The app never prints errors itself: it raises, and `cl_bench.cli` turns every error into
one line (`--debug` shows the traceback). What it owns is the run folder's life cycle
(`cl_bench.rundir`): lock it, refuse without a trace, or claim it and run.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import cl_bench.config  # noqa: F401  (registers the run schema in Hydra's ConfigStore)


def _objective(cfg: DictConfig, summary: dict) -> float:
    # The return value is what Hydra's sweepers (e.g. Optuna) optimise.
    value = summary["metrics"].get(cfg.objective)
    return float("nan") if value is None else float(value)


def _hydra_record(cfg: DictConfig) -> dict[str, str]:
    """Hydra's `.hydra/` files (config, hydra, overrides), written by the app once the run is accepted."""
    hc = HydraConfig.get()
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})),
        "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task))),
    }


# The error that ended a single run (a sweep's jobs raise, so that Hydra marks them failed):
# `cl_bench.cli` prints it in one line, without Hydra's "Error executing job" preamble.
FAILURES: list[BaseException] = []
# The summary of every run that finished in this process's current command (cl_bench.cli.launch
# clears it before and after), for the Python API.
SUMMARIES: list[dict] = []


@hydra.main(version_base="1.3", config_path="pkg://cl_bench.conf", config_name="config")
def run_app(cfg: DictConfig) -> float:
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        try:
            return _run(cfg, multirun=True)
        except Exception as exc:
            hc = HydraConfig.get()
            exc.clbench_job = f"sweep job {hc.job.num} ({' '.join(hc.overrides.task)})"
            raise
    try:
        return _run(cfg, multirun=False)
    except Exception as exc:
        FAILURES.append(exc)
        return float("nan")


def _run(cfg: DictConfig, multirun: bool) -> float:
    from cl_bench import sweep
    from cl_bench.rundir import RunFolder, created_chain, remove_chain
    from cl_bench.runner import Runner, RunInterrupted

    hc = HydraConfig.get()
    output_dir = cfg.output_dir or hc.runtime.output_dir
    if cfg.output_dir:  # Hydra made its own (unused, empty) run folder: take it away again
        remove_chain(created_chain(hc.runtime.output_dir))
    choices = hc.runtime.choices
    names = run_names(cfg, choices)
    if multirun and cfg.device.num_threads is None:
        # Parallel workers share the cores: give each its share of torch threads.
        cfg.device.num_threads = sweep.threads_per_worker(hc.launcher)

    folder = RunFolder(output_dir).open()
    try:
        # Refusals: nothing below writes into the folder.
        runner = Runner(cfg, output_dir, names=names)
        runner.prepare()  # the config checks, the data, the model, the checkpoint
        done = sweep.completed_summary(output_dir, cfg) if cfg.resume else None
        if done is not None:
            print(f"clbench: skipping {output_dir}: it already holds complete results of this config",
                  file=sys.stderr)
            folder.refuse()  # nothing to do here: leave the folder as it was found
            if not multirun:
                _show(done)
            SUMMARIES.append(done)
            return _objective(cfg, done)
    except BaseException as exc:
        if multirun and folder.empty and isinstance(exc, Exception):
            # A new job folder of a sweep: record the failure so that `clbench report` lists it.
            sweep.write_failure(output_dir, exc)
            folder.release()
        else:
            folder.refuse()
        raise

    try:
        folder.commit(_hydra_record(cfg), start_over=not cfg.resume)
        summary = runner.run()
    except RunInterrupted:
        raise  # resumable: a checkpoint, not a failure
    except Exception as exc:
        try:
            sweep.write_failure(output_dir, exc)
        except OSError:
            pass  # e.g. the disk is full: the error itself is what the user must see
        raise
    finally:
        folder.release()
    SUMMARIES.append(summary)
    _show(summary)
    return _objective(cfg, summary)


def run_names(cfg: DictConfig, choices) -> dict[str, str]:
    """What ran, per group: the chosen option's name, unless its `_target_` was overridden
    (`strategy._target_=my.module.Mine`), then that target, so results are never labelled
    with a shipped method that did not run."""
    from importlib.resources import files

    names = {}
    for group in ("strategy", "dataset", "backbone"):
        choice = choices.get(group)
        target = str(cfg[group].get("_target_", "")) if cfg.get(group) is not None else ""
        shipped = files("cl_bench.conf").joinpath(group, f"{choice}.yaml") if choice else None
        if shipped is not None and shipped.is_file():
            shipped_target = OmegaConf.create(shipped.read_text(encoding="utf-8")).get("_target_")
            names[group] = choice if shipped_target == target or not target else target
        elif choice or target:  # an option of the user's own config folder
            names[group] = choice or target
    return names


def _show(summary: dict) -> None:
    import numpy as np
    from rich.console import Console

    from cl_bench.results import print_summary

    R_aware = summary.get("accuracy_matrix_task_aware")
    print_summary(Console(), summary, np.asarray(summary["accuracy_matrix"], dtype=float),
                  None if R_aware is None else np.asarray(R_aware, dtype=float))
