"""No silent failure: a run that cannot produce a correct number fails loudly.

A diverged run (a non-finite or exploding loss, non-finite weights) or a bad training
value stops with one line, a non-zero exit and `failed.json`; it never writes result
files, and `clbench report` never averages it. A sweep (Optuna) goes on past it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cl_bench import CLBenchError
from cl_bench.runner import DivergenceError, Runner, nonfinite_tensors
from tests.conftest import compose_cfg
from tests.test_cli import clbench

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RESULT_FILES = ("metrics.json", "results.md", "accuracy_matrix.csv", "accuracy_matrix_task_aware.csv")


def assert_failed_cleanly(proc, folder, *phrases: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("clbench: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    record = json.loads((folder / "failed.json").read_text())
    assert record["status"] == "failed"
    assert not any((folder / name).exists() for name in RESULT_FILES)


def test_exploding_learning_rate_fails_the_run_in_one_line(tmp_path):
    folder = tmp_path / "run"
    proc = clbench("run", "train.lr=1e9", "progress=false", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert_failed_cleanly(proc, folder, "diverged in task 0, epoch 0", "train.lr")
    assert json.loads((folder / "failed.json").read_text())["error_type"] == "DivergenceError"


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("train.lr=nan", "train.lr must be a positive finite number"),
        ("train.lr=inf", "train.lr must be a positive finite number"),
        ("train.lr=-0.1", "train.lr must be a positive finite number"),
        ("train.momentum=-0.9", "train.momentum must be in [0, 1)"),
        ("train.momentum=1.5", "train.momentum must be in [0, 1)"),
        ("train.weight_decay=-1e-4", "train.weight_decay must be a finite number >= 0"),
        ("train.weight_decay=nan", "train.weight_decay must be a finite number >= 0"),
        ("train.max_loss=-1", "train.max_loss must be >= 0"),
        ("seed=-1", "seed must be in [0, 2**32 - 1]"),
        ("seed=4294967296", "seed must be in [0, 2**32 - 1]"),
    ],
)
def test_bad_training_values_are_refused_before_training(override, phrase, tmp_path):
    with pytest.raises(CLBenchError, match=None) as info:
        Runner(compose_cfg(override), tmp_path / "run").run()
    assert phrase in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _poison_after_task(monkeypatch, strategy_cls, task_id: int, value: float) -> None:
    original = strategy_cls.after_task

    def after_task(self, task):
        original(self, task)
        if task.id == task_id:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = value

    monkeypatch.setattr(strategy_cls, "after_task", after_task)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_after_a_consolidation_fail_the_run(value, tmp_path, monkeypatch):
    from cl_bench.strategies.base import Strategy

    _poison_after_task(monkeypatch, Strategy, 1, value)
    with pytest.raises(DivergenceError, match="task 1, after the task") as info:
        Runner(compose_cfg("experiment=smoke"), tmp_path / "run").run()
    assert "weight tensor(s) are not finite" in str(info.value)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_nan_step_is_caught_at_the_end_of_its_epoch(tmp_path, monkeypatch):
    """One NaN loss among many finite ones makes the epoch's device-side sum NaN."""
    from cl_bench.strategies.base import Strategy

    original, calls = Strategy.train_step, []

    def train_step(self, batch):
        out = original(self, batch)
        calls.append(1)
        if len(calls) == 1:  # the first of task 0's two steps (smoke protocol); the second is finite
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(Strategy, "train_step", train_step)
    with pytest.raises(DivergenceError, match="task 0, epoch 0: the training loss is nan"):
        Runner(compose_cfg("experiment=smoke"), tmp_path / "run").run()


