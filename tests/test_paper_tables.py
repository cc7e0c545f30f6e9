"""Paper tables as data (cl_bench/paper_tables/*.csv) and `clbench report --against`."""

from __future__ import annotations

import pytest

from cl_bench import CLBenchError, paper_tables
from cl_bench.report import _overrides, against, find_runs, report_command
from tests.conftest import compose_cfg, conf_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCENARIOS = ("class_il", "task_il", "domain_il")
# acc / acc_task_aware / forgetting: a run's summary metrics (x 100); error / error_top5: top-1 / top-5
# error of one task, which `--against` cannot compare yet (it skips them)
METRICS = ("acc", "acc_task_aware", "forgetting", "error", "error_top5")


@pytest.mark.parametrize("name", paper_tables.available())
def test_every_table_is_well_formed(name):
    """Each row names a shipped strategy and a scenario, has a number, a source and a protocol
    whose overrides, where it has any, compose as a clbench config (a typo in a key would not).
    Rows that no run's summary metric matches (per-task errors of a dataset sequence: PackNet,
    Piggyback) carry no overrides."""
    rows = paper_tables.load(name)
    assert rows
    strategies = set(conf_options("strategy"))
    for row in rows:
        assert row["method"] in strategies, row["method"]
        assert row["scenario"] in SCENARIOS and row["metric"] in METRICS
        assert 0 <= row["value"] <= 100 and row["paper"] and row["table"] and row["protocol"]
        overrides = _overrides(row)
        if not overrides:
            continue
        # a row about one dataset of a sequence (Piggyback, PackNet) is compared with dataset=sequence runs
        assert overrides["dataset"] in (row["dataset"], "sequence")
        cfg = compose_cfg(f"strategy={row['method']}", *str(row["protocol_overrides"]).split())
        assert cfg.dataset._target_  # composed


def test_an_unknown_table_is_refused_in_one_line(tmp_path):
    import re

    listed = ", ".join(paper_tables.available())
    assert "buzzega2020" in listed and "vandeven2019" in listed
    with pytest.raises(CLBenchError, match=re.escape(f"unknown paper table 'nope'; available: {listed}")):
        report_command([str(tmp_path), "--against", "nope"])


VANDEVEN = ("backbone.hidden_sizes=[400,400]", "train.optimizer=adam", "train.lr=0.001",
            "train.reset_optimizer=false", "train.batch_size=128")


@pytest.fixture(scope="module")
def vandeven_runs(tmp_path_factory):
    """The split MNIST-5k reproduction of van de Ven & Tolias (2019), cut down: finetune and
    EWC in Task-IL, the paper's optimizer and model, 2 seeds; one EWC run with another lr."""
    from tests.conftest import run

    root = tmp_path_factory.mktemp("vandeven")
    small = ("dataset=split_mnist5k", "dataset.max_train_per_class=20", "train.epochs=1", "scenario=task_il",
             "checkpoint=false")
    for strategy in ("finetune", "ewc"):
        for seed in (0, 1):
            run(root, *small, *VANDEVEN, f"strategy={strategy}", f"seed={seed}", name=f"{strategy}_{seed}")
    run(root, *small, *VANDEVEN[:2], "train.lr=0.01", *VANDEVEN[3:], "strategy=ewc", "seed=0", name="ewc_lr")
    return root


def test_against_vandeven2019_puts_each_group_beside_its_paper_cell(vandeven_runs):
    rows = against(find_runs(vandeven_runs), "vandeven2019")
    by = {(r["method"], r["n"]): r for r in rows}
    assert sorted(by) == [("ewc", 1), ("ewc", 2), ("finetune", 2)]
    finetune, ewc = by[("finetune", 2)], by[("ewc", 2)]
    assert finetune["paper"] == 87.19 and ewc["paper"] == 98.64 and finetune["scenario"] == "task_il"
    for r in (finetune, ewc):
        assert r["difference"] == pytest.approx(r["ours"] - r["paper"])
        assert r["verified"] is False
        # same optimizer and model as the paper: only the data differs (MNIST-5k, not the full MNIST)
        assert r["differences"] == ["dataset split_mnist5k (paper split_mnist)"]
    other = by[("ewc", 1)]
    assert other["differences"] == ["dataset split_mnist5k (paper split_mnist)", "train.lr 0.01 (paper 0.001)"]
    import json

    summaries = [json.loads(p.read_text()) for p in sorted(vandeven_runs.glob("finetune_*/metrics.json"))]
    assert finetune["ours"] == pytest.approx(sum(100 * s["metrics"]["acc"] for s in summaries) / 2)


def test_report_against_prints_the_table_and_flags_the_protocol(vandeven_runs, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert report_command([str(vandeven_runs), "--against", "vandeven2019", "--format", "console"]) == 0
    out = capsys.readouterr().out
    assert "against vandeven2019" in out and "87.19 (0.94) *" in out and "98.64 (0.22) *" in out
    assert "DIFFERS: dataset split_mnist5k (paper split_mnist)" in out
    assert "not verified against it" in out


def test_buzzega_task_il_column_is_the_task_aware_accuracy_of_class_il_runs(tmp_path):
    """The paper's Task-IL column is its Class-IL model masked: a class-IL run's
    metrics_task_aware; the buffer picks the row (200 or 500)."""
    from tests.conftest import run

    s = run(tmp_path, "dataset=split_digits", "dataset.max_train_per_class=10", "train.epochs=1", "strategy=er",
            "strategy.memory_size=500", "backbone.hidden_sizes=[100,100]", "train.batch_size=10",
            "train.momentum=0.0", "checkpoint=false")
    rows = {r["metric"]: r for r in against(find_runs(tmp_path), "buzzega2020")}
    assert rows["acc"]["paper"] == 86.12 and rows["acc_task_aware"]["paper"] == 99.04
    assert rows["acc_task_aware"]["ours"] == pytest.approx(100 * s["metrics_task_aware"]["acc"])
    assert rows["acc"]["differences"] == ["dataset split_digits (paper split_mnist)"]
