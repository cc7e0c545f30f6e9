"""The `clbench` command as a user runs it: a subprocess, from a directory outside the repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


def clbench(*args: str, cwd, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "cl_bench.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_smoke_run_writes_results_and_prints_tables(tmp_path):
    out = tmp_path / "run"
    proc = clbench("run", "experiment=smoke", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Accuracy matrix" in proc.stdout and "BWT" in proc.stdout
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_tasks"] == 5 and summary["strategy"] == "finetune"
    assert (out / "accuracy_matrix.csv").exists() and (out / "results.md").exists()
    assert (out / ".hydra" / "config.yaml").exists()


def test_rerun_on_a_finished_folder_reports_without_retraining(tmp_path):
    out = tmp_path / "run"
    first = clbench("run", "experiment=smoke", f"hydra.run.dir={out}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = clbench("run", "experiment=smoke", f"hydra.run.dir={out}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already holds complete results of this config" in again.stderr
    assert "Accuracy matrix" in again.stdout  # the stored results are shown again
    # Nothing retrained or rewritten: the timing stays that of the run that did the work.
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files


def test_multirun_sweeps_a_comma_list(tmp_path):
    proc = clbench(
        "run", "-m", "experiment=smoke", "strategy=finetune,joint", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert [json.loads(p.read_text())["strategy"] for p in runs] == ["finetune", "joint"]


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = clbench("run", "strategy=joint", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "cl_bench.strategies.joint.Joint" in proc.stdout and "scenario: class_il" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_help_lists_config_groups(tmp_path):
    proc = clbench("run", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    strategy_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("strategy:"))
    assert "finetune" in strategy_line and "joint" in strategy_line
    assert "dataset:" in proc.stdout and "device: auto, cpu, cuda" in proc.stdout


def test_list_shows_groups_from_the_config_tree(tmp_path):
    proc = clbench("list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("split_digits", "mlp", "finetune", "joint", "cuda", "smoke"):
        assert name in proc.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy=nope", "unknown strategy 'nope'; choose one of: agem,"),
        ("dataset=nope", "unknown dataset 'nope'; choose one of:"),
        ("backbone=mlp,nope", "unknown backbone 'nope'"),
        ("seed=abc", "seed"),
        ("train.epochs=0", "train.epochs must be at least 1"),
        ("strategy.lamda=1", "lamda"),
        ("+strategy.lamda=1", "unknown key strategy.lamda"),
        ("dataset.num_tasks=3", "does not divide"),
    ],
)
def test_errors_exit_nonzero_with_one_clear_message(tmp_path, override, message):
    out = tmp_path / "run"
    proc = clbench("run", override, "experiment=smoke", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr
    if "unknown" in message:
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert not (out / "metrics.json").exists() and not (out / "accuracy_matrix.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    proc = clbench("run", "device=cuda", "experiment=smoke", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr and "device=cpu" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "metrics.json").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = clbench("--debug", "run", "train.epochs=0", "experiment=smoke", f"hydra.run.dir={tmp_path/'r'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "train.epochs must be at least 1" in proc.stderr


def test_unknown_command(tmp_path):
    proc = clbench("fly", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_results_are_named_after_the_target_that_ran(tmp_path):
    out = tmp_path / "run"
    proc = clbench("run", "experiment=smoke", "progress=false", "strategy._target_=cl_bench.strategies.joint.Joint",
                   f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["strategy"] == "cl_bench.strategies.joint.Joint"  # not "finetune", the shipped option
    assert summary["dataset"] == "split_digits" and summary["backbone"] == "mlp"
    assert (out / "results.md").read_text().startswith("# cl_bench.strategies.joint.Joint on split_digits")


def test_the_command_exits_fast_after_running_the_atexit_handlers_and_flushing_its_output(tmp_path):
    """`exit_now` skips the interpreter's teardown but keeps what a normal exit leaves behind:
    atexit handlers run, buffered stdout is written, the exit code is kept; with another
    non-daemon thread still running it exits normally (the thread finishes first)."""
    def python(*lines: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "; ".join(["from cl_bench.cli import exit_now", *lines])],
                              capture_output=True, text=True)

    mark, done = tmp_path / "atexit.txt", tmp_path / "thread.txt"
    proc = python("import atexit, sys", f"atexit.register(lambda: open({str(mark)!r}, 'w').write('ran'))",
                  "sys.stdout.write('buffered')", "exit_now(3)")
    assert (proc.returncode, proc.stdout, mark.read_text()) == (3, "buffered", "ran")
    proc = python("import threading, time",
                  f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(done)!r}, 'w').write('done'))).start()",
                  "exit_now(0)")
    assert proc.returncode == 0 and done.read_text() == "done"
