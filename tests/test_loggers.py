"""Experiment loggers (`logger=[csv,tensorboard,wandb,mlflow]`), clbench.log and the sweep's one
line per run. Every logger is read back with its own library, offline; nothing is mocked."""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL = "logger=[csv,tensorboard,wandb,mlflow]"
# 5 tasks of 40 samples, batches of 8, 2 epochs: 10 optimizer steps per task, 50 in all
TINY = ("experiment=smoke", "train.batch_size=8", "train.epochs=2")


def clbench(*args: str, cwd, prelude: str = "pass") -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    code = f"import sys; {prelude}; from cl_bench.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def task_end_steps(summary: dict) -> list[int]:
    ends, total = [], 0
    for log in summary["train_log"]:
        total += log["steps"]
        ends.append(total)
    return ends


# ----- reading W&B's offline run file (its transaction log: LevelDB log records of protobufs) -------
def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, parts = 32768, 7, b""  # 7: the W&B header (ident, magic, version)
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a record header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            pos += block - pos % block if pos % block else 0
            continue
        parts = chunk if kind in (1, 2) else parts + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_history(folder: Path) -> tuple[list[dict], dict, dict]:
    """(history rows, final summary, config) of the offline run(s) in `folder`/wandb."""
    rows, summary, config = [], {}, {}
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            elif kind == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "run":
                for item in record.run.config.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return rows, summary, config


# ----- one run with all four -------------------------------------------------------------------
@pytest.fixture(scope="module")
def all_four(tmp_path_factory):
    from cl_bench.runner import Runner

    folder = tmp_path_factory.mktemp("loggers") / "run"
    summary = Runner(compose_cfg(*TINY, ALL), folder).run()
    return folder, summary


def test_csv_holds_every_step_and_every_evaluation(all_four):
    folder, summary = all_four
    steps = read_csv(folder / "steps.csv")
    n = sum(log["steps"] for log in summary["train_log"])
    assert n == 50 and [int(r["step"]) for r in steps] == list(range(1, n + 1))
    assert {float(r["lr"]) for r in steps} == {0.05}
    for t, log in enumerate(summary["train_log"]):
        losses = [float(r["loss"]) for r in steps if int(r["task"]) == t]
        assert {int(r["epoch"]) for r in steps if int(r["task"]) == t} == {0, 1}
        assert math.isclose(sum(losses) / len(losses), log["mean_loss"], rel_tol=1e-5)
    evals = read_csv(folder / "evals.csv")
    R, R_aware, ends = summary["accuracy_matrix"], summary["accuracy_matrix_task_aware"], task_end_steps(summary)
    assert len(evals) == 25
    for r in evals:
        i, j = int(r["after_task"]), int(r["task"])
        assert int(r["step"]) == ends[i]
        assert float(r["acc"]) == R[i][j] and float(r["acc_task_aware"]) == R_aware[i][j]


def test_tensorboard_event_files_read_back(all_four):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, summary = all_four
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    steps = read_csv(folder / "steps.csv")
    assert [e.step for e in loss] == list(range(1, 51))
    assert all(math.isclose(e.value, float(r["loss"]), rel_tol=1e-6) for e, r in zip(loss, steps))
    ends = task_end_steps(summary)
    for i, row in enumerate(summary["accuracy_matrix"]):
        for j, acc in enumerate(row):
            (event,) = [e for e in events.Scalars(f"eval/acc/task_{j}") if e.step == ends[i]]
            assert math.isclose(event.value, acc, rel_tol=1e-6, abs_tol=1e-7)
    for key in ("acc", "bwt", "forgetting", "avg_inc_acc"):
        (event,) = events.Scalars(f"final/{key}")
        assert math.isclose(event.value, summary["metrics"][key], rel_tol=1e-6, abs_tol=1e-7)
    (lr,) = [e.value for e in events.Scalars("train/lr")][:1]
    assert math.isclose(lr, 0.05, rel_tol=1e-6)
    assert "time/total_s" in events.Tags()["scalars"] and "memory/peak_bytes" in events.Tags()["scalars"]
    hparams = events.PluginTagToContent("hparams")  # the config, flattened, in the HParams tab
    assert "_hparams_/session_start_info" in hparams and b"train.lr" in hparams["_hparams_/session_start_info"]


