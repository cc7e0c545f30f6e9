"""Every bad input ends in one line: a non-zero exit, a message naming the culprit, no
traceback, and a run folder exactly as it was (or, for a new folder, no folder at all).

`BAD_RUNS` is the one table of bad `clbench run` inputs: adding a case is one line.
Each runs as its own process against a copy of a finished run's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from tests.test_cli import clbench

SMOKE = ("experiment=smoke", "progress=false", "device.num_threads=1")

# (arguments after `clbench run`, phrases the one line must contain)
BAD_RUNS = [
    # Hydra's composition errors, condensed
    (["train.lr=abc"], ["bad value for train.lr", "abc"]),
    (["train.lrr=0.1"], ["unknown key train.lrr", "valid keys", "lr"]),
    (["+train.epoch=3"], ["unknown key train.epoch", "epochs"]),
    (["+foo=1"], ["unknown key foo"]),
    (["strategy=ewc", "strategy.lamda=1"], ["unknown key strategy.lamda", "ewc_lambda"]),
    (["strategy=ewc", "+strategy.lamda=1"], ["unknown key strategy.lamda", "ewc_lambda"]),
    (["strategy=ewc", "strategy.ewc_lambda=abc"], ["strategy.ewc_lambda"]),
    (["strategy=ewcc"], ["unknown strategy 'ewcc'", "ewc"]),
    (["dataset=cifar"], ["unknown dataset 'cifar'", "split_cifar10"]),
    (["device=gpu"], ["unknown device 'gpu'", "cuda"]),
    (["scenario=foo"], ["bad value for scenario", "class_il"]),
    (["train.optimizer=sgdd"], ["bad value for train.optimizer", "adamw"]),
    (["train.epochs=1.5"], ["bad value for train.epochs"]),
    (["seed=abc"], ["bad value for seed"]),
    (["train=3"], ["train"]),
    (["train.lr"], ["train.lr", "key=value"]),
    (["~train.lr"], ["train.lr"]),
    # values that used to fail only once training had started, or silently meant something else
    (["train.lr=-1"], ["train.lr must be a positive finite number"]),
    (["train.lr=nan"], ["train.lr must be a positive finite number, got nan"]),
    (["train.momentum=-1"], ["train.momentum must be in [0, 1)"]),
    (["train.weight_decay=-1"], ["train.weight_decay must be a finite number >= 0"]),
    (["train.max_loss=-1"], ["train.max_loss must be >= 0"]),
    (["train.epochs=0"], ["train.epochs must be at least 1"]),
    (["train.batch_size=0"], ["train.batch_size must be at least 1"]),
    (["seed=99999999999"], ["seed must be in [0, 2**32 - 1]"]),
    (["device.num_threads=0"], ["device.num_threads must be at least 1"]),
    (["device.num_threads=-2"], ["device.num_threads must be at least 1"]),
    (["device.memory_fraction=1.5"], ["device.memory_fraction must be in (0, 1]"]),
    (["dataset.max_train_per_class=0"], ["dataset.max_train_per_class must be at least 1"]),
    (["strategy=er", "strategy.memory_size=-5"], ["strategy.memory_size must be non-negative"]),
    (["strategy=icarl", "strategy.memory_size=5"], ["strategy.memory_size=5 is less than one exemplar per class"]),
    (["objective=accuracy"], ["objective must be one of", "acc"]),
    (["device=cuda"] if not torch.cuda.is_available() else ["device=cuda:99"], ["device=cuda"]),
    (["eval_split=val"], ["eval_split=val needs a validation split", "val_fraction"]),
    (["checkpoint_every=banana"], ["checkpoint_every"]),
    (["dataset=split_mnist", "dataset.root=EMPTY", "dataset.download=false"], ["EMPTY"]),
    (["dataset.num_tasks=3"], ["dataset.num_tasks=3 does not divide the 10 classes"]),
    (["dataset.val_fraction=1.5"], ["dataset.val_fraction must be in [0, 1)"]),
    (["backbone.hidden_sizes=[0]"], ["backbone.hidden_sizes must be positive integers"]),
    (["strategy=lwf", "strategy.temperature=0"], ["strategy.temperature must be positive"]),
    (["strategy=hat", "strategy.smax=1"], ["unknown key strategy.smax", "s_max"]),
    (["strategy=icarl", "scenario=domain_il"], ["does not support scenario=domain_il"]),
    (["strategy._target_=nowhere.Mine"], ["strategy._target_='nowhere.Mine' cannot be imported"]),
    (["train.lr=${oops}"], ["oops"]),
    (["hydra/launcher=nope"], ["hydra/launcher/nope", "joblib"]),
    # silently taken before: the last of two values, the current folder for an empty one
    (["train.lr=0.05", "train.lr=0.1"], ["train.lr is given twice"]),
    (["hydra.run.dir="], ["hydra.run.dir is empty"]),
    # Hydra's own flags
    (["--cfg", "foo"], ["--cfg", "job"]),
    (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
]


def smoke_with(args: list[str]) -> list[str]:
    """SMOKE then `args`, without the SMOKE keys that `args` sets itself (a key given twice is an error)."""
    keys = {a.lstrip("+~").partition("=")[0] for a in args}
    return [*(a for a in SMOKE if a.partition("=")[0] not in keys), *args]


def snapshot(folder: Path) -> dict:
    """Every file and folder under `folder` with its bytes and mode (None: no folder)."""
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, stat.S_IMODE(p.stat().st_mode))
        for p in sorted(folder.rglob("*"))
    }


def assert_one_line(proc, *phrases: str) -> str:
    assert proc.returncode not in (0, None), proc.stdout[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("clbench: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run's folder (results, checkpoint, .hydra), copied by each case."""
    root = tmp_path_factory.mktemp("finished")
    proc = clbench("run", *SMOKE, f"hydra.run.dir={root / 'run'}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.mark.parametrize("args, phrases", BAD_RUNS, ids=[" ".join(a) for a, _ in BAD_RUNS])
def test_bad_run_input_is_one_line_and_leaves_the_folder_as_it_was(args, phrases, finished, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    before = snapshot(folder)
    args = [a.replace("EMPTY", str(tmp_path / "no_data")) for a in args]
    phrases = [p.replace("EMPTY", str(tmp_path / "no_data")) for p in phrases]
    if not any(a.startswith("hydra.run.dir") for a in args):
        args.append(f"hydra.run.dir={folder}")
    proc = clbench("run", *smoke_with(args), cwd=tmp_path)
    assert_one_line(proc, *phrases)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing made next to it either


@pytest.mark.parametrize("args", [["train.lr=-1"], ["dataset=split_mnist", "dataset.download=false"], ["device.num_threads=0"]])
def test_a_refused_run_leaves_no_new_folder_behind(args, tmp_path):
    data = tmp_path / "no_data"
    args = [*args, f"dataset.root={data}"] if "dataset=split_mnist" in args else args
    proc = clbench("run", *smoke_with(args), f"hydra.run.dir={tmp_path / 'a' / 'b' / 'run'}", cwd=tmp_path)
    assert_one_line(proc, args[-1].partition("=")[0])
    proc = clbench("run", *smoke_with(args), cwd=tmp_path)  # the default folder, outputs/<date>/<time>-<id>
    assert_one_line(proc, args[-1].partition("=")[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, phrase", [
    (lambda p: p.write_text("I am a file"), "exists and is not a folder"),
    (lambda p: None, "No such file or directory"),
])
def test_an_impossible_run_folder_is_one_line(make, phrase, tmp_path):
    target = tmp_path / "file" if phrase.startswith("exists") else Path("/proc/clbench_nope/run")
    make(target)
    proc = clbench("run", *SMOKE, f"hydra.run.dir={target}", cwd=tmp_path)
    assert_one_line(proc, str(target.parent if phrase.startswith("No such") else target), phrase)


def test_a_full_disk_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the results: one line naming the file and the OS reason, no result files."""
    import errno

    from cl_bench import cli, results

    real = results.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(results, "atomic_write_bytes", full)
    folder = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    code = cli.main(["run", *SMOKE, f"hydra.run.dir={folder}"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "No space left on device" in lines[0] and "metrics.json" in lines[0]
    assert not (folder / "metrics.json").exists()
    assert json.loads((folder / "failed.json").read_text())["error_type"] == "OSError"


@pytest.mark.parametrize("content, phrase", [
    ([1, 2, 3], "is not a clbench checkpoint"),
    ({"version": 1, "model": {}}, "is not a clbench checkpoint"),
    (b"\x00garbage", "cannot read the checkpoint"),
])
def test_a_checkpoint_of_the_wrong_shape_is_named_as_such(content, phrase, finished, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    for name in ("metrics.json", "results.md", "accuracy_matrix.csv", "accuracy_matrix_task_aware.csv"):
        (folder / name).unlink()  # as if killed before the results: the run resumes from its checkpoint
    if isinstance(content, bytes):
        (folder / "checkpoint.pt").write_bytes(content)
    else:
        torch.save(content, folder / "checkpoint.pt")
    before = snapshot(folder)
    proc = clbench("run", *SMOKE, f"hydra.run.dir={folder}", cwd=tmp_path)
    line = assert_one_line(proc, phrase, "resume=false")
    assert "different config" not in line
    assert snapshot(folder) == before


# ----- clbench report ---------------------------------------------------------------------
def test_report_on_a_folder_without_runs_fails_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = clbench("report", str(tmp_path / "empty"), cwd=tmp_path)
    assert_one_line(proc, "no runs", str(tmp_path / "empty"))
    assert list((tmp_path / "empty").iterdir()) == []
    assert_one_line(clbench("report", str(tmp_path / "absent"), cwd=tmp_path), "absent")
    assert_one_line(clbench("report", str(tmp_path), "--format", "pdf", cwd=tmp_path), "--format", "pdf")


def test_report_lists_an_empty_metrics_json_as_failed(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "sweep" / "good")
    (tmp_path / "sweep" / "empty").mkdir()
    (tmp_path / "sweep" / "empty" / "metrics.json").write_text("{}")
    proc = clbench("report", str(tmp_path / "sweep"), "--no-plots", "--format", "console,csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Failed or unfinished runs" in proc.stdout and "empty" in proc.stdout
    import pandas as pd

    table = pd.read_csv(tmp_path / "sweep" / "report" / "report.csv")
    assert int(table["n"].sum()) == 1  # only the good run is averaged


def test_report_to_an_unwritable_place_is_one_line(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "runs" / "good")
    (tmp_path / "a_file").write_text("x")
    proc = clbench("report", str(tmp_path / "runs"), "--out", str(tmp_path / "a_file" / "out"), "--no-plots",
                   cwd=tmp_path)
    assert_one_line(proc, str(tmp_path / "a_file"))


# ----- sweeps -----------------------------------------------------------------------------
@pytest.mark.parametrize("args, phrases", [
    (["train.lr=-1,0.05"], ["train.lr must be a positive finite number", "train.lr=-1", "no job was started"]),
    (["strategy=ewc,si", "strategy.ewc_lambda=1"], ["unknown key strategy.ewc_lambda", "strategy=si"]),
    (["seed=0,1", "+train.epoch=2"], ["unknown key train.epoch"]),
    (["strategy=ewc,sii"], ["unknown strategy 'sii'"]),
])
def test_a_bad_value_in_a_sweep_is_caught_before_any_job_starts(args, phrases, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = clbench("run", "-m", *SMOKE, *args, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert_one_line(proc, *phrases)
    assert not sweep_dir.exists()


@pytest.mark.parametrize("text, phrase", [
    ("_target_: cl_bench.strategies.ewc.EWC\newc_lambda: [1, 2\n", "line 3"),
    ("_target_: cl_bench.strategies.ewc.EWC\n  ewc_lambda: 3\n", "line 2: mapping values are not allowed"),
])
def test_bad_yaml_in_a_users_config_folder_names_the_file_and_line(text, phrase, tmp_path):
    (tmp_path / "mycfg" / "strategy").mkdir(parents=True)
    (tmp_path / "mycfg" / "strategy" / "mine.yaml").write_text(text)
    proc = clbench("run", "--config-dir", str(tmp_path / "mycfg"), "strategy=mine", *SMOKE, cwd=tmp_path)
    assert_one_line(proc, "cannot parse", str(tmp_path / "mycfg" / "strategy" / "mine.yaml"), phrase)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mycfg"]
