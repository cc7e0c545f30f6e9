"""The paper reproductions as named experiments: van de Ven & Tolias 2019 (split MNIST, Table 4)
and Buzzega et al. 2020 (Seq-MNIST, Table 2).

conf/experiment/vandeven2019_split_mnist*.yaml and buzzega2020_seq_mnist*.yaml hold the protocols,
conf/experiment_method/<experiment>/<strategy>.yaml each method's paper values;
scripts/reproduce_split_mnist.py and scripts/reproduce_der.py only run them and print the runs
beside the paper tables (cl_bench/paper_tables/). These tests pin the values the scripts used
before they became thin (a typo in a YAML file would change a reproduction silently), that every
paper row asks for exactly what its experiment sets, and that the scripts' runs are reported
"same" protocol against their tables.
"""

from __future__ import annotations

from importlib.resources import files

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_object

from cl_bench import paper_tables
from cl_bench.config import check_kwargs
from cl_bench.report import _normalise, _overrides, against, find_runs, flatten_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VANDEVEN = {"task_il": "vandeven2019_split_mnist", "domain_il": "vandeven2019_split_mnist_domain_il",
            "class_il": "vandeven2019_split_mnist_class_il"}
BUZZEGA = {200: "buzzega2020_seq_mnist", 500: "buzzega2020_seq_mnist_buffer500"}
EXPERIMENTS = (*VANDEVEN.values(), *BUZZEGA.values())


