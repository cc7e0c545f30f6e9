"""`clbench report` on folders of real runs: aggregates checked against the runs' own files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cl_bench import CLBenchError
from cl_bench.report import build_report, report_command
from cl_bench.results import read_matrix
from cl_bench.sweep import write_failure
from tests.conftest import run

STRATEGIES = ("finetune", "joint")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """finetune and joint x 2 seeds on the smoke protocol, plus one failed and one unfinished run."""
    root = tmp_path_factory.mktemp("runs")
    for strategy in STRATEGIES:
        for seed in SEEDS:
            run(root, "experiment=smoke", f"strategy={strategy}", f"seed={seed}", name=f"{strategy}_{seed}")
    failed = root / "failed"
    failed.mkdir()
    write_failure(failed, CLBenchError("train.lr must be positive, got -1.0"))
    unfinished = root / "unfinished"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text("seed: 5\n")
    (unfinished / ".hydra" / "overrides.yaml").write_text("- seed=5\n")
    shutil.copy(root / "finetune_0" / "checkpoint.pt", unfinished / "checkpoint.pt")
    return root


def expected_from_files(folder: Path) -> dict:
    """The metrics recomputed from the run's accuracy_matrix.csv (and the random-init row)."""
    R = read_matrix(folder / "accuracy_matrix.csv")
    b = np.asarray(json.loads((folder / "metrics.json").read_text())["random_init_accuracy"])
    T = len(R)
    return {
        "acc": R[-1].mean(),
        "bwt": np.mean([R[-1, j] - R[j, j] for j in range(T - 1)]),
        "fwt": np.mean([R[j - 1, j] - b[j] for j in range(1, T)]),
        "forgetting": np.mean([max(R[: T - 1, j] - R[-1, j]) for j in range(T - 1)]),
        "diag": np.diag(R),
    }