def test_wandb_offline_run_reads_back(all_four):
    folder, summary = all_four
    rows, final, config = wandb_history(folder)
    losses = [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in losses] == list(range(1, 51))
    steps = read_csv(folder / "steps.csv")
    assert all(math.isclose(v, float(r["loss"]), rel_tol=1e-9) for (_, v), r in zip(losses, steps))
    ends = task_end_steps(summary)
    for i, row in enumerate(summary["accuracy_matrix"]):
        (logged,) = [r for r in rows if r.get("_step") == ends[i] and "eval/acc/task_0" in r]
        assert [logged[f"eval/acc/task_{j}"] for j in range(len(row))] == row
    for key in ("acc", "bwt", "forgetting"):
        assert final[f"final/{key}"] == summary["metrics"][key]
    assert config["train.lr"] == 0.05 and config["strategy._target_"].endswith("Finetune")
    assert json.loads((folder / "loggers.json").read_text())["wandb_id"] in str(next(folder.glob("wandb/offline-run-*")))


def test_mlflow_local_store_reads_back(all_four):
    from mlflow.tracking import MlflowClient

    folder, summary = all_four
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    run = client.get_run(json.loads((folder / "loggers.json").read_text())["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "finetune split_digits seed=0 (run)"
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 51))
    ends = task_end_steps(summary)
    for j in range(len(summary["accuracy_matrix"])):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"eval/acc/task_{j}")}
        assert [logged[e] for e in ends] == [row[j] for row in summary["accuracy_matrix"]]
    for key in ("acc", "bwt", "forgetting"):
        assert run.data.metrics[f"final/{key}"] == summary["metrics"][key]
    assert run.data.params["train.lr"] == "0.05" and run.data.params["seed"] == "0"
    assert not (Path.cwd() / "mlruns").exists() and not (Path.cwd() / "mlartifacts").exists()


