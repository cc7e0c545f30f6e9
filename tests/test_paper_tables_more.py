"""The paper tables added beside vandeven2019/buzzega2020 (cl_bench/paper_tables/): hsu2018,
chaudhry2019agem, mallya2018piggyback. Each parses with the loader `clbench report --against`
uses, has one row per key and values in the metric's range, and `--against` puts a folder's runs
beside it."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest

from cl_bench import paper_tables
from cl_bench.report import _overrides, against, find_runs, report_command
from tests.conftest import compose_cfg, conf_options

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW = ("chaudhry2019agem", "hsu2018", "mallya2018packnet", "mallya2018piggyback")
SCENARIOS = ("class_il", "task_il", "domain_il")
# metric -> its range in percent; `error`/`error_top5` are top-1/top-5 errors (the PackNet and Piggyback
# READMEs), `forgetting` is A-GEM's F_T x 100
METRICS = {"acc": (0, 100), "acc_task_aware": (0, 100), "forgetting": (0, 100), "error": (0, 100),
           "error_top5": (0, 100)}
# tables whose rows are per-task errors of a dataset sequence, which no summary metric of a run matches
PER_TASK = ("mallya2018packnet", "mallya2018piggyback")


def key(row: dict) -> tuple:
    """What tells two rows of one table apart: the paper's table (and row), the stream, the method,
    the metric and the protocol a run must follow to be compared with it."""
    return row["table"], row["dataset"], row["scenario"], row["method"], row["metric"], row["protocol_overrides"]


def test_the_new_tables_are_shipped():
    assert set(NEW) <= set(paper_tables.available())


@pytest.mark.parametrize("name", NEW)
def test_table_parses_with_unique_keys_and_values_in_range(name):
    rows = paper_tables.load(name)
    assert rows and all(set(paper_tables.COLUMNS) <= set(row) for row in rows)
    keys = [key(row) for row in rows]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1][:3]
    strategies = set(conf_options("strategy"))
    for row in rows:
        assert row["method"] in strategies and row["scenario"] in SCENARIOS, row
        low, high = METRICS[row["metric"]]
        assert low <= row["value"] <= high, row
        assert row["spread"] is None or row["spread"] >= 0
        assert row["paper"] and row["table"] and row["protocol"] and row["version"] == "1"
        # nothing here was read in the paper's own text: the files say where each number comes from
        assert row["verified"] is False


@pytest.mark.parametrize("name", NEW)
def test_each_file_names_its_source_in_its_header(name):
    text = files("cl_bench.paper_tables").joinpath(f"{name}.csv").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and any("github.com/" in line for line in header) and any("verified=false" in line for line in header)


@pytest.mark.parametrize("name", NEW)
def test_protocol_overrides_compose_as_a_clbench_run(name):
    """Rows with overrides name their dataset and compose (a misspelled key would not). The
    PackNet/Piggyback rows are per-task errors of a dataset sequence (dataset=sequence); only the
    pretrained network's own ImageNet rows and VGG-16 BN's (no such backbone here) have no overrides."""
    runs = set()
    for row in paper_tables.load(name):
        overrides = _overrides(row)
        if not overrides:
            assert name in PER_TASK and (row["dataset"] == "imagenet" or "VGG-16 BN" in row["table"]), row
            continue
        assert overrides["dataset"] == ("sequence" if name in PER_TASK else row["dataset"])
        runs.add((row["method"], row["scenario"], row["protocol_overrides"]))
    for method, scenario, protocol in sorted(runs):  # one composition per run the table describes
        cfg = compose_cfg(f"strategy={method}", f"scenario={scenario}", *protocol.split())
        assert cfg.dataset._target_
    assert runs or name in PER_TASK


def test_spot_values_transcribed_from_the_sources():
    """A few cells, checked once more against the sources named in the headers."""
    hsu = {(r["table"], r["scenario"]): r for r in paper_tables.load("hsu2018")}
    assert hsu[("Table 2 (Naive rehearsal-C)", "class_il")]["value"] == 95.59
    assert hsu[("Table 2 (LwF)", "domain_il")]["spread"] == 1.26
    agem = {(r["table"], r["dataset"], r["metric"]): r for r in paper_tables.load("chaudhry2019agem")}
    assert agem[("Table 1 (A-GEM)", "permuted_mnist", "acc")]["value"] == 89.12
    assert agem[("Table 1 (A-GEM)", "split_cifar100_20", "forgetting")]["value"] == 7.9
    assert agem[("Table 1 (A-GEM)", "cub200", "acc")]["value"] == 62.02
    piggy = {(r["table"], r["dataset"]): r for r in paper_tables.load("mallya2018piggyback")}
    assert piggy[("authors' README (VGG-16 masks)", "wikiart")]["value"] == 29.8
    pack = {(r["table"], r["dataset"], r["metric"]): r for r in paper_tables.load("mallya2018packnet")}
    assert pack[("authors' README (ResNet-50)", "imagenet", "error_top5")]["value"] == 7.17
    assert pack[("authors' README (VGG-16 LwF)", "cub200", "error")]["method"] == "lwf"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs: finetune with Adam in class-IL (Hsu et al.'s "Adam" row) and A-GEM on permuted
    MNIST in domain-IL (A-GEM's MNIST rows), on real-format MNIST files."""
    from tests.conftest import run
    from tests.real_format import prepare

    root = tmp_path_factory.mktemp("against_more")
    run(root, "dataset=split_digits", "dataset.max_train_per_class=10", "train.epochs=1", "strategy=finetune",
        "train.optimizer=adam", "train.lr=0.001", "backbone.hidden_sizes=[400,400]", "checkpoint=false", name="adam")
    data = prepare("permuted_mnist", tmp_path_factory.mktemp("mnist"))
    run(root, "dataset=permuted_mnist", *data, "dataset.num_tasks=2", "dataset.max_train_per_class=10",
        "train.epochs=1", "strategy=agem", "strategy.memory_size=20", "train.optimizer=sgd", "train.batch_size=10",
        "checkpoint=false", name="agem")
    return root


