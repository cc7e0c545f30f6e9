"""The Hydra application behind `clbench run`.

The app never prints errors itself: it raises, and `cl_bench.cli` turns every error into
one line (`--debug` shows the traceback). What it owns is the run folder's life cycle
(`cl_bench.rundir`): lock it, refuse without a trace, or claim it and run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.control import Control

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
# The sweep folder of the jobs of a sweep that ran in this process (for `clbench report` advice).
SWEEP_DIRS: list[str] = []


@hydra.main(version_base="1.3", config_path="pkg://cl_bench.conf", config_name="config")
def run_app(cfg: DictConfig) -> float:
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep_dir = str(HydraConfig.get().sweep.dir)
        if sweep_dir not in SWEEP_DIRS:
            SWEEP_DIRS.append(sweep_dir)
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
    if multirun:
        sweep.assign_gpu(cfg, hc.launcher, hc.job.num)  # local parallel sweeps: one GPU per worker

    folder = RunFolder(output_dir).open()
    try:
        # Refusals: nothing below writes into the folder.
        console = RunConsole(stderr=True)  # also writes clbench.log once the run is accepted
        runner = Runner(cfg, output_dir, names=names, console=console)
        runner.prepare()  # the config checks, the data, the model, the checkpoint
        done = sweep.completed_summary(output_dir, cfg) if cfg.resume else None
        if done is not None:
            print(f"clbench: skipping {output_dir}: it already holds complete results of this config",
                  file=sys.stderr)
            folder.refuse()  # nothing to do here: leave the folder as it was found
            if multirun:
                _sweep_line(hc, done, note=" (done before)")
            else:
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
        try:
            folder.commit(_hydra_record(cfg), start_over=not cfg.resume)
            # the console's record of the run (appended on a resume, started afresh with resume=false)
            console.attach(Path(output_dir) / RUN_LOG, fresh=not cfg.resume)
            summary = runner.run()
        except RunInterrupted as exc:
            console.note(f"clbench: {exc}")
            raise  # resumable: a checkpoint, not a failure
        except BaseException as exc:
            from cl_bench.errors import describe

            console.note("clbench: interrupted" if isinstance(exc, KeyboardInterrupt) else f"clbench: error: {describe(exc)}")
            if isinstance(exc, Exception):
                try:
                    sweep.write_failure(output_dir, exc)
                except OSError:
                    pass  # e.g. the disk is full: the error itself is what the user must see
            raise
        SUMMARIES.append(summary)
        if multirun:
            _sweep_line(hc, summary, console=console)
        else:
            _show(summary, console.twin(stderr=False))
    finally:
        console.detach()
        folder.release()
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
            node = OmegaConf.create(shipped.read_text(encoding="utf-8"))
            # a `# @package _global_` option (permuted_mnist, sequence) holds its group under the group's key
            shipped_target = node.get("_target_") or (node.get(group) or {}).get("_target_")
            names[group] = choice if shipped_target == target or not target else target
        elif choice or target:  # an option of the user's own config folder
            names[group] = choice or target
    return names


def _show(summary: dict, console=None) -> None:
    import numpy as np
    from rich.console import Console

    from cl_bench.results import print_summary

    R_aware = summary.get("accuracy_matrix_task_aware")
    print_summary(console or Console(), summary, np.asarray(summary["accuracy_matrix"], dtype=float),
                  None if R_aware is None else np.asarray(R_aware, dtype=float))


def sweep_line(job: int, overrides: list[str], summary: dict) -> str:
    """One line for a finished job of a sweep: its number, overrides, final ACC, forgetting,
    time and folder (a single run prints its tables instead)."""
    def pct(value) -> str:
        return "n/a" if value is None else f"{100 * float(value):.2f}%"

    metrics = summary.get("metrics") or {}
    total = (summary.get("timing") or {}).get("total_s")
    took = "n/a" if total is None else f"{float(total):.1f} s"
    return (f"[job {job}] {' '.join(overrides) or '(defaults)'}: acc {pct(metrics.get('acc'))}, "
            f"forgetting {pct(metrics.get('forgetting'))}, {took} -> {summary.get('output_dir', '')}")


def _sweep_line(hc, summary: dict, note: str = "", console=None) -> None:
    line = sweep_line(hc.job.num, list(hc.overrides.task), summary) + note
    if console is not None:
        console.note(line)  # into clbench.log too
    print(line, flush=True)


RUN_LOG = "clbench.log"


class RunConsole(Console):
    """The run's rich console (stderr: resume messages, warnings, the progress display) that also
    writes what it prints into the run folder's clbench.log once `attach`ed: everything but the
    live progress display's redraws (its final state is written when it stops)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._log: Optional[Console] = None
        self._log_file = None

    def attach(self, path: Path, fresh: bool = False) -> None:
        self._log_file = open(path, "w" if fresh else "a", encoding="utf-8")
        self._log = Console(file=self._log_file, width=120, color_system=None, force_terminal=False,
                            force_jupyter=False, highlight=False, emoji=False)
        self._log.print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} clbench run {' '.join(sys.argv[1:])}",
                        markup=False, soft_wrap=True)

    def twin(self, stderr: bool) -> "RunConsole":
        """A console on the other stream (stdout for the tables) writing into the same log."""
        other = RunConsole(stderr=stderr)
        other._log = self._log
        return other

    def print(self, *objects, **kwargs) -> None:
        super().print(*objects, **kwargs)
        log = self._log
        if log is None:
            return
        if objects and not all(isinstance(o, Control) for o in objects):  # not a live-display redraw
            log.print(*objects, **kwargs)

    def clear_live(self) -> None:
        live = self._live_stack[-1] if self._live_stack else None
        super().clear_live()
        if live is not None and self._log is not None:
            self._log.print(live.renderable)  # the live display's final state, as it stops

    def note(self, line: str) -> None:
        """A line for the log only (e.g. the error the command line prints)."""
        if self._log is not None:
            self._log.print(line, markup=False, highlight=False, soft_wrap=True)

    def detach(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
        self._log = self._log_file = None