# ----- resume ------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def test_kill_and_resume_logs_each_step_once(tmp_path):
    """Killed in task 1 after an epoch's rows were written past the last mid-task checkpoint:
    the resumed run drops them and logs the steps again, once, with the uninterrupted run's values."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cl_bench.runner import CHECKPOINT, Runner

    overrides = (*TINY, "train.epochs=3", "checkpoint_every=7steps", "logger=[csv,tensorboard,mlflow]")
    reference = Runner(compose_cfg(*overrides), tmp_path / "reference").run()

    class DiesAt(Runner):
        def build(self):
            super().build()
            step, count = self.strategy.train_step, [0]

            def dying(batch):
                count[0] += batch.task.id == 1
                if count[0] == 12:  # task 1: saved after its 7th step, rows of steps 8-10 written at epoch 1's end
                    raise Killed()
                return step(batch)

            self.strategy.train_step = dying

    folder = tmp_path / "killed"
    with pytest.raises(Killed):
        DiesAt(compose_cfg(*overrides), folder).run()
    steps_before = [int(r["step"]) for r in read_csv(folder / "steps.csv")]
    assert steps_before == list(range(1, 26))  # 15 of task 0, 10 of task 1 (the checkpoint: step 22)
    assert (folder / CHECKPOINT).exists()
    resumed = Runner(compose_cfg(*overrides), folder).run()
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    n = sum(log["steps"] for log in reference["train_log"])
    for name in ("steps.csv", "evals.csv", "scalars.csv"):
        got, want = read_csv(folder / name), read_csv(tmp_path / "reference" / name)
        if name == "scalars.csv":  # times differ between runs; the resumed epoch logs its learning rate again
            assert len({(r["step"], r["name"]) for r in got}) == len(got)
            got, want = ([(r["step"], r["name"]) for r in rows if r["name"] != "train/lr"] for rows in (got, want))
        assert got == want, name
    assert [int(r["step"]) for r in read_csv(folder / "steps.csv")] == list(range(1, n + 1))

    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, n + 1))
    assert [e.step for e in events.Scalars("eval/acc/task_0")] == task_end_steps(reference)

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    run_id = json.loads((folder / "loggers.json").read_text())["mlflow_run_id"]
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, n + 1))
    assert client.get_run(run_id).info.status == "FINISHED"


# ----- a missing library ---------------------------------------------------------------------------
@pytest.mark.parametrize("library", ["wandb", "mlflow", "tensorboard"])
def test_a_missing_library_is_one_line_before_anything_is_written(tmp_path, library):
    out = tmp_path / "run"
    proc = clbench("run", "experiment=smoke", f"logger=[csv,{library}]", f"hydra.run.dir={out}",
                   cwd=tmp_path, prelude=f"sys.modules[{library!r}] = None")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"clbench: error: logger={library} needs the {library} package: "
                     f"pip install 'clbench[{library}]'"], proc.stderr
    assert not out.exists()


def test_logger_options_are_checked_and_none_is_allowed(tmp_path):
    bad = clbench("run", "experiment=smoke", "logger=[wandb]", "logger.wandb.mode=sometimes",
                  f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and "logger.wandb.mode must be offline, online or disabled" in bad.stderr
    assert not (tmp_path / "bad").exists()
    unknown = clbench("run", "experiment=smoke", "logger=[csv,tensorbored]", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown logger 'tensorbored'" in unknown.stderr
    none = clbench("run", "experiment=smoke", "logger=[]", f"hydra.run.dir={tmp_path / 'none'}", cwd=tmp_path)
    assert none.returncode == 0, none.stderr
    assert not (tmp_path / "none" / "steps.csv").exists() and (tmp_path / "none" / "metrics.json").exists()


# ----- clbench.log ----------------------------------------------------------------------------------
def test_clbench_log_holds_what_the_console_showed(tmp_path):
    out = tmp_path / "run"
    first = clbench("run", *TINY, "strategy=ewc", "strategy.ewc_lambda=1e5", "progress=true", f"hydra.run.dir={out}",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    log = (out / "clbench.log").read_text(encoding="utf-8")
    assert "Accuracy matrix" in log and "BWT (backward transfer)" in log
    assert "task 4" in log and "10/10" in log  # the progress display's final state
    assert "clbench: warning: EWC" in log and "clbench: warning: EWC" in first.stderr
    assert "\x1b[" not in log  # no colours, no progress-display redraws

    (out / "metrics.json").unlink()  # the checkpoint holds every task: the rerun resumes and reports
    again = clbench("run", *TINY, "strategy=ewc", "strategy.ewc_lambda=1e5", f"hydra.run.dir={out}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    log2 = (out / "clbench.log").read_text(encoding="utf-8")
    assert log2.startswith(log) and "resuming from" in log2[len(log):]  # appended

    refused = clbench("run", *TINY, "strategy=ewc", "seed=1", f"hydra.run.dir={out}", cwd=tmp_path)
    assert refused.returncode == 2
    assert (out / "clbench.log").read_text(encoding="utf-8") == log2  # a refused run writes nothing

    failed = clbench("run", *TINY, "train.max_loss=0.5", "resume=false", f"hydra.run.dir={out}", cwd=tmp_path)
    assert failed.returncode == 2
    error = [ln for ln in failed.stderr.splitlines() if ln.startswith("clbench: error:")]
    log3 = (out / "clbench.log").read_text(encoding="utf-8")
    assert error and error[0] in log3 and "resuming from" not in log3  # resume=false starts the log over


# ----- sweeps ---------------------------------------------------------------------------------------
def test_a_sweep_prints_one_line_per_run_and_suggests_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = clbench("run", "-m", "experiment=smoke", "strategy=finetune,joint", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Accuracy matrix" not in proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[job ")]
    assert len(lines) == 2
    for job, (line, strategy) in enumerate(zip(lines, ["finetune", "joint"])):
        summary = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert line.startswith(f"[job {job}] experiment=smoke strategy={strategy}: ")
        assert f"acc {100 * summary['metrics']['acc']:.2f}%" in line
        assert f"forgetting {100 * summary['metrics']['forgetting']:.2f}%" in line
        assert line.endswith(f" s -> {sweep / str(job)}")
        assert line in (sweep / str(job) / "clbench.log").read_text()
    assert f"clbench report {sweep}" in proc.stderr


def test_the_loggers_can_change_between_a_run_and_its_resume():
    """Loggers do not change results: a checkpoint or finished results of the same run with other
    loggers are the same config (resume, skip-if-done)."""
    from cl_bench.runner import config_fingerprint

    assert config_fingerprint(compose_cfg("logger=[]")) == config_fingerprint(compose_cfg(ALL))
    assert config_fingerprint(compose_cfg("seed=1")) != config_fingerprint(compose_cfg())


def test_a_per_step_learning_rate_reaches_every_step(tmp_path):
    """A warm-up changes the lr every step, logged before the step runs while its loss arrives at the
    epoch's end: the CSV rows carry each step's lr and W&B still receives every step, in order."""
    from cl_bench.runner import Runner

    folder = tmp_path / "run"
    Runner(compose_cfg(*TINY, "train.warmup_epochs=1", "logger=[csv,wandb]"), folder).run()
    steps = read_csv(folder / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 51))
    warm = [0.05 * (k + 1) / 5 for k in range(5)] + [0.05] * 5  # one epoch of 5 steps, per task
    assert all(math.isclose(float(r["lr"]), warm[i % 10]) for i, r in enumerate(steps))
    rows, _, _ = wandb_history(folder)
    assert [r["_step"] for r in rows if "train/loss" in r] == list(range(1, 51))
    lrs = {r["_step"]: r["train/lr"] for r in rows if "train/lr" in r}
    assert all(math.isclose(lrs[s], warm[s - 1]) for s in range(1, 6))
