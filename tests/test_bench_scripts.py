"""The benchmark scripts run (tiny sizes, on the CPU); they measure speed, these tests only
check that they do the work they claim and print their table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cl_bench.cli", "script", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_bench_gpu_runs_tiny_on_the_cpu(tmp_path):
    done = script("bench_gpu", "--device", "cpu", "--per-class", "8", "--test-per-class", "4", "--repeats", "1",
                  "--root", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Split CIFAR-10 (80 training images, 5 tasks) / ResNet-18" in done.stdout
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if re.match(r"^(32|bf16)\s", line)}
    assert set(rows) == {"32", "bf16"}
    for row in rows.values():
        bare, ours, train_ratio, all_ratio = (float(v) for v in row[1:5])
        assert bare > 0 and ours > 0 and train_ratio > 0 and all_ratio > 0
    # the files it wrote are CIFAR-10's python batches
    assert sorted(p.name for p in (tmp_path / "data" / "cifar-10-batches-py").iterdir()) == [
        "batches.meta", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def test_bench_all_prints_a_row_per_strategy(tmp_path):
    done = script("bench_all", "--strategies", "finetune,er,packnet", "--repeats", "1", "train.epochs=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    table = {cells[0].strip(): cells for cells in rows[1:]}
    assert list(table) == ["bare PyTorch loop", "finetune", "er", "packnet"]
    assert [table[n][1].strip() for n in ("finetune", "er", "packnet")] == ["class_il", "class_il", "task_il"]
    # 5 tasks x ceil(~250 samples / 32) steps, 1 epoch each; both strategies take the same steps
    assert table["finetune"][2].strip() == table["er"][2].strip() and int(table["finetune"][2]) > 0
    assert float(table["finetune"][5]) == 1.0


def test_bench_data_path_measures_in_fresh_processes(tmp_path):
    done = script("bench_data_path", "--processes", "2", "--repeats", "1", "train.epochs=1", "device.num_threads=1",
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    runs = [dict(re.findall(r"(train\+eval|train|eval) ([0-9.]+)", line)) for line in lines if line.startswith("process")]
    assert len(runs) == 2 and all(set(r) == {"train", "eval", "train+eval"} for r in runs)
    assert all(float(v) > 0 for r in runs for v in r.values())
    median = [line for line in lines if line.startswith("median of 2 processes")]
    assert len(median) == 1
    # the median of two is their mean (each printed to 3 decimals)
    printed = float(re.search(r"train\+eval ([0-9.]+);", median[0]).group(1))
    assert abs(printed - (float(runs[0]["train+eval"]) + float(runs[1]["train+eval"])) / 2) <= 0.0011


def test_bench_peer_says_how_to_get_the_peer(tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("avalanche") is not None:
        pytest.skip("Avalanche is installed here: the comparison would run in full")
    done = script("bench_peer", "--strategies", "finetune", cwd=tmp_path)
    assert done.returncode != 0
    assert "pip install avalanche-lib" in done.stderr and "Traceback" not in done.stderr


def test_a_scripts_refusal_reaches_the_user(tmp_path):
    """A script that stops with SystemExit("message") under `clbench script` prints the message
    and exits 1 (it used to exit 1 in silence)."""
    done = script("bench_data_path", "train.momentum=0.9", cwd=tmp_path)
    assert done.returncode == 1
    assert "the bare loop is plain SGD" in done.stderr and "Traceback" not in done.stderr
