"""`clbench report`: a folder of runs -> the comparison table a paper prints.

Every run folder below the given path is read: complete runs (`metrics.json`, with the
run's composed config inside) are aggregated; failed runs (`failed.json`, written by the
app) and unfinished ones (Hydra's `.hydra/` but no results: killed, preempted, running)
are listed apart and never averaged in.

Rows are grouped by the config keys that differ across the complete runs other than the
seed (and keys that cannot change results: output paths, progress, resume, threads), in
sections per (dataset, scenario); each cell is the mean ± sample std (ddof=1) over the
runs of the group, normally one per seed, with `n` the number of runs.

Intransigence (Chaudhry et al. 2018, RWalk, Sec. 4): I_k = a*_k - a_{k,k}, where a*_k
is the accuracy on task k of a reference trained on the data of all tasks up to k (the
`joint` strategy's R[k, k]) and a_{k,k} is the method's accuracy on task k right after
learning it. The paper tabulates I at the last task; `intransigence` here is the mean of
I_k over all tasks and `intransigence_last` the last one. It is computed per run against
the `joint` run(s) of the same stream (dataset, dataset keys, scenario, eval split) and
seed in the folder, and left empty when there is none.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from cl_bench import CLBenchError
from cl_bench.sweep import FAILED_FILE, METRICS_FILE

# name -> (column label, kind); kind decides the display format.
METRICS: dict[str, tuple[str, str]] = {
    "acc": ("ACC", "pct"),
    "bwt": ("BWT", "pct"),
    "fwt": ("FWT", "pct"),
    "forgetting": ("Forgetting", "pct"),
    "avg_inc_acc": ("Avg. inc. ACC", "pct"),
    "intransigence": ("Intransigence", "pct"),
    "intransigence_last": ("Intransigence (last task)", "pct"),
    "time": ("Time (s)", "seconds"),
    "train_time": ("Train time (s)", "seconds"),
    "parameters": ("Parameters", "count"),
    "memory": ("Memory (samples)", "count"),
    "memory_mb": ("Memory (MB)", "float"),
}
DEFAULT_METRICS = ("acc", "bwt", "fwt", "forgetting", "intransigence", "time", "parameters", "memory", "memory_mb")
FORMATS = ("console", "csv", "markdown", "latex")
SECTION_KEYS = ("dataset", "scenario")
# Config keys that never change a run's results (besides the seed, which is aggregated over).
IGNORED_KEYS = {"seed", "output_dir", "progress", "resume", "checkpoint", "objective", "device.num_threads"}
# strategy_info keys a strategy's summary() may use for the memory columns.
MEMORY_SAMPLE_KEYS = ("exemplars", "memory_samples")
MEMORY_BYTE_KEYS = ("bytes", "memory_bytes")


@dataclass
class RunRecord:
    path: Path
    status: str  # completed | failed | unfinished
    summary: Optional[dict] = None
    keys: dict = field(default_factory=dict)  # flattened config + the chosen group names
    overrides: list = field(default_factory=list)
    reason: str = ""


# ----- reading ------------------------------------------------------------------------
def flatten_config(cfg: dict) -> dict:
    flat = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            flat[prefix] = json.dumps(node) if isinstance(node, (list, tuple)) else node

    walk(cfg, "")
    return flat


def _run_keys(summary: dict) -> dict:
    keys = flatten_config(summary.get("config") or {})
    for group in ("strategy", "dataset", "backbone"):
        keys.pop(f"{group}._target_", None)  # the group's name says the same
        keys[group] = summary.get(group)
    keys["scenario"] = summary.get("scenario", keys.get("scenario"))
    keys["eval_split"] = summary.get("eval_split", keys.get("eval_split", "test"))
    return keys


def _read_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:
        return None


def _tasks_done(path: Path) -> Optional[int]:
    ckpt = path / "checkpoint.pt"
    if not ckpt.exists():
        return None
    try:
        import torch

        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        return int(state["progress"]["tasks_done"])
    except Exception:
        return None


def _untrustworthy(summary: dict) -> Optional[str]:
    """Why a metrics.json must not be averaged (not completed, or a non-finite accuracy), or None.

    The runner never writes such a file; this guards against files from older versions
    or edited by hand."""
    if summary.get("status") != "completed":
        return f"metrics.json status is {summary.get('status')!r}, not 'completed'"
    try:
        R = np.asarray(summary["accuracy_matrix"], dtype=float)
    except Exception:
        return "metrics.json has no readable accuracy_matrix"
    if R.size == 0 or not np.isfinite(R).all():
        return "metrics.json holds a non-finite accuracy matrix (a diverged run)"
    return None


def read_run(path: Path) -> Optional[RunRecord]:
    """The record of one run folder, or None when the folder is not a run."""
    path = Path(path)
    metrics, failed, hydra = path / METRICS_FILE, path / FAILED_FILE, path / ".hydra" / "config.yaml"
    if not (metrics.exists() or failed.exists() or hydra.exists()):
        return None
    overrides = _read_yaml(path / ".hydra" / "overrides.yaml") or []
    if metrics.exists():
        try:
            summary = json.loads(metrics.read_text(encoding="utf-8"))
        except Exception as exc:
            return RunRecord(path, "failed", overrides=overrides, reason=f"unreadable metrics.json ({exc})")
        problem = _untrustworthy(summary)
        if problem:
            return RunRecord(path, "failed", overrides=overrides, reason=problem)
        return RunRecord(path, "completed", summary, _run_keys(summary), overrides)
    if failed.exists():
        try:
            info = json.loads(failed.read_text(encoding="utf-8"))
            reason = f"{info.get('error_type', 'error')}: {info.get('error', '')}"
        except Exception:
            reason = "failed (unreadable failed.json)"
        return RunRecord(path, "failed", overrides=overrides, reason=reason)
    done = _tasks_done(path)
    reason = "no checkpoint yet" if done is None else f"{done} task(s) done, resumable from checkpoint.pt"
    return RunRecord(path, "unfinished", overrides=overrides, reason=reason)


def find_runs(root: Path) -> list[RunRecord]:
    root = Path(root)
    if not root.is_dir():
        raise CLBenchError(f"{root} is not a folder")
    records = []
    for dirpath, dirnames, _ in os.walk(root):
        # Natural order (2 before 10), so rows follow the sweep's job order.
        dirnames[:] = sorted((d for d in dirnames if d not in (".hydra", ".submitit", "artifacts", "report")),
                             key=lambda d: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", d)])
        record = read_run(Path(dirpath))
        if record is not None:
            records.append(record)
    return records


# ----- per-run values -------------------------------------------------------------------
def _first(info: dict, names: Sequence[str]) -> float:
    for name in names:
        value = info.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return math.nan


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def run_values(summary: dict) -> dict:
    m, timing, info = summary.get("metrics") or {}, summary.get("timing") or {}, summary.get("strategy_info") or {}
    return {
        "acc": _num(m.get("acc")),
        "bwt": _num(m.get("bwt")),
        "fwt": _num(m.get("fwt")),
        "forgetting": _num(m.get("forgetting")),
        "avg_inc_acc": _num(m.get("avg_inc_acc")),
        "time": _num(timing.get("total_s")),
        "train_time": float(sum(timing.get("train_s") or [])),
        "parameters": _num(summary.get("parameters")),
        "memory": _first(info, MEMORY_SAMPLE_KEYS),
        "memory_mb": _first(info, MEMORY_BYTE_KEYS) / 1e6,
    }


def _stream_key(keys: dict) -> tuple:
    parts = [(k, keys[k]) for k in sorted(keys) if k.startswith("dataset.")]
    parts += [(k, keys.get(k)) for k in ("dataset", "scenario", "eval_split", "seed")]
    return tuple((k, json.dumps(v, sort_keys=True, default=str)) for k, v in parts)


def _is_joint(record: RunRecord) -> bool:
    target = str((record.summary.get("config") or {}).get("strategy", {}).get("_target_", ""))
    return record.summary.get("strategy") == "joint" or target.endswith(".Joint")


def add_intransigence(records: list[RunRecord], values: list[dict]) -> None:
    """Per run: mean_k and last-k of (joint's R[k, k] - R[k, k]) on the same stream and seed."""
    joints: dict[tuple, list[np.ndarray]] = {}
    for rec in records:
        if _is_joint(rec):
            joints.setdefault(_stream_key(rec.keys), []).append(np.diag(np.asarray(rec.summary["accuracy_matrix"], float)))
    for rec, vals in zip(records, values):
        refs = [d for d in joints.get(_stream_key(rec.keys), [])]
        diag = np.diag(np.asarray(rec.summary["accuracy_matrix"], float))
        refs = [d for d in refs if d.shape == diag.shape]
        if not refs:
            vals["intransigence"] = vals["intransigence_last"] = math.nan
            continue
        gap = np.mean(refs, axis=0) - diag
        vals["intransigence"], vals["intransigence_last"] = float(gap.mean()), float(gap[-1])


# ----- grouping and aggregation ---------------------------------------------------------------
def varying_keys(records: list[RunRecord]) -> list[str]:
    """Config keys whose values differ across `records` (besides seed and result-neutral keys)."""
    all_keys = sorted({k for r in records for k in r.keys})
    out = []
    for k in all_keys:
        if k in IGNORED_KEYS or k in SECTION_KEYS:
            continue
        if len({json.dumps(r.keys.get(k), sort_keys=True, default=str) for r in records}) > 1:
            out.append(k)
    order = {"strategy": 0, "backbone": 1}
    out = sorted(out, key=lambda k: (order.get(k, 2), not k.startswith("strategy."), k))
    # Drop keys that the keys kept so far already determine (e.g. strategy.ewc_lambda when
    # only the ewc runs have it): they add columns but no rows.
    text = lambda r, k: json.dumps(r.keys.get(k), sort_keys=True, default=str)  # noqa: E731
    kept: list[str] = []
    for k in out:
        seen: dict[tuple, set] = {}
        for r in records:
            seen.setdefault(tuple(text(r, c) for c in kept), set()).add(text(r, k))
        if any(len(v) > 1 for v in seen.values()):
            kept.append(k)
    return kept


@dataclass
class Report:
    table: pd.DataFrame  # one row per group: section keys, group keys, n, seeds, <metric>_mean/_std
    group_keys: dict  # section tuple -> the keys its rows are grouped by
    metrics: list[str]
    problems: list[RunRecord]  # failed and unfinished runs
    runs: pd.DataFrame  # one row per complete run
    warnings: list[str]


def build_report(
    root: Path, by: Optional[Sequence[str]] = None, metrics: Optional[Sequence[str]] = None
) -> Report:
    records = find_runs(root)
    if not records:
        raise CLBenchError(f"no runs in {root}: no folder under it holds metrics.json, failed.json or .hydra/")
    complete = [r for r in records if r.status == "completed"]
    problems = [r for r in records if r.status != "completed"]
    if metrics:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise CLBenchError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    values = [run_values(r.summary) for r in complete]
    add_intransigence(complete, values)
    known_keys = sorted({k for r in complete for k in r.keys})
    if by:
        unknown = [k for k in by if k not in known_keys]
        if unknown and complete:
            raise CLBenchError(f"unknown --by key {unknown[0]!r}; the runs have: {', '.join(known_keys)}")
    rows = []
    for rec, vals in zip(complete, values):
        row = {k: _hashable(rec.keys.get(k)) for k in known_keys}
        row.update({"seed": rec.keys.get("seed"), "path": str(rec.path)})
        row["matrix"] = np.asarray(rec.summary["accuracy_matrix"], dtype=float)
        row.update({f"value:{k}": v for k, v in vals.items()})
        rows.append(row)
    runs = pd.DataFrame(rows)
    chosen = list(metrics) if metrics else [
        m for m in DEFAULT_METRICS if not runs.empty and runs[f"value:{m}"].notna().any()
    ]
    group_keys: dict = {}
    out_rows, warnings = [], []
    if not runs.empty:
        for section, sec_df in runs.groupby(list(SECTION_KEYS), sort=True, dropna=False):
            sec_records = [complete[i] for i in sec_df.index]
            keys = [k for k in by if k not in SECTION_KEYS] if by else varying_keys(sec_records)
            group_keys[section] = keys
            grouped = sec_df.groupby(keys, sort=False, dropna=False) if keys else [((), sec_df)]
            for gval, g in grouped:
                gval = gval if isinstance(gval, tuple) else (gval,)
                row = dict(zip(SECTION_KEYS, section))
                row.update(dict(zip(keys, gval)))
                seeds = list(g["seed"])
                if len(set(seeds)) < len(seeds):
                    label = ", ".join(f"{k}={v}" for k, v in zip(keys, gval)) or "all runs"
                    warnings.append(
                        f"{'/'.join(map(str, section))} [{label}]: {len(seeds)} runs but only "
                        f"{len(set(seeds))} distinct seed(s); they differ in keys not grouped by"
                    )
                row["n"] = len(g)
                row["seeds"] = " ".join(str(s) for s in sorted(seeds))
                for m in chosen:
                    col = g[f"value:{m}"].astype(float)
                    row[f"{m}_mean"] = col.mean()
                    row[f"{m}_std"] = col.std(ddof=1) if col.notna().sum() > 1 else math.nan
                out_rows.append(row)
    table = pd.DataFrame(out_rows)
    return Report(table, group_keys, chosen, problems, runs, warnings)


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


# ----- formatting ------------------------------------------------------------------------
def format_value(metric: str, mean: float, std: float, pm: str = " ± ") -> str:
    kind = METRICS[metric][1]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    scale, fmt = {"pct": (100.0, "{:.2f}"), "seconds": (1.0, "{:.1f}"), "count": (1.0, "{:,.0f}"), "float": (1.0, "{:.2f}")}[kind]
    text = fmt.format(scale * mean)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += pm + fmt.format(scale * std)
    return text


def _label(metric: str) -> str:
    label = METRICS[metric][0]
    return f"{label} (%)" if METRICS[metric][1] == "pct" else label


def _key_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return str(value)


def section_tables(report: Report, pm: str = " ± ") -> list[tuple[tuple, pd.DataFrame]]:
    """Display tables (strings) per (dataset, scenario) section."""
    out = []
    if report.table.empty:
        return out
    for section, sec in report.table.groupby(list(SECTION_KEYS), sort=True, dropna=False):
        keys = report.group_keys.get(section, [])
        disp = pd.DataFrame({k: [_key_text(v) for v in sec[k]] for k in keys})
        for m in report.metrics:
            disp[_label(m)] = [format_value(m, a, b, pm) for a, b in zip(sec[f"{m}_mean"], sec[f"{m}_std"])]
        disp["n"] = list(sec["n"])
        out.append((section, disp.reset_index(drop=True)))
    return out


def _title(section: tuple) -> str:
    return f"{section[0]}, {section[1]}"


def to_markdown(report: Report) -> str:
    parts = ["# clbench report\n", "Mean ± std over seeds (n runs per row).\n"]
    for section, disp in section_tables(report):
        parts.append(f"\n## {_title(section)}\n\n")
        parts.append("| " + " | ".join(disp.columns) + " |\n")
        parts.append("|" + "|".join("---" for _ in disp.columns) + "|\n")
        for _, row in disp.iterrows():
            parts.append("| " + " | ".join(str(v) for v in row) + " |\n")
    if report.problems:
        parts.append("\n## Failed or unfinished runs (not averaged in)\n\n| status | run | overrides | reason |\n|---|---|---|---|\n")
        for r in report.problems:
            parts.append(f"| {r.status} | {r.path} | {' '.join(map(str, r.overrides))} | {r.reason} |\n")
    return "".join(parts)


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("$", r"\$")):
        text = text.replace(a, b)
    return text


