"""Result writers: accuracy matrices as CSV, metrics as JSON, readable Markdown, console tables.

Every file is written atomically (to a temporary file in the same folder, then
renamed), so a killed run never leaves a half-written result.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

METRIC_LABELS = {
    "acc": "ACC (final average accuracy)",
    "bwt": "BWT (backward transfer)",
    "fwt": "FWT (forward transfer)",
    "forgetting": "Forgetting",
    "avg_inc_acc": "Average incremental accuracy",
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode of any other new file
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def matrix_csv(R: np.ndarray) -> str:
    """An accuracy matrix as CSV: a `row` column of `after_task_i` labels, then `task_j`
    columns, values with 6 decimals, NaN as an empty field (what pandas' `to_csv` with
    `float_format="%.6f"` writes, without importing pandas on a run's path: ~0.25 s)."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    lines = [",".join(["row", *(f"task_{j}" for j in range(R.shape[1]))])]
    for i in range(T):
        lines.append(",".join([f"after_task_{i}", *("" if math.isnan(v) else "%.6f" % v for v in R[i])]))
    return "\n".join(lines) + "\n"


def read_matrix(path: Path) -> np.ndarray:
    import pandas as pd

    return pd.read_csv(path, index_col=0).to_numpy(dtype=float)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _fmt(v: Optional[float], pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.2f}" if pct else f"{v:.3f}"


def markdown_report(summary: dict, R: np.ndarray, R_task_aware: Optional[np.ndarray]) -> str:
    out = io.StringIO()
    out.write(
        f"# {summary['strategy']} on {summary['dataset']} ({summary['scenario']}, seed {summary['seed']})\n\n"
    )
    out.write("## Accuracy matrix (%): row i = after training task i, column j = task j\n\n")
    out.write(_md_matrix(R))
    if R_task_aware is not None:
        out.write("\n## Task-aware accuracy matrix (%): prediction restricted to the task's classes\n\n")
        out.write(_md_matrix(R_task_aware))
    out.write("\n## Metrics\n\n| metric | value |\n|---|---|\n")
    for key, label in METRIC_LABELS.items():
        out.write(f"| {label} | {_fmt(summary['metrics'].get(key))} |\n")
    if R_task_aware is not None:
        for key, label in METRIC_LABELS.items():
            out.write(f"| {label}, task-aware | {_fmt(summary['metrics_task_aware'].get(key))} |\n")
    t = summary["timing"]
    out.write("\n## Time (s)\n\n| task | train | eval |\n|---|---|---|\n")
    for i, (tr, ev) in enumerate(zip(t["train_s"], t["eval_s"])):
        out.write(f"| {i} | {tr:.3f} | {ev:.3f} |\n")
    out.write(f"| total | {sum(t['train_s']):.3f} | {sum(t['eval_s']):.3f} |\n")
    logs = summary.get("train_log") or []
    if any("parameters_total" in (log.get("strategy") or {}) for log in logs):
        # model size per task (growth and masks are the price of parameter-isolation methods)
        # and, where a strategy reports it, the storage each task adds (Piggyback's count: masks at 1 bit a weight)
        storage = any("storage_bytes_per_task" in (log.get("strategy") or {}) for log in logs)
        out.write("\n## Model size after each task\n\n| task | parameters | used by the task | mask bytes |"
                  + (" bytes the task added | vs a float32 copy |" if storage else "") + "\n"
                  + "|---" * (6 if storage else 4) + "|\n")
        for i, log in enumerate(logs):
            info = log.get("strategy") or {}
            per_task = info.get("parameters_per_task") or ["n/a"]
            row = f"| {i} | {info.get('parameters_total', log.get('parameters'))} | {per_task[-1]} | {info.get('mask_bytes', 0)} |"
            if storage:
                added = info.get("storage_bytes_per_task") or ["n/a"]
                ratio = info.get("storage_vs_copy_per_task") or ["n/a"]
                row += f" {added[-1]} | {ratio[-1]} |"
            out.write(row + "\n")
    return out.getvalue()


def _md_matrix(R: np.ndarray) -> str:
    T = R.shape[0]
    lines = ["| after task | " + " | ".join(f"task {j}" for j in range(T)) + " |"]
    lines.append("|---" * (T + 1) + "|")
    for i in range(T):
        lines.append(f"| {i} | " + " | ".join(_fmt(v) for v in R[i]) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: Path, summary: dict, R: np.ndarray, R_task_aware: Optional[np.ndarray]
) -> None:
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "accuracy_matrix.csv", matrix_csv(R))
    if R_task_aware is not None:
        atomic_write_text(
            out_dir / "accuracy_matrix_task_aware.csv", matrix_csv(R_task_aware)
        )
    atomic_write_text(out_dir / "results.md", markdown_report(summary, R, R_task_aware))
    # metrics.json last: its presence marks a finished run.
    atomic_write_text(out_dir / "metrics.json", json.dumps(_json_safe(summary), indent=2) + "\n")