def test_against_hsu2018_picks_the_row_whose_optimizer_the_run_used(runs):
    rows = [r for r in against(find_runs(runs), "hsu2018") if r["method"] == "finetune"]
    assert len(rows) == 1
    row = rows[0]
    # Adam lr 0.001 matches the paper's "Adam" row (19.71), not its "SGD" one (19.46)
    assert row["scenario"] == "class_il" and row["paper"] == 19.71 and row["paper_spread"] == 0.08
    assert not any(d.startswith(("train.optimizer", "train.lr")) for d in row["differences"])
    assert "dataset split_digits (paper split_mnist)" in row["differences"]
    summary = json.loads((runs / "adam" / "metrics.json").read_text())
    assert row["ours"] == pytest.approx(100 * summary["metrics"]["acc"])


def test_against_agem_compares_accuracy_and_forgetting(runs):
    rows = {r["metric"]: r for r in against(find_runs(runs), "chaudhry2019agem") if r["method"] == "agem"}
    assert set(rows) == {"acc", "forgetting"}
    assert rows["acc"]["paper"] == 89.12 and rows["forgetting"]["paper"] == 6.96
    summary = json.loads((runs / "agem" / "metrics.json").read_text())
    assert rows["forgetting"]["ours"] == pytest.approx(100 * summary["metrics"]["forgetting"])
    assert rows["acc"]["scenario"] == "domain_il"
    assert "dataset.num_tasks 2 (paper 17)" in rows["acc"]["differences"]
    assert all(r["verified"] is False for r in rows.values())


@pytest.mark.parametrize("name", NEW)
def test_report_against_prints_each_new_table(runs, name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert report_command([str(runs), "--against", name, "--format", "console"]) == 0
    out = capsys.readouterr().out
    if name in PER_TASK:  # no packnet/piggyback run in the folder
        assert f"no run in this folder has a row in paper table {name}" in out
    else:
        assert f"against {name}" in out and "not verified against it" in out
