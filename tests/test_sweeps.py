"""Sweeps as a user runs them: `clbench run -m` through Hydra's launchers, then `clbench report`.

A 2-strategy x 2-seed sweep runs once under each of the basic, joblib and submitit-local
launchers (module fixture); the tests check that a seed gives the same matrix in any
launcher, that `report` aggregates each folder to the means and stds computed from the
runs' own files and lists a failed run as failed, that a killed sweep started again
finishes only the missing work, and that the Optuna preset tunes on the validation split.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cl_bench.report import build_report
from cl_bench.results import read_matrix
from cl_bench.strategies.finetune import Finetune
from cl_bench.sweep import assign_gpu, available_cores, gpu_assignment, parallel_workers, threads_per_worker
from tests.conftest import run

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {
    "basic": [],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    # clbench's own: workers forked from the sweep's process (cl_bench/launcher)
    "fork": ["hydra/launcher=fork", "hydra.launcher.n_jobs=2"],
    "submitit_local": ["hydra/launcher=submitit_local"],
}
SWEEP = ["experiment=smoke", "strategy=finetune,joint", "seed=0,1"]


def clbench(*args: str, cwd=ROOT, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "220", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "cl_bench.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


class KillableFinetune(Finetune):
    """Finetune that SIGKILLs its own process right after training task 2 (before that
    task's evaluation and checkpoint) once the count in $CLBENCH_TEST_KILL_COUNTER reaches 0:
    a real crash in the middle of a sweep, with no clean-up."""

    def after_task(self, task) -> None:
        super().after_task(task)
        counter = os.environ.get("CLBENCH_TEST_KILL_COUNTER")
        if counter and task.id == 2:
            left = int(Path(counter).read_text()) - 1
            Path(counter).write_text(str(left))
            if left == 0:
                os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweeps")
    out = {}
    for name, launcher in LAUNCHERS.items():
        folder = root / name
        proc = clbench("run", "-m", *SWEEP, *launcher, f"hydra.sweep.dir={folder}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = folder
    # A run that fails inside the basic launcher's folder (it diverges; a bad value would be
    # refused before any job starts, see test_bad_inputs).
    proc = clbench("run", "-m", "experiment=smoke", "train.lr=1e9", f"hydra.sweep.dir={out['basic'] / 'bad'}")
    assert proc.returncode != 0 and "training diverged" in proc.stderr
    return out


def run_folders(sweep_dir: Path) -> dict[tuple[str, int], Path]:
    runs = {}
    for metrics in sorted(sweep_dir.glob("*/metrics.json")):
        summary = json.loads(metrics.read_text())
        runs[(summary["strategy"], summary["seed"])] = metrics.parent
    return runs


def test_every_launcher_gives_the_same_matrices_for_the_same_seed(sweeps):
    reference = run_folders(sweeps["basic"])
    assert sorted(reference) == [("finetune", 0), ("finetune", 1), ("joint", 0), ("joint", 1)]
    for name in ("joblib", "fork", "submitit_local"):
        runs = run_folders(sweeps[name])
        assert sorted(runs) == sorted(reference), name
        for key, folder in runs.items():
            np.testing.assert_array_equal(read_matrix(folder / "accuracy_matrix.csv"),
                                          read_matrix(reference[key] / "accuracy_matrix.csv"), err_msg=f"{name} {key}")
    # The seeds differ from each other (the sweep is not one run repeated).
    assert not np.array_equal(read_matrix(reference[("finetune", 0)] / "accuracy_matrix.csv"),
                              read_matrix(reference[("finetune", 1)] / "accuracy_matrix.csv"))


def test_parallel_workers_get_their_share_of_the_cores(sweeps):
    cores = available_cores()
    for name, expected in (("joblib", max(1, cores // 2)), ("fork", max(1, cores // 2)), ("submitit_local", 1),
                           ("basic", cores)):
        for folder in run_folders(sweeps[name]).values():
            cfg = json.loads((folder / "metrics.json").read_text())["config"]
            assert cfg["device"]["num_threads"] == expected, name
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": -1}
    assert parallel_workers(joblib, 8) == 8 and threads_per_worker(joblib, 8) == 1
    assert threads_per_worker({**joblib, "n_jobs": 2}, 8) == 4 and threads_per_worker({**joblib, "n_jobs": -2}, 8) == 1
    fork = {"_target_": "hydra_plugins.clbench_launcher.fork_launcher.ForkLauncher", "n_jobs": 2}
    assert parallel_workers(fork, 8) == 2 and threads_per_worker(fork, 8) == 4
    assert gpu_assignment(fork, 3, 2, cores=8) == (1, 1.0)
    slurm = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "cpus_per_task": 4}
    assert threads_per_worker(slurm, 16) == 4


def test_parallel_workers_get_their_own_gpu_round_robin():
    """The assignment logic (no GPU needed): jobs go round-robin over the visible GPUs;
    more workers than GPUs share them, each capped at its share of the memory."""
    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 4}
    assert [gpu_assignment(joblib, j, 4, cores=16) for j in range(6)] == [
        (0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0), (0, 1.0), (1, 1.0)]
    # 4 workers on 2 GPUs: two runs on each at any time, half its memory each
    two = [gpu_assignment(joblib, j, 2, cores=16) for j in range(4)]
    assert two == [(0, 0.5), (1, 0.5), (0, 0.5), (1, 0.5)]
    # jobs running at the same time (4 consecutive numbers) are spread evenly
    for first in range(8):
        gpus = [gpu_assignment(joblib, j, 2, cores=16)[0] for j in range(first, first + 4)]
        assert sorted(gpus) == [0, 0, 1, 1]
    # 3 workers on 2 GPUs: at most 2 on one, each capped at half
    assert {gpu_assignment({**joblib, "n_jobs": 3}, j, 2, cores=16)[1] for j in range(3)} == {0.5}
    local = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
             "array_parallelism": 2}
    assert gpu_assignment(local, 3, 2, cores=16) == (1, 1.0)
    # one job at a time, or one allocation per job, or no GPU: left alone
    basic = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}
    slurm = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
    assert gpu_assignment(basic, 1, 2) is None and gpu_assignment(slurm, 1, 2) is None
    assert gpu_assignment({**joblib, "n_jobs": 1}, 1, 2, cores=16) is None
    assert gpu_assignment(joblib, 1, 0, cores=16) is None


def test_assign_gpu_leaves_cpu_and_explicit_devices_alone():
    from omegaconf import OmegaConf

    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 4}
    for name in ("cpu", "cuda:1"):
        cfg = OmegaConf.create({"device": {"name": name, "memory_fraction": None}})
        assign_gpu(cfg, joblib, 3)
        assert cfg.device.name == name and cfg.device.memory_fraction is None
    if not torch.cuda.is_available():  # auto without a GPU stays auto (the CPU)
        cfg = OmegaConf.create({"device": {"name": "auto", "memory_fraction": None}})
        assign_gpu(cfg, joblib, 3)
        assert cfg.device.name == "auto"


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_report_aggregates_each_sweep_from_the_runs_own_files(sweeps, launcher):
    folder = sweeps[launcher]
    proc = clbench("report", str(folder), "--format", "console,csv", "--no-plots")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(folder / "report" / "report.csv").set_index("strategy")
    runs = run_folders(folder)
    for strategy in ("finetune", "joint"):
        acc, bwt, forgetting, total_s = [], [], [], []
        for seed in (0, 1):
            R = read_matrix(runs[(strategy, seed)] / "accuracy_matrix.csv")
            T = len(R)
            acc.append(R[-1].mean())
            bwt.append(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]))
            forgetting.append(np.mean([max(R[: T - 1, j] - R[-1, j]) for j in range(T - 1)]))
            total_s.append(json.loads((runs[(strategy, seed)] / "metrics.json").read_text())["timing"]["total_s"])
        row = table.loc[strategy]
        assert row["n"] == 2
        for name, values in (("acc", acc), ("bwt", bwt), ("forgetting", forgetting), ("time", total_s)):
            assert row[f"{name}_mean"] == pytest.approx(np.mean(values), abs=1e-6), name
            assert row[f"{name}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-6), name
    assert table.loc["joint", "intransigence_mean"] == 0.0
    assert "finetune" in proc.stdout and "±" in proc.stdout
    if launcher == "basic":
        # The failed run is listed apart, as failed, with its error, and is not averaged in.
        assert "Failed or unfinished runs" in proc.stdout and "failed" in proc.stdout
        assert "training diverged" in proc.stdout
        assert (folder / "bad" / "0" / "failed.json").exists()
        assert not (folder / "bad" / "0" / "metrics.json").exists()
        assert int(table["n"].sum()) == 4


def test_killed_sweep_rerun_finishes_only_the_missing_work(tmp_path):
    target = f"strategy._target_={__name__}.KillableFinetune"
    sweep = ["experiment=smoke", target, "seed=0,1,2"]
    folder = tmp_path / "sweep"
    counter = tmp_path / "kill_counter"
    counter.write_text("2")  # job 0 completes; job 1 is killed after training its task 2
    killed = clbench("run", "-m", *sweep, f"hydra.sweep.dir={folder}",
                     env_extra={"CLBENCH_TEST_KILL_COUNTER": str(counter)})
    assert killed.returncode != 0
    done = folder / "0" / "metrics.json"
    assert done.exists() and not (folder / "1" / "metrics.json").exists()
    assert (folder / "1" / "checkpoint.pt").exists() and not (folder / "2").exists()
    problems = build_report(folder).problems
    assert [(p.path.name, p.status) for p in problems] == [("1", "unfinished")]
    assert "2 task(s) done" in problems[0].reason
    before = done.read_bytes()

    again = clbench("run", "-m", *sweep, f"hydra.sweep.dir={folder}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipping {folder / '0'}" in again.stderr and "complete results" in again.stderr
    assert "2/5 tasks done" in again.stderr  # job 1 resumed from its checkpoint, not redone
    assert again.stderr.count("resuming") == 1
    assert done.read_bytes() == before  # the finished run was not touched
    # Every run equals an uninterrupted run of the same config, bit for bit.
    for job in ("0", "1", "2"):
        reference = run(tmp_path, "experiment=smoke", target, f"seed={job}", name=f"reference{job}")
        resumed = json.loads((folder / job / "metrics.json").read_text())
        assert resumed["accuracy_matrix"] == reference["accuracy_matrix"], job
    # The same sweep dir reused for other overrides: refused, the results are kept.
    other = clbench("run", "-m", "experiment=smoke", target, "seed=7", f"hydra.sweep.dir={folder}")
    assert other.returncode != 0 and "different config" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1 and "sweep job 0 (" in other.stderr
    assert done.read_bytes() == before


def test_optuna_preset_tunes_on_the_validation_split(tmp_path):
    proc = clbench("run", "-m", "hydra/sweeper=tune", "experiment=smoke", "hydra.sweeper.n_trials=3",
                   "train.lr=tag(log, interval(0.01, 0.3))", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert len(trials) == 3
    assert all(t["eval_split"] == "val" and t["config"]["dataset"]["val_fraction"] == 0.2 for t in trials)
    assert len({t["config"]["train"]["lr"] for t in trials}) == 3
    best = (tmp_path / "optimization_results.yaml").read_text()
    best_value = float(best.split("best_value:")[1].split()[0])
    assert best_value == pytest.approx(max(t["metrics"]["acc"] for t in trials))


def test_slurm_preset_exposes_cluster_keys():
    proc = clbench("run", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                   "hydra.launcher.array_parallelism=8", "--cfg", "hydra", "-p", "hydra.launcher")
    assert proc.returncode == 0, proc.stderr
    for line in ("partition: gpu", "gpus_per_node: 2", "array_parallelism: 8", "timeout_min: 120",
                 "mem_gb: 16", "max_num_timeout: 3", "SlurmLauncher"):
        assert line in proc.stdout, line


def test_a_joblib_sweep_stops_its_workers_when_it_returns(tmp_path, monkeypatch):
    """joblib's reusable loky executor would otherwise outlive the sweep and be shut down at
    interpreter exit, waiting on each idle worker (seconds after every result is written)."""
    import cl_bench.cli as cli
    from cl_bench.cli import launch

    seen = {}
    original = cli._release_sweep_workers

    def spy() -> None:
        loky = sys.modules.get("joblib.externals.loky.reusable_executor")
        executor = getattr(loky, "_executor", None) if loky is not None else None
        seen["workers"] = list(getattr(executor, "_processes", {}).values()) if executor is not None else []
        original()

    monkeypatch.setattr(cli, "_release_sweep_workers", spy)
    summaries = launch(["-m", "experiment=smoke", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert len(list((tmp_path / "sweep").glob("*/metrics.json"))) == 2
    assert seen["workers"], "the sweep ran in joblib workers"
    assert not any(p.is_alive() for p in seen["workers"])
    del summaries


def test_hydra_does_not_compose_again_the_jobs_the_sweep_check_composed(monkeypatch):
    """`check_sweep_jobs` composes every job of a small sweep; Hydra's basic sweeper then skips
    its own composition of exactly those jobs, and still composes any other (an override the
    sweeper adds, or jobs of a sweep too large to check each one)."""
    from hydra.plugins.sweeper import Sweeper

    from cl_bench.sweep import _MAX_CHECKED_COMBINATIONS, check_sweep_jobs, skip_checked_jobs

    problem, checked = check_sweep_jobs(["-m", "experiment=smoke", "strategy=finetune,joint", "seed=0,1",
                                         "progress=false", "hydra.sweep.dir=x"])
    assert problem is None
    # as the sweeper writes each job's overrides: values normalised, no hydra.* override
    assert checked == {frozenset({"experiment=smoke", f"strategy={s}", f"seed={n}", "progress=False"})
                       for s in ("finetune", "joint") for n in (0, 1)}
    composed = []
    monkeypatch.setattr(Sweeper, "validate_batch_is_legal", lambda self, batch: composed.extend(batch))
    original = Sweeper.validate_batch_is_legal
    with skip_checked_jobs(checked):
        Sweeper.validate_batch_is_legal(None, [["experiment=smoke", "seed=1", "strategy=joint", "progress=False"],
                                               ["experiment=smoke", "seed=2", "strategy=joint", "progress=False"]])
    assert composed == [["experiment=smoke", "seed=2", "strategy=joint", "progress=False"]]
    assert Sweeper.validate_batch_is_legal is original  # restored
    # a failing job or a sampled check leaves every job to Hydra's composition
    assert check_sweep_jobs(["-m", "experiment=smoke", "train.lr=0.1,abc"])[1] == frozenset()
    many = ",".join(str(i) for i in range(_MAX_CHECKED_COMBINATIONS + 1))
    assert check_sweep_jobs(["-m", "experiment=smoke", f"seed={many}"]) == (None, frozenset())