def print_table(console: Any, table: Any) -> None:
    """Print a rich table without cutting a header or a cell short.

    Rich shrinks a table that is wider than the console and ends the text that does not
    fit with an ellipsis; piped output (a file, `less`, `grep`) gets rich's default width
    of 80 columns. So: piped or redirected output is printed at the table's natural width
    (one line per row); a terminal gets its own width when every word fits whole in it
    (cells then wrap between words), else the narrowest width that keeps each word whole
    (the terminal wraps the long lines). Text never ends in an ellipsis: a word that must
    be broken is folded onto the next line instead.
    """
    from rich.measure import Measurement

    wide = console.options.update_width(1_000_000)
    for column in table.columns:
        column.overflow = "fold"
        if console.is_terminal:  # rich narrows columns below their longest word; keep words whole
            cells = [column.header, *column.cells]
            column.min_width = max(Measurement.get(console, wide, cell).minimum for cell in cells)
    size = Measurement.get(console, wide, table)
    table.width = max(size.minimum, min(size.maximum, console.width)) if console.is_terminal else size.maximum
    console.print(table, crop=False)


def print_line(console: Any, text: str) -> None:
    """A line of text; piped output keeps it on one line (paths stay whole for copy and grep)."""
    console.print(text, soft_wrap=not console.is_terminal, highlight=False)


def print_summary(console, summary: dict, R: np.ndarray, R_task_aware: Optional[np.ndarray]) -> None:
    from rich.table import Table

    def matrix_table(title: str, M: np.ndarray) -> Table:
        T = M.shape[0]
        table = Table(title=title, title_justify="left")
        table.add_column("after task", justify="right")
        for j in range(T):
            table.add_column(f"task {j}", justify="right")
        for i in range(T):
            # above the diagonal: task j not trained yet (dim, so it does not read as forgetting)
            table.add_row(str(i), *[_fmt(v) if j <= i else f"[dim]{_fmt(v)}[/]" for j, v in enumerate(M[i])])
        return table

    print_table(console, matrix_table("Accuracy matrix (%)  (dim: task not trained yet)", R))
    if R_task_aware is not None:
        print_table(console, matrix_table("Task-aware accuracy matrix (%)  (dim: task not trained yet)", R_task_aware))
    metrics = Table(title="Metrics (%)", title_justify="left")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    if R_task_aware is not None:
        metrics.add_column("task-aware", justify="right")
    for key, label in METRIC_LABELS.items():
        row = [label, _fmt(summary["metrics"].get(key))]
        if R_task_aware is not None:
            row.append(_fmt(summary["metrics_task_aware"].get(key)))
        metrics.add_row(*row)
    print_table(console, metrics)
    t = summary["timing"]
    from rich.markup import escape

    print_line(
        console,
        f"train {sum(t['train_s']):.2f} s, eval {sum(t['eval_s']):.2f} s, total {t['total_s']:.2f} s"
        f"  ->  {escape(str(summary['output_dir']))}",
    )
