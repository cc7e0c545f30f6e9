"""Run-folder integrity, with real processes: one run per folder (an OS lock that dies with
its process), unique default folders, refused runs that leave the folder byte-identical,
no silent overwrite of finished results, temporary files cleaned, the umask respected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_bad_inputs import SMOKE, assert_one_line, snapshot
from tests.test_cli import clbench

# Long enough (minutes) to be still running while the test looks at it; the test kills it.
LONG = ("dataset.max_train_per_class=null", "train.epochs=1000")
RESULTS = ("metrics.json", "results.md", "accuracy_matrix.csv", "accuracy_matrix_task_aware.csv")


def start(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "cl_bench.cli", "run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        time.sleep(0.05)


def lock_holder(folder: Path) -> str:
    try:
        return (folder / ".clbench.lock").read_text().strip()
    except OSError:
        return ""


def test_a_second_run_on_a_busy_folder_stops_before_writing(tmp_path):
    folder = tmp_path / "run"
    slow = start(*SMOKE, *LONG, f"hydra.run.dir={folder}", cwd=tmp_path)
    try:
        wait_for(lambda: lock_holder(folder) == str(slow.pid), slow, "it claimed the folder")
        before = snapshot(folder)
        other = clbench("run", *SMOKE, "seed=5", f"hydra.run.dir={folder}", cwd=tmp_path)
        assert_one_line(other, str(folder), "in use by another clbench run", f"pid {slow.pid}")
        after = snapshot(folder)
        # The first run keeps writing its checkpoint; the record of its config is its own.
        assert {k: v for k, v in after.items() if k.startswith(".hydra")} == \
               {k: v for k, v in before.items() if k.startswith(".hydra")}
        assert "seed: 5" not in (folder / ".hydra" / "config.yaml").read_text()
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait()
    # A killed run leaves no stale lock: the folder is usable at once.
    again = clbench("run", *SMOKE, f"hydra.run.dir={folder}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (folder / "metrics.json").exists()


def test_runs_started_together_get_their_own_default_folders(tmp_path):
    procs = [start(*SMOKE, f"seed={s}", cwd=tmp_path) for s in (0, 1, 2)]
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err[-2000:]
    folders = sorted(tmp_path.glob("outputs/*/*"))
    assert len(folders) == 3
    seeds = sorted(json.loads((f / "metrics.json").read_text())["seed"] for f in folders)
    assert seeds == [0, 1, 2]
    for f in folders:
        assert not (f / "failed.json").exists()
        assert f"seed: {json.loads((f / 'metrics.json').read_text())['seed']}" in (f / ".hydra" / "config.yaml").read_text()


@pytest.fixture
def killed_run(tmp_path) -> Path:
    """A run killed after its last checkpoint but before its results (resumable)."""
    folder = tmp_path / "run"
    proc = clbench("run", *SMOKE, f"hydra.run.dir={folder}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in RESULTS:
        (folder / name).unlink()
    return folder


def test_a_refused_resume_leaves_the_killed_runs_folder_byte_identical(killed_run, tmp_path):
    before = snapshot(killed_run)
    proc = clbench("run", *SMOKE, "train.lr=0.2", f"hydra.run.dir={killed_run}", cwd=tmp_path)
    assert_one_line(proc, "made with a different config", "resume=false")
    assert snapshot(killed_run) == before  # .hydra/config.yaml and overrides.yaml still say how to resume
    assert not (killed_run / "failed.json").exists()
    resumed = clbench("run", *SMOKE, f"hydra.run.dir={killed_run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (killed_run / "metrics.json").exists()


def test_temporary_files_of_a_killed_write_are_removed_on_the_next_start(killed_run, tmp_path):
    leftovers = [killed_run / ".metrics.json.k2j3.tmp", killed_run / ".checkpoint.pt.x9.tmp",
                 killed_run / ".hydra" / ".config.yaml.ab.tmp"]
    for tmp in leftovers:
        tmp.write_bytes(b"half")
    proc = clbench("run", *SMOKE, f"hydra.run.dir={killed_run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(t.exists() for t in leftovers)
    assert not list(killed_run.rglob("*.tmp"))


def test_results_without_a_checkpoint_are_never_silently_overwritten(tmp_path):
    folder = tmp_path / "run"
    first = clbench("run", *SMOKE, "checkpoint=false", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert not (folder / "checkpoint.pt").exists()
    before = snapshot(folder)
    other = clbench("run", *SMOKE, "checkpoint=false", "seed=3", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert_one_line(other, "already holds results of a different config", "resume=false")
    assert snapshot(folder) == before
    same = clbench("run", *SMOKE, "checkpoint=false", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert same.returncode == 0 and "already holds complete results" in same.stderr
    assert snapshot(folder) == before
    over = clbench("run", *SMOKE, "checkpoint=false", "seed=3", "resume=false", f"hydra.run.dir={folder}",
                   cwd=tmp_path)
    assert over.returncode == 0, over.stderr[-2000:]
    assert json.loads((folder / "metrics.json").read_text())["seed"] == 3
    assert "seed: 3" in (folder / ".hydra" / "config.yaml").read_text()


def test_starting_over_removes_the_earlier_runs_logs(tmp_path):
    """resume=false: no file of the earlier run survives, the logs of loggers now off included."""
    folder = tmp_path / "run"
    first = clbench("run", *SMOKE, "logger=[csv,tensorboard]", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (folder / "tensorboard").is_dir() and (folder / "steps.csv").is_file()
    over = clbench("run", *SMOKE, "logger=[]", "seed=3", "resume=false", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert over.returncode == 0, over.stderr[-2000:]
    assert not (folder / "tensorboard").exists() and not (folder / "steps.csv").exists()
    assert json.loads((folder / "metrics.json").read_text())["seed"] == 3


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_result_files_follow_the_umask(umask, tmp_path):
    folder = tmp_path / "run"
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "cl_bench.cli", "run", *SMOKE, f"hydra.run.dir={folder}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True,
                          preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (*RESULTS, "checkpoint.pt", ".hydra/config.yaml"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