def to_latex(report: Report) -> str:
    """booktabs tables, one per section."""
    parts = ["% clbench report: mean $\\pm$ std over seeds; needs \\usepackage{booktabs}\n"]
    for section, disp in section_tables(report, pm=" $\\pm$ "):
        cols = list(disp.columns)
        parts.append("\\begin{table}[t]\n\\centering\n")
        parts.append(f"\\caption{{{_latex_escape(_title(section))}}}\n")
        parts.append("\\begin{tabular}{" + "l" * (len(cols) - len(report.metrics) - 1) + "r" * (len(report.metrics) + 1) + "}\n\\toprule\n")
        parts.append(" & ".join(_latex_escape(c) for c in cols) + " \\\\\n\\midrule\n")
        for _, row in disp.iterrows():
            cells = [str(v) if "$\\pm$" in str(v) else _latex_escape(str(v)) for v in row]
            cells = [c.replace("–", "--") for c in cells]
            parts.append(" & ".join(cells) + " \\\\\n")
        parts.append("\\bottomrule\n\\end{tabular}\n\\end{table}\n")
    return "".join(parts)


def to_csv(report: Report) -> str:
    """Machine-readable: raw means and stds (fractions, seconds, counts), one row per group."""
    return report.table.to_csv(index=False)


def print_console(report: Report, console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for section, disp in section_tables(report):
        table = Table(title=f"{_title(section)}  (mean ± std over seeds)", title_justify="left")
        for col in disp.columns:
            table.add_column(col, justify="left" if col in report.group_keys.get(section, []) else "right")
        for _, row in disp.iterrows():
            table.add_row(*[str(v) for v in row])
        console.print(table)
    if report.table.empty:
        console.print("no complete runs found")
    if report.problems:
        table = Table(title="Failed or unfinished runs (not averaged in)", title_justify="left")
        for col in ("status", "run", "overrides", "reason"):
            table.add_column(col)
        for r in report.problems:
            style = "red" if r.status == "failed" else "yellow"
            table.add_row(f"[{style}]{r.status}[/]", str(r.path), " ".join(map(str, r.overrides)), r.reason)
        console.print(table)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}")


