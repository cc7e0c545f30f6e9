"""A new user's own method, dataset and backbone, exactly as the README shows them.

The files and commands are read from the README's section "Add your own strategy,
dataset or backbone", written into a temporary folder, and run through the `clbench`
console script of a non-editable install (`pip install --target`, so the config tree
is the one shipped inside the package, not this checkout's conf/). The Python API
(`cl_bench.run`) is tested on the same files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cl_bench

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Add your own strategy, dataset or backbone"


def readme_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end > 0 else None]


def readme_files() -> dict[str, str]:
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", readme_section(), flags=re.S)
    return dict(blocks)


def readme_commands() -> list[list[str]]:
    block = re.search(r"<!-- commands -->\n```\w*\n(.*?)```", readme_section(), flags=re.S).group(1)
    return [line.split() for line in block.splitlines() if line.startswith("clbench ")]


def write_user_folder(folder: Path) -> None:
    for name, content in readme_files().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """clbench installed non-editable into its own folder; the environment that uses it."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "cl_bench", src / "cl_bench", ignore=ignore)
    for folder in ("conf", "scripts"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    site = root / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return {"site": site, "clbench": str(site / "bin" / "clbench"), "env": env}


def test_readme_example_is_complete():
    files = readme_files()
    assert set(files) == {"my_methods.py", "mycfg/strategy/l2_anchor.yaml", "mycfg/dataset/blobs.yaml",
                          "mycfg/backbone/tiny.yaml"}
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["clbench", "run"], ["clbench", "run"], ["clbench", "report"]]