def composed(*overrides: str):
    """The run config and Hydra's group choices (`choices["dataset"]`, ...)."""
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", *overrides], return_hydra_config=True)
    from omegaconf import open_dict

    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def method_files(experiment: str) -> list[str]:
    folder = files("cl_bench.conf").joinpath("experiment_method", experiment)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def flat(cfg) -> dict:
    from omegaconf import OmegaConf

    return flatten_config(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


# ----- the values of the scripts before they became thin --------------------------------------------
# scripts/reproduce_split_mnist.py (git 22aa703): run_one's overrides (besides dataset, seed, device,
# checkpoint and the computed epochs) and strategy_overrides(method, scenario).
VANDEVEN_PROTOCOL = {"backbone.hidden_sizes": [400, 400], "train.optimizer": "adam", "train.lr": 1e-3,
                     "train.reset_optimizer": False, "dataset.class_order": "natural", "train.active_classes": True,
                     "train.batch_size": 128}
EWC_LAMBDA = {"task_il": 1e7, "domain_il": 1e6, "class_il": 1e8}
ONLINE_EWC = {"task_il": (1e8, 0.8), "domain_il": (1e8, 0.7), "class_il": (1e9, 0.8)}
SI_C = {"task_il": 50.0, "domain_il": 500.0, "class_il": 0.5}


def vandeven_values(method: str, scenario: str) -> dict:
    fisher = {"strategy.fisher": "predicted", "strategy.fisher_samples": 0}
    if method == "ewc":
        return {"strategy.ewc_lambda": EWC_LAMBDA[scenario], **fisher}
    if method == "online_ewc":
        strength, gamma = ONLINE_EWC[scenario]
        return {"strategy.ewc_lambda": strength * gamma, "strategy.gamma": gamma, **fisher}
    if method == "si":
        return {"strategy.c": SI_C[scenario], "strategy.xi": 0.1}
    if method == "lwf":
        return {"strategy.temperature": 2.0, "strategy.alpha": 1.0, "strategy.weighting": "task_ratio"}
    return {}


# scripts/reproduce_der.py (git 22aa703): SMNIST and SMNIST_METHODS (the authors' best_args, 'seq-mnist').
BUZZEGA_PROTOCOL = {"backbone.hidden_sizes": [100, 100], "train.optimizer": "sgd", "train.momentum": 0.0,
                    "train.weight_decay": 0.0, "train.batch_size": 10, "train.epochs": 1, "scenario": "class_il"}
SMNIST_METHODS = {
    "finetune": {0: ["train.lr=0.03"]},
    "joint": {0: ["train.lr=0.03"]},
    "er": {200: ["train.lr=0.01"], 500: ["train.lr=0.1"]},
    "gem": {200: ["train.lr=0.01", "strategy.memory_strength=1.0"],
            500: ["train.lr=0.03", "strategy.memory_strength=0.5"]},
    "agem": {200: ["train.lr=0.1", "strategy.sample_size=128"], 500: ["train.lr=0.1", "strategy.sample_size=128"]},
    "icarl": {200: ["train.lr=0.1"], 500: ["train.lr=0.1"]},
    "der": {200: ["train.lr=0.03", "strategy.alpha=0.2", "strategy.replay_batch_size=10"],
            500: ["train.lr=0.03", "strategy.alpha=1.0", "strategy.replay_batch_size=128"]},
    "derpp": {200: ["train.lr=0.03", "strategy.alpha=0.2", "strategy.beta=1.0", "strategy.replay_batch_size=128"],
              500: ["train.lr=0.03", "strategy.alpha=1.0", "strategy.beta=0.5", "strategy.replay_batch_size=10"]},
    "xder": {200: ["train.lr=0.01"], 500: ["train.lr=0.1"]},
    "er_ace": {200: ["train.lr=0.01"], 500: ["train.lr=0.1"]},
    "gdumb": {200: [], 500: []},
}


def assert_values(keys: dict, expected: dict, where: str) -> None:
    for key, value in expected.items():
        assert _normalise(keys.get(key)) == _normalise(value), f"{where}: {key} is {keys.get(key)!r}, not {value!r}"


# ----- composing ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_experiment_composes_for_every_strategy_with_a_file(experiment):
    """Every experiment_method file composes with its experiment and sets only keys its strategy
    takes, with the right types (the check the runner makes before any training)."""
    strategies = method_files(experiment)
    assert strategies, experiment
    for strategy in strategies:
        cfg, choices = composed(f"experiment={experiment}", f"strategy={strategy}")
        assert choices["strategy"] == strategy and choices["experiment"] == experiment
        check_kwargs(get_object(cfg.strategy._target_), cfg.strategy, "strategy")


@pytest.mark.parametrize("scenario", list(VANDEVEN))
def test_vandeven_experiments_carry_the_old_scripts_values(scenario):
    experiment = VANDEVEN[scenario]
    assert method_files(experiment) == ["ewc", "joint", "lwf", "online_ewc", "si"]
    for method in ("finetune", "joint", "ewc", "online_ewc", "si", "lwf", "mas"):
        cfg, choices = composed(f"experiment={experiment}", f"strategy={method}")
        keys = flat(cfg)
        assert choices["dataset"] == "split_mnist" and keys["scenario"] == scenario
        assert_values(keys, {**VANDEVEN_PROTOCOL, **vandeven_values(method, scenario)}, f"{experiment}/{method}")
        # 2,000 iterations of 128 on split_mnist's 12,000 digits per task; joint's steps scaled by 2 / (T + 1)
        assert keys["train.epochs"] == (7 if method == "joint" else 21)


def test_vandeven_epochs_are_the_scripts_computation_for_split_mnist():
    from scripts.reproduce_split_mnist import epochs_per_task

    cfg, _ = composed("experiment=vandeven2019_split_mnist")
    joint, _ = composed("experiment=vandeven2019_split_mnist", "strategy=joint")
    assert epochs_per_task(2000, 60000 // 5, cfg.train.batch_size, cfg.dataset.num_tasks) == (
        cfg.train.epochs, joint.train.epochs) == (21, 7)
    # the offline split_mnist5k (700 training digits per task), as the script's docstring says
    assert epochs_per_task(2000, 700, 128, 5) == (333, 111)


@pytest.mark.parametrize("buffer", list(BUZZEGA))
def test_buzzega_experiments_carry_the_old_scripts_best_args(buffer):
    experiment = BUZZEGA[buffer]
    assert method_files(experiment) == sorted(SMNIST_METHODS)
    for method, by_buffer in SMNIST_METHODS.items():
        cfg, choices = composed(f"experiment={experiment}", f"strategy={method}")
        keys = flat(cfg)
        assert choices["dataset"] == "split_mnist" and choices["backbone"] == "mlp"
        expected = dict(o.split("=", 1) for o in by_buffer.get(buffer, by_buffer.get(0)))
        if method not in ("finetune", "joint"):
            expected["strategy.memory_size"] = buffer
        assert_values(keys, {**BUZZEGA_PROTOCOL, **expected}, f"{experiment}/{method}")
        if method in ("finetune", "joint"):
            assert "strategy.memory_size" not in keys


def experiment_of(table: str, row: dict) -> str:
    if table == "vandeven2019":
        return VANDEVEN[row["scenario"]]
    return BUZZEGA[int(_overrides(row).get("strategy.memory_size", 200))]


@pytest.mark.parametrize("table", ["vandeven2019", "buzzega2020"])
def test_every_paper_row_asks_for_what_its_experiment_sets(table):
    """Each row's protocol_overrides hold values the experiment (with that row's strategy) sets,
    so that `--against` reports the experiment's runs as the same protocol."""
    rows = paper_tables.load(table)
    for row in rows:
        cfg, choices = composed(f"experiment={experiment_of(table, row)}", f"strategy={row['method']}")
        keys = {**flat(cfg), **choices}
        assert keys["scenario"] == row["scenario"]
        assert_values(keys, _overrides(row), f"{table} {row['method']} {row['scenario']}")


# ----- the command lines the scripts build ------------------------------------------------------------
def test_split_mnist_sweeps_group_methods_by_their_overrides_and_seeds_by_class_order(tmp_path):
    """Seed 0 keeps the natural class order, the other seeds a random one (their exception=(seed == 0));
    joint gets its scaled epochs and VCL its sample counts in sweeps of their own; the user's
    overrides replace the script's for the same key."""
    import argparse

    from scripts.reproduce_split_mnist import sweeps

    args = argparse.Namespace(runs=str(tmp_path), overrides=["train.lr=0.01", "checkpoint=true"],
                              vcl_train_samples=2, vcl_test_samples=None)
    lines = sweeps(["finetune", "ewc", "joint", "vcl"], ["task_il", "class_il"], [0, 1, 2], 333, 111,
                   ["dataset=split_mnist5k", "checkpoint=false"], args)
    assert len(lines) == 2 * 2 * 3  # scenarios x class orders x {finetune+ewc, joint, vcl}
    first = lines[0]
    assert first[:4] == ["-m", "experiment=vandeven2019_split_mnist", "seed=0", "strategy=finetune,ewc"]
    assert "train.epochs=333" in first and "dataset.class_order=random" not in first
    assert first[-2:] == ["train.lr=0.01", "checkpoint=true"] and "checkpoint=false" not in first
    joint = next(line for line in lines if "strategy=joint" in line and "seed=1,2" in line)
    assert "train.epochs=111" in joint and "dataset.class_order=random" in joint
    vcl = next(line for line in lines if "strategy=vcl" in line)
    assert "strategy.train_samples=2" in vcl and not any("test_samples" in a for a in vcl)
    assert sum("experiment=vandeven2019_split_mnist_class_il" in line for line in lines) == 6
    dirs = [a for line in lines for a in line if a.startswith("hydra.sweep.dir=")]
    assert len(set(dirs)) == len(lines)  # no two sweeps share a folder (job numbers would clash)


def test_der_sweeps_run_the_methods_without_a_buffer_once(tmp_path):
    from scripts.reproduce_der import bhalf_sweeps, smnist_sweeps

    lines = smnist_sweeps(["finetune", "er", "der", "joint"], [200, 500], [0, 1], tmp_path)
    assert [line[1:4] for line in lines] == [
        ["experiment=buzzega2020_seq_mnist", "seed=0,1", "strategy=finetune,er,der,joint"],
        ["experiment=buzzega2020_seq_mnist_buffer500", "seed=0,1", "strategy=er,der"]]
    only500 = smnist_sweeps(["finetune", "er"], [500], [0], tmp_path)
    assert only500[0][1:4] == ["experiment=buzzega2020_seq_mnist_buffer500", "seed=0", "strategy=finetune,er"]
    # bhalf has no experiment: the memory goes on the command line, `++` because Hydra composes a
    # sweep's default strategy (finetune, no memory) before its jobs
    plain, memory = bhalf_sweeps(["finetune", "icarl", "wa", "joint"], [0], tmp_path)
    assert "strategy=finetune,joint" in plain and not any("memory_size" in a for a in plain)
    assert "strategy=icarl,wa" in memory and "++strategy.memory_size=200" in memory


# ----- the scripts, reduced, on MNIST files in the real layout ------------------------------------
@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    from tests.real_format import prepare

    folder = tmp_path_factory.mktemp("mnist")
    return prepare("split_mnist", folder)  # 20 training and 5 test digits per class


@pytest.mark.slow
def test_reproduce_split_mnist_runs_the_experiments_and_reports_them_against_the_paper(
        mnist_root, tmp_path, capsys, monkeypatch):
    import cl_bench.data.mnist5k as mnist5k
    from scripts import reproduce_split_mnist

    monkeypatch.setattr(mnist5k, "load_mnist5k_arrays", mnist5k.load_mnist5k_arrays)  # undo the script's cache
    monkeypatch.setenv("COLUMNS", "250")
    runs = tmp_path / "runs"
    assert reproduce_split_mnist.main(["--dataset", "split_mnist", "--methods", "finetune,ewc", "--scenarios",
                                       "task_il,class_il", "--iters", "3", "--runs", str(runs), *mnist_root]) == 0
    out = capsys.readouterr().out
    # the command lines it ran are the experiments', with the epochs of 3 iterations on 40 digits per task
    assert ("$ clbench run -m experiment=vandeven2019_split_mnist seed=0 strategy=finetune,ewc train.epochs=3 "
            "dataset=split_mnist") in out
    assert "experiment=vandeven2019_split_mnist_class_il seed=0 strategy=finetune,ewc" in out
    assert "against vandeven2019" in out and "DIFFERS" not in out
    rows = against(find_runs(runs), "vandeven2019")
    assert sorted((r["method"], r["scenario"]) for r in rows) == [
        ("ewc", "class_il"), ("ewc", "task_il"), ("finetune", "class_il"), ("finetune", "task_il")]
    for r in rows:
        assert r["differences"] == [], r
        assert r["n"] == 1
    by = {(r["method"], r["scenario"]): r for r in rows}
    assert by[("finetune", "task_il")]["paper"] == 87.19 and by[("ewc", "class_il")]["paper"] == 20.01
    ewc = [rec.summary for rec in find_runs(runs) if rec.summary["strategy"] == "ewc"]
    assert sorted(s["config"]["strategy"]["ewc_lambda"] for s in ewc) == [1e7, 1e8]
    assert all(s["config"]["train"]["epochs"] == 3 and len(s["accuracy_matrix"]) == 5 for s in ewc)


@pytest.mark.slow
def test_reproduce_der_runs_both_buffers_and_reports_them_against_the_paper(mnist_root, tmp_path, capsys,
                                                                             monkeypatch):
    from scripts import reproduce_der

    monkeypatch.setenv("COLUMNS", "250")
    runs, md = tmp_path / "runs", tmp_path / "table.md"
    reproduce_der.main(["--dataset", "split_mnist", "--seeds", "0", "--methods", "finetune", "er", "--runs", str(runs),
                        "--out", str(md), *mnist_root])
    out = capsys.readouterr().out
    assert "$ clbench run -m experiment=buzzega2020_seq_mnist seed=0 strategy=finetune,er" in out
    assert "$ clbench run -m experiment=buzzega2020_seq_mnist_buffer500 seed=0 strategy=er " in out
    assert "against buzzega2020" in out and "DIFFERS" not in out
    table = md.read_text()
    assert [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:] \
        == [[" finetune ", " - "], [" er ", " 200 "], [" er ", " 500 "]]
    rows = against(find_runs(runs), "buzzega2020")
    # finetune, er with buffer 200, er with buffer 500: class-IL and the task-aware (Task-IL) column each
    assert sorted((r["method"], r["metric"], r["paper"]) for r in rows) == [
        ("er", "acc", 80.43), ("er", "acc", 86.12), ("er", "acc_task_aware", 97.86), ("er", "acc_task_aware", 99.04),
        ("finetune", "acc", 19.6), ("finetune", "acc_task_aware", 94.46)]
    assert all(r["differences"] == [] and r["n"] == 1 for r in rows)