def test_table_means_and_stds_match_the_runs_files(runs_dir):
    report = build_report(runs_dir)
    assert sorted(report.table["strategy"]) == list(STRATEGIES)
    for strategy in STRATEGIES:
        per_seed = [expected_from_files(runs_dir / f"{strategy}_{s}") for s in SEEDS]
        row = report.table[report.table["strategy"] == strategy].iloc[0]
        assert row["n"] == 2 and row["seeds"] == "0 1"
        for m in ("acc", "bwt", "fwt", "forgetting"):
            values = [e[m] for e in per_seed]
            assert row[f"{m}_mean"] == pytest.approx(np.mean(values), abs=1e-6), m
            assert row[f"{m}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-6), m
        params = json.loads((runs_dir / f"{strategy}_0" / "metrics.json").read_text())["parameters"]
        assert row["parameters_mean"] == params and row["parameters_std"] == 0


def test_intransigence_is_joints_diagonal_minus_the_methods(runs_dir):
    report = build_report(runs_dir, metrics=["acc", "intransigence", "intransigence_last"])
    rows = {r["strategy"]: r for _, r in report.table.iterrows()}
    assert rows["joint"]["intransigence_mean"] == 0.0
    gaps = []
    for s in SEEDS:
        joint, ft = expected_from_files(runs_dir / f"joint_{s}"), expected_from_files(runs_dir / f"finetune_{s}")
        gaps.append(joint["diag"] - ft["diag"])
    assert rows["finetune"]["intransigence_mean"] == pytest.approx(np.mean([g.mean() for g in gaps]), abs=1e-6)
    assert rows["finetune"]["intransigence_last_mean"] == pytest.approx(np.mean([g[-1] for g in gaps]), abs=1e-6)
    assert not np.isclose(rows["finetune"]["intransigence_mean"], 0.0)


def test_failed_and_unfinished_runs_are_listed_apart_not_averaged(runs_dir):
    report = build_report(runs_dir)
    status = {p.path.name: p for p in report.problems}
    assert status["failed"].status == "failed" and "train.lr must be positive" in status["failed"].reason
    assert status["unfinished"].status == "unfinished" and "5 task(s) done" in status["unfinished"].reason
    assert report.table["n"].sum() == 4  # the 4 complete runs only


def test_by_and_metrics_choose_grouping_and_columns(runs_dir):
    pooled = build_report(runs_dir, by=["scenario"], metrics=["acc"])
    assert list(pooled.table["n"]) == [4]
    assert [c for c in pooled.table.columns if c.endswith("_mean")] == ["acc_mean"]
    assert pooled.warnings  # two runs per seed in the one group: the user is told
    with pytest.raises(CLBenchError, match="unknown metric 'accuracy'"):
        build_report(runs_dir, metrics=["accuracy"])
    with pytest.raises(CLBenchError, match="unknown --by key 'strategy.nope'"):
        build_report(runs_dir, by=["strategy.nope"])


def test_report_command_writes_every_format_and_plots(runs_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")
    out = tmp_path / "rep"
    assert report_command([str(runs_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ACC (%)" in printed and "±" in printed and "failed" in printed and "unfinished" in printed
    csv = pd.read_csv(out / "report.csv")
    assert {"acc_mean", "acc_std", "bwt_mean", "forgetting_mean", "intransigence_mean", "n"} <= set(csv.columns)
    md = (out / "report.md").read_text()
    assert "| strategy |" in md and " ± " in md and "Failed or unfinished" in md
    tex = (out / "report.tex").read_text()
    assert "\\toprule" in tex and "$\\pm$" in tex
    for stem in ("heatmaps_split_digits_class_il", "curves_split_digits_class_il"):
        png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert pdf.read_bytes()[:5] == b"%PDF-"


def test_eval_split_val_reads_the_validation_split_only(tmp_path):
    summary = run(tmp_path, "experiment=smoke", "eval_split=val", "dataset.val_fraction=0.2", name="val")
    assert summary["eval_split"] == "val"
    # 20 training samples per class, 2 classes per task: 8 held out per task. Every accuracy
    # is then a multiple of 1/8, which the ~108-sample test sets would not give.
    R = np.asarray(summary["accuracy_matrix"])
    assert np.allclose(R * 8, np.round(R * 8))
    with pytest.raises(CLBenchError, match="dataset.val_fraction"):
        run(tmp_path, "experiment=smoke", "eval_split=val", name="noval")


def test_grouping_keys_are_those_that_vary_and_are_not_implied():
    from cl_bench.report import RunRecord, varying_keys

    def rec(strategy, seed, **extra):
        keys = {"strategy": strategy, "seed": seed, "dataset": "d", "scenario": "class_il", "train.lr": 0.05,
                "output_dir": f"/runs/{strategy}{seed}", **extra}
        return RunRecord(Path("."), "completed", {}, keys)

    runs = [rec("finetune", s) for s in (0, 1)] + [rec("ewc", s, **{"strategy.ewc_lambda": lam})
                                                    for s in (0, 1) for lam in (10.0, 100.0)]
    # ewc_lambda varies within ewc: a column; seed and output_dir never are.
    assert varying_keys(runs) == ["strategy", "strategy.ewc_lambda"]
    # A key only ewc has, with one value, is implied by the strategy: no column.
    assert varying_keys([rec("finetune", 0), rec("ewc", 0, **{"strategy.ewc_lambda": 10.0})]) == ["strategy"]


# ----- views, forward transfer, outputs, console, heatmaps ----------------------------------------
@pytest.fixture(scope="module")
def mixed_dir(runs_dir, tmp_path_factory) -> Path:
    """The class-IL finetune and joint runs of `runs_dir` plus task-IL finetune runs (2 seeds each)."""
    root = tmp_path_factory.mktemp("mixed")
    for strategy in STRATEGIES:
        for seed in SEEDS:
            shutil.copytree(runs_dir / f"{strategy}_{seed}", root / f"{strategy}_{seed}")
    for seed in SEEDS:
        run(root, "experiment=smoke", "strategy=finetune", "scenario=task_il", f"seed={seed}", name=f"til_{seed}")
    return root


def _summary(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def _row(report, strategy: str, scenario: str = "class_il"):
    table = report.table[report.table["scenario"] == scenario]
    if "strategy" in report.group_keys[("split_digits", scenario)]:
        table = table[table["strategy"] == strategy]
    assert len(table) == 1
    return table.iloc[0]


def test_task_aware_view_shows_metrics_task_aware_and_task_il_runs_their_own(mixed_dir):
    names = ["acc", "bwt", "fwt", "forgetting", "avg_inc_acc"]
    report = build_report(mixed_dir, metrics=names + ["la", "intransigence"], view="task_aware")
    assert report.view == "task_aware" and set(report.table["view"]) == {"task_aware"}
    for strategy in STRATEGIES:
        row = _row(report, strategy)
        aware = [_summary(mixed_dir / f"{strategy}_{s}")["metrics_task_aware"] for s in SEEDS]
        own = [_summary(mixed_dir / f"{strategy}_{s}")["metrics"] for s in SEEDS]
        for m in names:
            assert row[f"{m}_mean"] == pytest.approx(np.mean([a[m] for a in aware]), abs=1e-9), m
            assert row[f"{m}_std"] == pytest.approx(np.std([a[m] for a in aware], ddof=1), abs=1e-9), m
        assert row["acc_mean"] != pytest.approx(np.mean([o["acc"] for o in own]))  # a different view indeed
    # the matrices (plots, learning accuracy, intransigence) are the task-aware ones too
    runs = report.runs.set_index("path")
    aware_R = {s: {seed: np.asarray(_summary(mixed_dir / f"{s}_{seed}")["accuracy_matrix_task_aware"])
                   for seed in SEEDS} for s in STRATEGIES}
    for strategy in STRATEGIES:
        for seed in SEEDS:
            matrix = runs.loc[str(mixed_dir / f"{strategy}_{seed}"), "matrix"]
            np.testing.assert_array_equal(matrix, aware_R[strategy][seed])
    ft = _row(report, "finetune")
    assert ft["la_mean"] == pytest.approx(np.mean([np.diag(aware_R["finetune"][s]).mean() for s in SEEDS]))
    gaps = [np.diag(aware_R["joint"][s]) - np.diag(aware_R["finetune"][s]) for s in SEEDS]
    assert ft["intransigence_mean"] == pytest.approx(np.mean([g.mean() for g in gaps]))
    # task-IL has one view: its own numbers, with a note saying so
    til = _row(report, "finetune", "task_il")
    own = [_summary(mixed_dir / f"til_{s}")["metrics"] for s in SEEDS]
    assert til["acc_mean"] == pytest.approx(np.mean([o["acc"] for o in own]))
    assert any("task-IL runs have one view" in n for n in report.notes[("split_digits", "task_il")])
    assert any("Task-aware view" in n for n in report.notes[("split_digits", "class_il")])


def test_task_aware_view_lists_runs_without_the_matrix_apart(mixed_dir, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(mixed_dir / "finetune_0", root / "old")
    shutil.copytree(mixed_dir / "finetune_1", root / "new")
    summary = _summary(root / "old")
    del summary["accuracy_matrix_task_aware"]
    (root / "old" / "metrics.json").write_text(json.dumps(summary))
    report = build_report(root, view="task_aware")
    assert [p.path.name for p in report.problems] == ["old"]
    assert "no task-aware accuracy matrix" in report.problems[0].reason
    assert list(report.table["n"]) == [1]
    assert list(build_report(root).table["n"]) == [2]  # the default view reads both
    with pytest.raises(CLBenchError, match="invalid choice: 'taskaware'"):
        report_command([str(root), "--view", "taskaware"])


def test_learning_accuracy_and_transfer_vs_reference_by_hand():
    from cl_bench.metrics import learning_accuracy, transfer_vs_reference

    R = np.array([[0.9, 0.0, 0.0], [0.5, 0.8, 0.0], [0.4, 0.6, 0.7]])
    ref = np.array([[0.9, 0.0, 0.0], [0.2, 0.9, 0.0], [0.1, 0.2, 0.95]])
    assert learning_accuracy(R) == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert transfer_vs_reference(R, ref) == pytest.approx(((0.8 - 0.9) + (0.7 - 0.95)) / 2)
    assert transfer_vs_reference(R, R) == 0.0
    assert np.isnan(transfer_vs_reference([[0.5]], [[0.4]]))


def test_class_il_fwt_is_explained_and_forward_transfer_vs_finetune_is_shown(runs_dir, tmp_path):
    report = build_report(runs_dir)
    assert {"fwt", "fwt_finetune", "la"} <= set(report.metrics)
    files = {s: {seed: runs_dir / f"{s}_{seed}" for seed in SEEDS} for s in STRATEGIES}
    R = {s: {seed: read_matrix(f / "accuracy_matrix.csv") for seed, f in v.items()} for s, v in files.items()}
    # FWT is the same for every method: ~ -mean b_j, as the note says, with its two terms
    fwts = [_row(report, s)["fwt_mean"] for s in STRATEGIES]
    b = np.mean([np.mean(_summary(files[s][seed])["random_init_accuracy"][1:]) for s in STRATEGIES for seed in SEEDS])
    seen = np.mean([np.mean([R[s][seed][j - 1, j] for j in range(1, 5)]) for s in STRATEGIES for seed in SEEDS])
    assert seen < 0.02 and fwts == pytest.approx([seen - b] * 2, abs=1e-6)  # the csv holds 6 decimals
    note = next(n for n in report.notes[("split_digits", "class_il")] if n.startswith("FWT"))
    assert "does not tell methods apart" in note and "Lopez-Paz & Ranzato 2017" in note
    assert f"mean R[j-1, j] = {100 * seen:.1f}%" in note and f"mean b_j = {100 * b:.1f}%" in note
    # FWT vs. finetune: mean_{k>0} R[k, k] - finetune's R[k, k], same seed
    joint = _row(report, "joint")
    per_seed = [np.mean(np.diag(R["joint"][s])[1:] - np.diag(R["finetune"][s])[1:]) for s in SEEDS]
    assert joint["fwt_finetune_mean"] == pytest.approx(np.mean(per_seed), abs=1e-6)
    assert _row(report, "finetune")["fwt_finetune_mean"] == 0.0
    assert joint["la_mean"] == pytest.approx(np.mean([np.diag(R["joint"][s]).mean() for s in SEEDS]), abs=1e-6)
    # the note travels with the table into every format
    out = tmp_path / "rep"
    report_command([str(runs_dir), "--out", str(out), "--format", "markdown,latex"])
    assert "does not tell methods apart" in (out / "report.md").read_text()
    assert "does not tell methods apart" in (out / "report.tex").read_text()
    assert "Ranzato 2017) is mean\\_j R[j-1, j] - b\\_j" in (out / "report.tex").read_text()
    # without finetune runs the column is empty and the report says why when it is asked for
    only_joint = tmp_path / "joint_only"
    for seed in SEEDS:
        shutil.copytree(files["joint"][seed], only_joint / f"joint_{seed}")
    alone = build_report(only_joint, metrics=["acc", "fwt", "fwt_finetune"])
    assert np.isnan(alone.table["fwt_finetune_mean"]).all()
    assert any("FWT vs. finetune is empty: no finetune run" in n for n in alone.notes[("split_digits", "class_il")])
    assert "fwt_finetune" not in build_report(only_joint).metrics  # not a default column when empty


def _listing(folder: Path) -> set:
    return {p.name for p in folder.iterdir()}


def test_formats_write_only_what_is_asked_and_remove_their_stale_files(runs_dir, tmp_path, capsys):
    out = tmp_path / "rep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "heatmaps_mine.png").write_text("mine too: named like a report file, never written by one")
    assert report_command([str(runs_dir), "--out", str(out)]) == 0
    first = _listing(out)
    assert {"report.csv", "report.md", "report.tex", "heatmaps_split_digits_class_il.png",
            "curves_split_digits_class_il.pdf", ".clbench_report.json", "notes.txt", "heatmaps_mine.png"} <= first
    assert report_command([str(runs_dir), "--out", str(out), "--format", "console,latex"]) == 0
    assert _listing(out) == {"report.tex", ".clbench_report.json", "notes.txt", "heatmaps_mine.png"}
    assert json.loads((out / ".clbench_report.json").read_text())["files"] == ["report.tex"]
    assert report_command([str(runs_dir), "--out", str(out), "--format", "csv", "--no-plots"]) == 0
    assert _listing(out) == {"report.csv", ".clbench_report.json", "notes.txt", "heatmaps_mine.png"}
    # console only: nothing written, the previous report's files are gone, the user's stay
    assert report_command([str(runs_dir), "--out", str(out), "--format", "console"]) == 0
    assert _listing(out) == {"notes.txt", "heatmaps_mine.png"}
    assert "ACC (%)" in capsys.readouterr().out
    # a manifest naming anything but a report's own file names deletes nothing
    victim = tmp_path / "victim.csv"
    victim.write_text("keep")
    (out / ".clbench_report.json").write_text(json.dumps({"files": ["../victim.csv", "notes.txt", "report.csv"]}))
    assert report_command([str(runs_dir), "--out", str(out), "--format", "markdown"]) == 0
    assert victim.exists() and _listing(out) == {"report.md", ".clbench_report.json", "notes.txt", "heatmaps_mine.png"}
    # the default folders of the two views are apart, and never read as runs
    report_command([str(runs_dir), "--format", "csv", "--view", "task_aware"])
    report_command([str(runs_dir), "--format", "csv"])
    assert (runs_dir / "report_task_aware" / "report.csv").exists() and (runs_dir / "report" / "report.csv").exists()
    assert pd.read_csv(runs_dir / "report_task_aware" / "report.csv")["view"].tolist() == ["task_aware"] * 2
    assert build_report(runs_dir).table["n"].sum() == 4


def _display_strings(report) -> list[str]:
    from cl_bench.report import section_tables

    out = []
    for _, disp in section_tables(report):
        out += list(disp.columns) + [str(v) for v in disp.to_numpy().ravel()]
    return out


ALL_COLUMNS = ["acc", "bwt", "fwt", "fwt_finetune", "forgetting", "la", "intransigence", "intransigence_last",
               "time", "parameters", "memory_mb"]


def test_console_table_is_never_cut_in_a_narrow_or_piped_console(mixed_dir):
    import io

    from rich.console import Console

    from cl_bench.report import print_console

    report = build_report(mixed_dir, metrics=ALL_COLUMNS)
    strings = _display_strings(report)
    assert "Intransigence (last task) (%)" in strings and "FWT vs. finetune (%)" in strings
    # not a terminal (a file, a pipe): every header and cell whole on its line
    piped = io.StringIO()
    print_console(report, Console(width=40, file=piped))
    text = piped.getvalue()
    assert "…" not in text
    for s in strings:
        assert s in text, s
    # a narrow terminal: cells wrap between words, never cut
    tty = io.StringIO()
    print_console(report, Console(width=40, file=tty, force_terminal=True, color_system=None))
    text = tty.getvalue()
    assert "…" not in text
    words = set(text.split())
    for s in strings:
        for word in s.split():
            assert word in words, (s, word)


def test_console_output_of_a_piped_subprocess_is_whole(runs_dir):
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "40", "OMP_NUM_THREADS": "1"}
    for forcing in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(forcing, None)
    proc = subprocess.run([sys.executable, "-m", "cl_bench.cli", "report", str(runs_dir), "--format", "console",
                           "--metrics", ",".join(ALL_COLUMNS)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "…" not in text
    for s in _display_strings(build_report(runs_dir, metrics=ALL_COLUMNS)):
        assert s in text, s
    # the problems table: whole paths and reasons on one line each
    assert str(runs_dir / "unfinished") in text and "5 task(s) done, resumable from checkpoint.pt" in text
    assert "train.lr must be positive, got -1.0" in text


def test_heatmap_masks_and_hatches_cells_of_tasks_not_trained_yet():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from cl_bench import plots

    T = 4
    R = np.tril(np.full((T, T), 0.8)) + np.triu(np.full((T, T), 0.1), k=1)
    R[3, 0] = 0.05  # forgotten: below the diagonal, shown in colour
    fig = plots.heatmap_figure(("d", "class_il"), [("finetune", [R, R]), ("er", [R])])
    try:
        for ax in fig.axes[:2]:
            data = ax.images[0].get_array()
            np.testing.assert_array_equal(np.ma.getmaskarray(data), np.triu(np.ones((T, T), bool), k=1))
            np.testing.assert_allclose(data.filled(np.nan)[np.tril_indices(T)], 100 * R[np.tril_indices(T)])
            assert ax.images[0].cmap.get_bad() == pytest.approx(to_rgba(plots.NOT_TRAINED_FACE))
            hatched = {(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches if p.get_hatch()}
            assert hatched == {(j, i) for i in range(T) for j in range(T) if j > i}
            # every cell's value is still printed, the not-trained ones in grey
            texts = {(t.get_position()[0], t.get_position()[1]): t for t in ax.texts}
            assert texts[(1, 0)].get_text() == "10" and to_rgba(texts[(1, 0)].get_color()) != to_rgba("white")
            assert texts[(0, 3)].get_text() == "5" and texts[(0, 3)].get_color() == "white"
        legend_texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        assert plots.NOT_TRAINED_LABEL in legend_texts
        assert any("forgotten" in legend.get_title().get_text() for legend in fig.legends)
    finally:
        plt.close(fig)


def test_a_runs_console_summary_is_never_cut_either(runs_dir):
    import io

    from rich.console import Console

    from cl_bench.results import print_summary

    summary = _summary(runs_dir / "finetune_0")
    T = 12  # wider than 40 columns in any layout
    R = np.tril(np.full((T, T), 0.876543))
    summary["output_dir"] = "/a/long/path/" + "x" * 60
    piped = Console(width=40, file=io.StringIO())
    tty = Console(width=40, file=io.StringIO(), force_terminal=True, color_system=None)
    for console in (piped, tty):
        print_summary(console, summary, R, R)
        text = console.file.getvalue()
        assert "…" not in text
        assert text.count("87.65") == 2 * T * (T + 1) // 2  # every cell of both matrices, whole
    text = piped.file.getvalue()
    assert all(f"task {j}" in text for j in range(T)) and "ACC (final average accuracy)" in text
    assert summary["output_dir"] in text  # on one line: the path can be copied


def test_a_report_that_fails_half_way_leaves_no_file_the_next_one_cannot_remove(runs_dir, tmp_path, monkeypatch):
    from cl_bench import plots
    from cl_bench.report import write_outputs

    out = tmp_path / "rep"
    report = build_report(runs_dir)
    write_outputs(report, out, ["csv"])

    def crash(report, out):
        (out / "heatmaps_split_digits_class_il.png").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "write_plots", crash)
    with pytest.raises(RuntimeError):
        write_outputs(report, out, ["markdown", "plots"])
    monkeypatch.undo()
    assert write_outputs(report, out, ["latex"]) == [out / "report.tex"]
    assert _listing(out) == {"report.tex", ".clbench_report.json"}


def test_the_accuracy_matrix_csv_is_what_pandas_writes_and_a_run_does_not_import_pandas(tmp_path):
    """`matrix_csv` writes the bytes pandas' `to_csv(float_format="%.6f")` wrote before (NaN
    empty, inf, -0.0, rounding), which `read_matrix` reads back; a whole run leaves pandas
    (and the report's other libraries) unimported."""
    import subprocess
    import sys

    from cl_bench.results import matrix_csv

    rng = np.random.default_rng(0)
    for R in (rng.random((5, 5)), np.array([[np.nan, -0.0, 1.0], [float("inf"), 1e-9, 0.9999995], [2.5e-7, 1 / 3, 0.1]])):
        frame = pd.DataFrame(R, index=pd.Index([f"after_task_{i}" for i in range(len(R))], name="row"),
                             columns=[f"task_{j}" for j in range(R.shape[1])])
        assert matrix_csv(R) == frame.to_csv(float_format="%.6f")
        (tmp_path / "m.csv").write_text(matrix_csv(R))
        np.testing.assert_array_equal(read_matrix(tmp_path / "m.csv"), np.round(R, 6))
    code = ("import sys; from cl_bench.cli import main; "
            f"main(['run', 'experiment=smoke', 'hydra.run.dir={tmp_path / 'run'}']); "
            "print(sorted(m for m in ('pandas', 'matplotlib', 'sklearn', 'scipy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr[-2000:]