def test_a_finite_blow_up_above_max_loss_fails_and_the_bound_can_be_lifted(tmp_path, monkeypatch):
    from cl_bench.strategies.base import Strategy

    original = Strategy.train_step

    def train_step(self, batch):
        out = original(self, batch)
        return {**out, "loss": out["loss"] + 1e8}  # finite, but no classifier has this loss

    monkeypatch.setattr(Strategy, "train_step", train_step)
    with pytest.raises(DivergenceError, match=r"above train.max_loss=1e\+06"):
        Runner(compose_cfg("experiment=smoke"), tmp_path / "a").run()
    summary = Runner(compose_cfg("experiment=smoke", "train.max_loss=0"), tmp_path / "b").run()
    assert summary["status"] == "completed"


def test_nonfinite_tensors_names_parameters_and_buffers():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    assert nonfinite_tensors(net) == []
    with torch.no_grad():
        net[0].bias[1] = float("inf")
    net[1].running_var[0] = float("nan")
    assert nonfinite_tensors(net) == ["0.bias", "1.running_var"]


def test_nonfinite_tensors_is_not_fooled_by_a_sum_that_overflows_or_by_low_precision():
    """The all-finite fast path sums each tensor: huge finite weights whose sum overflows
    are still finite, and a NaN in a bfloat16 or float16 tensor is still found."""
    net = torch.nn.Linear(4, 2)
    with torch.no_grad():
        net.weight.fill_(3e38)  # finite; the float32 sum is inf
    assert nonfinite_tensors(net) == []
    net.weight.data[0, 1] = float("-inf")
    assert nonfinite_tensors(net) == ["weight"]
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        low = torch.nn.Linear(4, 2).to(dtype)
        assert nonfinite_tensors(low) == []
        with torch.no_grad():
            low.bias[0] = float("nan")
        assert nonfinite_tensors(low) == ["bias"], dtype


def test_strategy_warnings_are_logged_once_and_kept_in_metrics(tmp_path, monkeypatch):
    from cl_bench.strategies.base import Strategy

    original = Strategy.after_task

    def after_task(self, task):
        original(self, task)
        self.warn("the same warning every task")

    monkeypatch.setattr(Strategy, "after_task", after_task)
    printed = []

    class Console:
        def print(self, message, **kwargs):
            printed.append(str(message))

    summary = Runner(compose_cfg("experiment=smoke"), tmp_path / "run", console=Console()).run()
    assert summary["warnings"] == ["the same warning every task"]
    assert sum("the same warning every task" in line for line in printed) == 1
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["warnings"] == ["the same warning every task"]


def test_report_never_averages_a_diverged_or_nonfinite_run(tmp_path):
    from cl_bench.report import read_run

    ok = clbench("run", "experiment=smoke", "progress=false", f"hydra.run.dir={tmp_path / 'ok'}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bad = clbench("run", "experiment=smoke", "train.lr=1e9", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode != 0
    assert read_run(tmp_path / "ok").status == "completed"
    assert read_run(tmp_path / "bad").status == "failed"
    # A metrics.json with a NaN matrix (an older version's diverged run) is not averaged either.
    forged = tmp_path / "forged"
    forged.mkdir()
    summary = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    summary["accuracy_matrix"][0][0] = float("nan")
    (forged / "metrics.json").write_text(json.dumps(summary))
    record = read_run(forged)
    assert record.status == "failed" and "non-finite" in record.reason
    proc = clbench("report", str(tmp_path), "--no-plots", "--format", "csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "report" / "report.csv")
    assert table["n"].tolist() == [1]  # only the good run is averaged
    assert np.isfinite(table["acc_mean"]).all()


def test_optuna_study_survives_diverging_trials(tmp_path):
    """Trials with a diverging learning rate are told to Optuna as failed; the study goes on."""
    proc = clbench(
        "run", "-m", "hydra/sweeper=tune", "experiment=smoke", "hydra.sweeper.n_trials=4",
        "train.lr=choice(1e9, 0.05)", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = sorted(tmp_path.glob("*/failed.json"))
    done = sorted(tmp_path.glob("*/metrics.json"))
    assert failed and done and len(failed) + len(done) == 4
    assert all(json.loads(p.read_text())["error_type"] == "DivergenceError" for p in failed)
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "train.lr: 0.05" in best