# ----- command -----------------------------------------------------------------------------
def report_command(args: list[str]) -> int:
    import argparse

    from rich.console import Console

    from cl_bench.results import atomic_write_text

    parser = argparse.ArgumentParser(
        prog="clbench report",
        description="Aggregate a folder of runs (e.g. a multirun sweep dir) into mean ± std tables and plots.",
    )
    parser.add_argument("path", help="folder holding run folders (searched recursively)")
    parser.add_argument("--by", default="", help="comma-separated config keys to group rows by "
                        "(default: the keys that differ across runs, other than the seed)")
    parser.add_argument("--metrics", default="", help=f"comma-separated columns among: {', '.join(METRICS)}")
    parser.add_argument("--format", default="console,csv,markdown,latex",
                        help=f"comma-separated outputs among: {', '.join(FORMATS)}")
    parser.add_argument("--out", default="", help="folder for report.csv/.md/.tex and plots (default: PATH/report)")
    parser.add_argument("--no-plots", action="store_true", help="skip the plots")
    from cl_bench.cli import quiet_parse

    ns = quiet_parse(parser, args)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    formats = split(ns.format)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise CLBenchError(f"unknown --format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    report = build_report(Path(ns.path), by=split(ns.by) or None, metrics=split(ns.metrics) or None)
    out = Path(ns.out) if ns.out else Path(ns.path) / "report"
    console = Console()
    if "console" in formats:
        print_console(report, console)
    written = []
    for fmt, name, render in (("csv", "report.csv", to_csv), ("markdown", "report.md", to_markdown),
                              ("latex", "report.tex", to_latex)):
        if fmt in formats:
            atomic_write_text(out / name, render(report))
            written.append(out / name)
    if not ns.no_plots and not report.runs.empty:
        from cl_bench.plots import write_plots

        written += write_plots(report, out)
    if written:
        console.print(f"wrote {len(written)} file(s) to {out}")
    return 0