def test_own_method_dataset_backbone_from_a_non_editable_install(installed, tmp_path):
    work = tmp_path / "mywork"
    work.mkdir()
    write_user_folder(work)
    env, exe = installed["env"], installed["clbench"]
    where = subprocess.run([sys.executable, "-c", "import cl_bench; print(cl_bench.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(installed["site"])), where  # the installed package, not this checkout

    single, sweep, report = readme_commands()
    done = subprocess.run([exe, *single[1:], "progress=false", "output_dir=single"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((work / "single" / "metrics.json").read_text())
    assert (summary["strategy"], summary["dataset"], summary["backbone"]) == ("l2_anchor", "blobs", "tiny")
    assert summary["num_tasks"] == 2 and summary["classes_per_task"] == [[0, 1], [2, 3]]
    assert summary["status"] == "completed"

    done = subprocess.run([exe, *sweep[1:], "progress=false"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    runs = [json.loads(p.read_text()) for p in sorted((work / "sweeps" / "first").glob("*/metrics.json"))]
    labels = sorted((r["strategy"], r["dataset"], r["backbone"]) for r in runs)
    assert labels == [("finetune", "blobs", "tiny"), ("finetune", "split_digits", "tiny"),
                      ("l2_anchor", "blobs", "tiny"), ("l2_anchor", "split_digits", "tiny")]

    # the same sweep under clbench's fork launcher, installed as hydra_plugins.clbench_launcher: the same matrices
    forked = work / "sweeps" / "forked"
    done = subprocess.run([exe, *[a for a in sweep[1:] if not a.startswith("hydra.sweep.dir=")], "progress=false",
                           "hydra/launcher=fork", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={forked}"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    again = {(r["strategy"], r["dataset"]): r["accuracy_matrix"]
             for r in (json.loads(p.read_text()) for p in forked.glob("*/metrics.json"))}
    assert again == {(r["strategy"], r["dataset"]): r["accuracy_matrix"] for r in runs}

    shown = subprocess.run([exe, *report[1:], "--format", "csv"], cwd=work, env=env, capture_output=True,
                           text=True)
    assert shown.returncode == 0, shown.stderr
    table = "\n".join(p.read_text() for p in (work / "sweeps" / "first").rglob("*.csv"))
    for name in ("l2_anchor", "finetune", "blobs", "split_digits"):
        assert name in shown.stdout + table


def test_the_users_strategy_is_what_ran(installed, tmp_path):
    """Protection off (strength 0) reproduces fine-tuning's matrix exactly; switched on,
    the same stream gives another matrix: the user's train_step is the one that ran."""
    work = tmp_path / "mywork"
    work.mkdir()
    write_user_folder(work)
    env, exe = installed["env"], installed["clbench"]
    common = ["--config-dir", "mycfg", "dataset=blobs", "backbone=tiny", "progress=false"]
    runs = {"off": ["strategy=l2_anchor", "strategy.strength=0"], "on": ["strategy=l2_anchor", "strategy.strength=5"],
            "ft": ["strategy=finetune"]}
    for name, extra in runs.items():
        done = subprocess.run([exe, "run", *common, *extra, f"output_dir={name}"], cwd=work, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    matrix = {n: json.loads((work / n / "metrics.json").read_text())["accuracy_matrix"] for n in runs}
    loss = {n: json.loads((work / n / "metrics.json").read_text())["train_log"][1]["mean_loss"] for n in runs}
    assert matrix["off"] == matrix["ft"] and loss["off"] == loss["ft"]
    assert loss["on"] != loss["ft"]  # the pull adds to task 2's loss


def test_python_api_runs_the_cli_code_path(tmp_path, monkeypatch):
    work = tmp_path / "mywork"
    work.mkdir()
    write_user_folder(work)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    summary = cl_bench.run(strategy="l2_anchor", dataset="blobs", backbone="tiny", config_dir="mycfg",
                           overrides=["train.epochs=2", "progress=false", "output_dir=api"])
    stored = json.loads((work / "api" / "metrics.json").read_text())
    assert summary == stored
    assert summary["strategy"] == "l2_anchor" and summary["train_log"][0]["steps"] == 2 * 4  # 120 samples / 32

    # the same run again is skipped, as on the command line, and returns the stored results
    again = cl_bench.run(strategy="l2_anchor", dataset="blobs", backbone="tiny", config_dir="mycfg",
                         overrides=["train.epochs=2", "progress=false", "output_dir=api"])
    assert again == stored

    runs = cl_bench.run(strategy="finetune", overrides=["seed=0,1", "train.epochs=1", "progress=false",
                                                        "hydra.sweep.dir=api_sweep"], multirun=True)
    assert [r["seed"] for r in runs] == [0, 1]

    with pytest.raises(cl_bench.CLBenchError, match="train.lr must be a positive"):
        cl_bench.run(overrides=["train.lr=-1", "output_dir=refused"])
    assert not (work / "refused").exists()
    with pytest.raises(cl_bench.CLBenchError, match="unknown strategy 'nope'"):
        cl_bench.run(strategy="nope")


def test_a_dataset_without_scenario_must_build_the_asked_one(tmp_path, monkeypatch):
    """A dataset function needs none of the shipped datasets' keys, not even `scenario`
    and `seed`; a run asking for a scenario it does not build is refused in one line."""
    work = tmp_path / "w"
    work.mkdir()
    write_user_folder(work)
    (work / "only_mine.py").write_text(
        "from my_methods import blobs\n"
        "def two_tasks():\n"
        "    return blobs('class_il', 0, 2)\n"
    )
    (work / "mycfg" / "dataset" / "two.yaml").write_text("_target_: only_mine.two_tasks\n")
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    common = ["progress=false", "train.epochs=1"]
    ok = cl_bench.run(dataset="two", config_dir="mycfg", overrides=[*common, "output_dir=ok"])
    assert ok["dataset"] == "two" and ok["num_tasks"] == 2
    with pytest.raises(cl_bench.CLBenchError, match="built a class_il stream but scenario=task_il"):
        cl_bench.run(dataset="two", config_dir="mycfg", overrides=[*common, "scenario=task_il", "output_dir=bad"])
    assert not (work / "bad" / "metrics.json").exists()


def test_shipped_scripts_run_from_a_non_editable_install(installed, tmp_path):
    """The README's scripts ship inside the package (`clbench script NAME`)."""
    env, exe = installed["env"], installed["clbench"]
    listed = subprocess.run([exe, "script"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert listed.returncode == 2  # usage without a name
    names = listed.stdout.split("scripts: ")[1].strip().split(", ")
    assert {"reproduce_split_mnist", "reproduce_replay", "reproduce_generative", "reproduce_isolation",
            "bench_overhead", "bench_sweep", "check_defaults", "sweep_defaults"} <= set(names)
    for name in ("reproduce_split_mnist", "reproduce_replay", "reproduce_generative", "reproduce_isolation",
                 "bench_overhead", "bench_sweep", "check_defaults", "sweep_defaults", "kill_resume_campaign"):
        shown = subprocess.run([exe, "script", name, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert shown.returncode == 0 and "usage" in shown.stdout, (name, shown.stderr[-2000:])
    unknown = subprocess.run([exe, "script", "nope"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "unknown script 'nope'" in unknown.stderr
