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

Views (`--view`). `scenario` (the default) shows each run's own numbers. `task_aware`
shows, for class-IL runs, the task-aware accuracy matrix and metrics the runner also
stores (`accuracy_matrix_task_aware`, `metrics_task_aware`: each prediction restricted to
the classes of the evaluated task, as if the task id were given); task-IL and domain-IL
runs have one view only and are shown with their own numbers and a note (task-IL
predictions are task-aware already; in domain-IL every task has the same classes, so the
restriction changes nothing). The reference-based columns (intransigence, FWT vs.
finetune, learning accuracy) are computed from the matrices of the chosen view.

Forward transfer. FWT (Lopez-Paz & Ranzato 2017, Eq. 4) is mean_{j>0} (R[j-1, j] - b_j)
with b the random-init accuracy. In class-IL a task's classes are never predicted before
the task is trained, so R[j-1, j] ~ 0 and FWT ~ -mean b_j for every method: it cannot
tell methods apart, and the report says so beside the table. Two columns that can:
`la`, the learning accuracy mean_k R[k, k] (Riemer et al. 2019, MER), and `fwt_finetune`,
mean_{k>0} (R[k, k] - R_finetune[k, k]) against the `finetune` run of the same stream and
seed (`fwt_individual` likewise against `individual_networks`, a network trained on each
task alone, task-IL only): how much better a method learns each new task than the
reference does (the reference-run view of forward transfer discussed by Diaz-Rodriguez
et al. 2018 and used e.g. by Wolczyk et al. 2021, Continual World).

Outputs are written to one folder (default `PATH/report`, `PATH/report_task_aware` for
the task-aware view) with a manifest (`.clbench_report.json`) of the files written; a
later report into the same folder removes the files of the manifest it does not write
again, so the folder holds exactly what the last report asked for, and never touches
any other file.
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
from cl_bench.metrics import learning_accuracy, transfer_vs_reference
from cl_bench.sweep import FAILED_FILE, METRICS_FILE

# name -> (column label, kind); kind decides the display format.
METRICS: dict[str, tuple[str, str]] = {
    "acc": ("ACC", "pct"),
    "bwt": ("BWT", "pct"),
    "fwt": ("FWT", "pct"),
    "fwt_finetune": ("FWT vs. finetune", "pct"),
    "fwt_individual": ("FWT vs. individual", "pct"),
    "forgetting": ("Forgetting", "pct"),
    "la": ("Learning ACC", "pct"),
    "avg_inc_acc": ("Avg. inc. ACC", "pct"),
    "intransigence": ("Intransigence", "pct"),
    "intransigence_last": ("Intransigence (last task)", "pct"),
    "time": ("Time (s)", "seconds"),
    "train_time": ("Train time (s)", "seconds"),
    "parameters": ("Parameters", "count"),
    "memory": ("Memory (samples)", "count"),
    "memory_mb": ("Memory (MB)", "float"),
}
DEFAULT_METRICS = ("acc", "bwt", "fwt", "fwt_finetune", "fwt_individual", "forgetting", "la", "intransigence",
                   "time", "parameters", "memory", "memory_mb")
FORMATS = ("console", "csv", "markdown", "latex", "plots")
VIEWS = ("scenario", "task_aware")
# Reference strategies: metric -> (strategy name, class name) of the run it compares with.
REFERENCES = {"fwt_finetune": ("finetune", "Finetune"), "fwt_individual": ("individual_networks", "IndividualNetworks")}
# The files a report writes (anything else in the output folder is never touched).
MANIFEST = ".clbench_report.json"
OWNED_NAME = re.compile(r"(report\.(csv|md|tex)|(heatmaps|curves)_[A-Za-z0-9_.-]+\.(png|pdf))")
SECTION_KEYS = ("dataset", "scenario")
# Config keys that never change a run's results (besides the seed, which is aggregated over).
IGNORED_KEYS = {"seed", "output_dir", "progress", "resume", "checkpoint", "checkpoint_every", "objective",
                "device.num_threads", "device.memory_fraction"}
# ... and every key under these (where the logs went)
IGNORED_PREFIXES = ("logger",)
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


def _is_report_folder(path: Path) -> bool:
    return path.name in ("report", "report_task_aware") or (path / MANIFEST).exists()


def find_runs(root: Path) -> list[RunRecord]:
    root = Path(root)
    if not root.is_dir():
        raise CLBenchError(f"{root} is not a folder")
    records = []
    for dirpath, dirnames, _ in os.walk(root):
        # Natural order (2 before 10), so rows follow the sweep's job order.
        dirnames[:] = sorted((d for d in dirnames if d not in (".hydra", ".submitit", "artifacts")
                              and not _is_report_folder(Path(dirpath) / d)),
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


def has_task_aware_view(summary: dict) -> bool:
    """Only class-IL runs have a task-aware view distinct from their own numbers."""
    return summary.get("scenario") == "class_il"


def view_matrix_and_metrics(summary: dict, view: str) -> tuple[np.ndarray, dict]:
    """The accuracy matrix and metrics of `view` (runs with one view: their own)."""
    if view == "task_aware" and has_task_aware_view(summary):
        return (np.asarray(summary["accuracy_matrix_task_aware"], dtype=float),
                summary.get("metrics_task_aware") or {})
    return np.asarray(summary["accuracy_matrix"], dtype=float), summary.get("metrics") or {}


def _missing_view(summary: dict, view: str) -> Optional[str]:
    """Why a complete run cannot be shown in `view`, or None."""
    if view != "task_aware" or not has_task_aware_view(summary):
        return None
    try:
        R = np.asarray(summary["accuracy_matrix_task_aware"], dtype=float)
    except Exception:
        return "metrics.json has no task-aware accuracy matrix (written by an older clbench); rerun it"
    if R.shape != np.shape(summary["accuracy_matrix"]) or not np.isfinite(R).all():
        return "metrics.json holds an unusable task-aware accuracy matrix"
    if not isinstance(summary.get("metrics_task_aware"), dict):
        return "metrics.json has no metrics_task_aware (written by an older clbench); rerun it"
    return None


def run_values(summary: dict, view: str = "scenario") -> dict:
    R, m = view_matrix_and_metrics(summary, view)
    timing, info = summary.get("timing") or {}, summary.get("strategy_info") or {}
    return {
        "acc": _num(m.get("acc")),
        "bwt": _num(m.get("bwt")),
        "fwt": _num(m.get("fwt")),
        "forgetting": _num(m.get("forgetting")),
        "avg_inc_acc": _num(m.get("avg_inc_acc")),
        "la": learning_accuracy(R),
        "time": _num(timing.get("total_s")),
        "train_time": float(sum(timing.get("train_s") or [])),
        "parameters": _num(summary.get("parameters")),
        "memory": _first(info, MEMORY_SAMPLE_KEYS),
        "memory_mb": _first(info, MEMORY_BYTE_KEYS) / 1e6,
        # for the FWT note: mean_{j>0} R[j-1, j], the first of FWT's two terms
        "fwt_seen": float(np.mean([R[j - 1, j] for j in range(1, len(R))])) if len(R) > 1 else math.nan,
    }


def _stream_key(keys: dict) -> tuple:
    parts = [(k, keys[k]) for k in sorted(keys) if k.startswith("dataset.")]
    parts += [(k, keys.get(k)) for k in ("dataset", "scenario", "eval_split", "seed")]
    return tuple((k, json.dumps(v, sort_keys=True, default=str)) for k, v in parts)


def _is_strategy(record: RunRecord, name: str, cls: str) -> bool:
    target = str((record.summary.get("config") or {}).get("strategy", {}).get("_target_", ""))
    return record.summary.get("strategy") == name or target.endswith("." + cls)


def _references(records: list[RunRecord], matrices: list[np.ndarray], name: str, cls: str) -> dict:
    """stream key -> the matrices of the runs of strategy `name` on that stream and seed."""
    refs: dict[tuple, list[np.ndarray]] = {}
    for rec, R in zip(records, matrices):
        if _is_strategy(rec, name, cls):
            refs.setdefault(_stream_key(rec.keys), []).append(R)
    return refs


def add_reference_metrics(records: list[RunRecord], matrices: list[np.ndarray], values: list[dict]) -> None:
    """Per run, against the runs of a reference strategy on the same stream and seed:
    intransigence (joint's R[k, k] - R[k, k]: mean over k and last k) and the FWT-vs-reference
    columns (mean_{k>0} R[k, k] - reference's R[k, k]); nan without a reference run."""
    joints = _references(records, matrices, "joint", "Joint")
    others = {metric: _references(records, matrices, *ref) for metric, ref in REFERENCES.items()}
    for rec, R, vals in zip(records, matrices, values):
        key = _stream_key(rec.keys)
        refs = [np.diag(J) for J in joints.get(key, []) if J.shape == R.shape]
        if refs:
            gap = np.mean(refs, axis=0) - np.diag(R)
            vals["intransigence"], vals["intransigence_last"] = float(gap.mean()), float(gap[-1])
        else:
            vals["intransigence"] = vals["intransigence_last"] = math.nan
        for metric, by_stream in others.items():
            same = [M for M in by_stream.get(key, []) if M.shape == R.shape]
            vals[metric] = transfer_vs_reference(R, np.mean(same, axis=0)) if same else math.nan


# ----- grouping and aggregation ---------------------------------------------------------------
def varying_keys(records: list[RunRecord]) -> list[str]:
    """Config keys whose values differ across `records` (besides seed and result-neutral keys)."""
    all_keys = sorted({k for r in records for k in r.keys})
    out = []
    for k in all_keys:
        if k in IGNORED_KEYS or k in SECTION_KEYS or k.startswith(IGNORED_PREFIXES):
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
    problems: list[RunRecord]  # failed and unfinished runs (and runs the view cannot show)
    runs: pd.DataFrame  # one row per complete run; "matrix" is the view's accuracy matrix
    warnings: list[str]
    view: str = "scenario"
    notes: dict = field(default_factory=dict)  # section tuple -> lines printed beside its table


def build_report(
    root: Path, by: Optional[Sequence[str]] = None, metrics: Optional[Sequence[str]] = None,
    view: str = "scenario",
) -> Report:
    if view not in VIEWS:
        raise CLBenchError(f"unknown --view {view!r}; choose from {', '.join(VIEWS)}")
    records = find_runs(root)
    if not records:
        raise CLBenchError(f"no runs in {root}: no folder under it holds metrics.json, failed.json or .hydra/")
    for rec in records:
        problem = _missing_view(rec.summary, view) if rec.status == "completed" else None
        if problem:
            rec.status, rec.reason = "failed", problem
    complete = [r for r in records if r.status == "completed"]
    problems = [r for r in records if r.status != "completed"]
    if metrics:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise CLBenchError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    values = [run_values(r.summary, view) for r in complete]
    matrices = [view_matrix_and_metrics(r.summary, view)[0] for r in complete]
    add_reference_metrics(complete, matrices, values)
    known_keys = sorted({k for r in complete for k in r.keys})
    if by:
        unknown = [k for k in by if k not in known_keys]
        if unknown and complete:
            raise CLBenchError(f"unknown --by key {unknown[0]!r}; the runs have: {', '.join(known_keys)}")
    rows = []
    for rec, R, vals in zip(complete, matrices, values):
        row = {k: _hashable(rec.keys.get(k)) for k in known_keys}
        row.update({"seed": rec.keys.get("seed"), "path": str(rec.path), "matrix": R})
        row.update({f"value:{k}": v for k, v in vals.items()})
        rows.append(row)
    runs = pd.DataFrame(rows)
    chosen = list(metrics) if metrics else [
        m for m in DEFAULT_METRICS if not runs.empty and runs[f"value:{m}"].notna().any()
    ]
    group_keys: dict = {}
    out_rows, warnings, notes = [], [], {}
    if not runs.empty:
        for section, sec_df in runs.groupby(list(SECTION_KEYS), sort=True, dropna=False):
            sec_records = [complete[i] for i in sec_df.index]
            keys = [k for k in by if k not in SECTION_KEYS] if by else varying_keys(sec_records)
            group_keys[section] = keys
            notes[section] = section_notes(section, sec_df, chosen, view)
            grouped = sec_df.groupby(keys, sort=False, dropna=False) if keys else [((), sec_df)]
            for gval, g in grouped:
                gval = gval if isinstance(gval, tuple) else (gval,)
                row = dict(zip(SECTION_KEYS, section))
                row["view"] = view
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
    return Report(table, group_keys, chosen, problems, runs, warnings, view, notes)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def section_notes(section: tuple, runs: pd.DataFrame, chosen: Sequence[str], view: str) -> list[str]:
    """What a reader needs beside a section's table: the view, and columns that mislead or are empty."""
    scenario = section[1]
    notes = []
    if view == "task_aware":
        if scenario == "class_il":
            notes.append("Task-aware view: every prediction restricted to the classes of the evaluated task "
                         "(as if the task id were given); numbers from the runs' metrics_task_aware and "
                         "accuracy_matrix_task_aware.")
        elif scenario == "task_il":
            notes.append("task-IL runs have one view: their own numbers are shown (the task id is given at "
                         "test time, so they are task-aware already).")
        else:
            notes.append(f"{scenario} runs have one view: their own numbers are shown (every task has the same "
                         "classes, so restricting a prediction to the task's classes changes nothing).")
    if "fwt" in chosen and scenario in ("class_il", "task_il") and runs["value:fwt"].notna().any():
        # FWT = mean_{j>0} R[j-1, j] - mean_{j>0} b_j: its two terms, from the view's own numbers
        seen = runs["value:fwt_seen"].mean()
        init = seen - runs["value:fwt"].mean()
        better = [METRICS[m][0] for m in ("la", "fwt_finetune", "fwt_individual")
                  if m in chosen and runs[f"value:{m}"].notna().any()]
        instead = (f"compare {' and '.join(better)}" if better else
                   "compare learning accuracy (--metrics la) or FWT vs. finetune (--metrics fwt_finetune, with "
                   "finetune runs in the folder)")
        terms = f"here mean R[j-1, j] = {_pct(seen)}, mean b_j = {_pct(init)}"
        if scenario == "class_il" and view == "scenario":
            notes.append(
                "FWT (Lopez-Paz & Ranzato 2017) is mean_j R[j-1, j] - b_j, b the random-init accuracy. In class-IL "
                "a task's classes are never predicted before the task is trained, so R[j-1, j] ≈ 0 and FWT ≈ -mean "
                f"b_j for every method ({terms}): it does not tell methods apart; {instead} (or --view task_aware).")
        else:
            notes.append(
                "FWT (Lopez-Paz & Ranzato 2017) is mean_j R[j-1, j] - b_j, b the random-init accuracy. Before task j "
                "is trained the outputs of its classes are untrained, so both terms are near chance for most methods "
                f"({terms}) and FWT is mostly noise; {instead}.")
    if "la" in chosen:
        notes.append("Learning ACC = mean_k R[k, k], accuracy on each task right after learning it "
                     "(Riemer et al. 2019).")
    for metric, (ref, _) in REFERENCES.items():
        if metric not in chosen:
            continue
        if runs[f"value:{metric}"].notna().any():
            notes.append(f"{METRICS[metric][0]} = mean_(k>0) (R[k, k] - {ref}'s R[k, k]) on the same stream and "
                         f"seed: > 0 when a method learns new tasks better than {ref} does.")
        else:
            notes.append(f"{METRICS[metric][0]} is empty: no {ref} run of the same stream and seed in the folder.")
    for metric in ("intransigence", "intransigence_last"):
        if metric in chosen and not runs[f"value:{metric}"].notna().any():
            notes.append(f"{METRICS[metric][0]} is empty: no joint run of the same stream and seed in the folder.")
            break
    return notes


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


VIEW_TITLES = {"scenario": "", "task_aware": " (task-aware view)"}


def _title(section: tuple, view: str = "scenario") -> str:
    suffix = VIEW_TITLES[view] if section[1] == "class_il" or view == "scenario" else " (one view: its own numbers)"
    return f"{section[0]}, {section[1]}{suffix}"


def to_markdown(report: Report) -> str:
    parts = [f"# clbench report{VIEW_TITLES[report.view]}\n", "Mean ± std over seeds (n runs per row).\n"]
    for section, disp in section_tables(report):
        parts.append(f"\n## {_title(section, report.view)}\n\n")
        parts.append("| " + " | ".join(disp.columns) + " |\n")
        parts.append("|" + "|".join("---" for _ in disp.columns) + "|\n")
        for _, row in disp.iterrows():
            parts.append("| " + " | ".join(str(v) for v in row) + " |\n")
        for note in report.notes.get(section, []):
            parts.append(f"\n*Note:* {note}\n")
    if report.problems:
        parts.append("\n## Failed or unfinished runs (not averaged in)\n\n| status | run | overrides | reason |\n|---|---|---|---|\n")
        for r in report.problems:
            parts.append(f"| {r.status} | {r.path} | {' '.join(map(str, r.overrides))} | {r.reason} |\n")
    return "".join(parts)


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("$", r"\$"),
                 ("~", r"\textasciitilde{}"), ("≈", r"$\approx$"), ("±", r"$\pm$"), ("–", "--")):
        text = text.replace(a, b)
    return text


def to_latex(report: Report) -> str:
    """booktabs tables, one per section, with the section's notes under the table."""
    parts = ["% clbench report: mean $\\pm$ std over seeds; needs \\usepackage{booktabs}\n"]
    for section, disp in section_tables(report, pm=" $\\pm$ "):
        cols = list(disp.columns)
        parts.append("\\begin{table}[t]\n\\centering\n")
        parts.append(f"\\caption{{{_latex_escape(_title(section, report.view))}}}\n")
        parts.append("\\begin{tabular}{" + "l" * (len(cols) - len(report.metrics) - 1) + "r" * (len(report.metrics) + 1) + "}\n\\toprule\n")
        parts.append(" & ".join(_latex_escape(c) for c in cols) + " \\\\\n\\midrule\n")
        for _, row in disp.iterrows():
            cells = [str(v) if "$\\pm$" in str(v) else _latex_escape(str(v)) for v in row]
            cells = [c.replace("–", "--") for c in cells]
            parts.append(" & ".join(cells) + " \\\\\n")
        parts.append("\\bottomrule\n\\end{tabular}\n")
        for note in report.notes.get(section, []):
            parts.append(f"\\par\\smallskip{{\\footnotesize {_latex_escape(note)}}}\n")
        parts.append("\\end{table}\n")
    return "".join(parts)


def to_csv(report: Report) -> str:
    """Machine-readable: raw means and stds (fractions, seconds, counts), one row per group."""
    return report.table.to_csv(index=False)


def print_console(report: Report, console: Any = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cl_bench.results import print_line, print_table

    console = console or Console()
    for section, disp in section_tables(report):
        table = Table(title=f"{_title(section, report.view)}  (mean ± std over seeds)", title_justify="left")
        for col in disp.columns:
            table.add_column(col, justify="left" if col in report.group_keys.get(section, []) else "right")
        for _, row in disp.iterrows():
            table.add_row(*[escape(str(v)) for v in row])
        print_table(console, table)
        for note in report.notes.get(section, []):
            print_line(console, f"[dim]note:[/] {escape(note)}")
    if report.table.empty:
        console.print("no complete runs found")
    if report.problems:
        table = Table(title="Failed or unfinished runs (not averaged in)", title_justify="left")
        for col in ("status", "run", "overrides", "reason"):
            table.add_column(col)
        for r in report.problems:
            style = "red" if r.status == "failed" else "yellow"
            table.add_row(f"[{style}]{r.status}[/]", escape(str(r.path)), escape(" ".join(map(str, r.overrides))),
                          escape(r.reason))
        print_table(console, table)
    for w in report.warnings:
        print_line(console, f"[yellow]warning:[/] {escape(w)}")


# ----- writing ------------------------------------------------------------------------------
def _read_manifest(out: Path) -> list[str]:
    """The file names an earlier report wrote to `out` (only names a report can write)."""
    try:
        names = json.loads((out / MANIFEST).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str) and OWNED_NAME.fullmatch(n)]


def write_outputs(report: Report, out: Path, formats: Sequence[str]) -> list[Path]:
    """Write the file formats asked for to `out`; remove what an earlier report wrote there
    and this one does not (per `out`'s manifest); record the new set in the manifest.

    Before writing, the manifest lists the old files and every file this report may write,
    so that a report that fails half-way leaves no file the next one does not know about."""
    from cl_bench.results import atomic_write_text

    out = Path(out)
    tables = [(name, render) for fmt, name, render in (("csv", "report.csv", to_csv),
                                                        ("markdown", "report.md", to_markdown),
                                                        ("latex", "report.tex", to_latex)) if fmt in formats]
    plots = "plots" in formats and not report.runs.empty
    old = _read_manifest(out)
    planned = [name for name, _ in tables]
    if plots:
        from cl_bench.plots import plot_names, write_plots

        planned += plot_names(report)

    def record(names) -> None:
        atomic_write_text(out / MANIFEST, json.dumps({"files": sorted(set(names))}, indent=1) + "\n")

    if planned:
        record(old + planned)
    written: list[Path] = []
    for name, render in tables:
        atomic_write_text(out / name, render(report))
        written.append(out / name)
    if plots:
        written += write_plots(report, out)
    names = {p.name for p in written}
    for stale in old:
        if stale not in names and ((out / stale).is_file() or (out / stale).is_symlink()):
            (out / stale).unlink()
    if written:
        record(names)
    elif (out / MANIFEST).is_file():
        (out / MANIFEST).unlink()
    return written


# ----- dataset sequences ------------------------------------------------------------------
def dataset_rows(records: list[RunRecord]) -> list[dict]:
    """For runs whose tasks are whole datasets (dataset=sequence): one row per group of runs
    (strategy, backbone, scenario and the dataset list) with each dataset's accuracy after the
    last task (%), LwF's "old task" (mean over the earlier datasets) and "new task" (the last),
    and the storage each added task costs where the strategy reports it (Piggyback's layout:
    masks at one bit per weight, against a full fp32 copy of the network)."""
    groups: dict = {}
    for record in records:
        names = (record.summary or {}).get("task_names") or []
        if record.status != "completed" or not names or not all(names):
            continue
        key = (record.keys.get("strategy"), record.keys.get("backbone"), record.keys.get("scenario"), tuple(names))
        groups.setdefault(key, []).append(record)
    out = []
    for (strategy, backbone, scenario, names), members in groups.items():
        finals = np.array([np.asarray(r.summary["accuracy_matrix"], dtype=float)[-1] for r in members]) * 100.0
        info = members[0].summary.get("strategy_info") or {}
        storage = info.get("storage_bytes_per_task")
        out.append({
            "strategy": strategy, "backbone": backbone, "scenario": scenario, "n": len(members),
            "datasets": list(names), "final": finals.mean(0).tolist(),
            "final_std": (finals.std(0, ddof=1) if len(members) > 1 else np.full(len(names), np.nan)).tolist(),
            "old_task": float(finals[:, :-1].mean()) if len(names) > 1 else float("nan"),
            "new_task": float(finals[:, -1].mean()),
            "storage_bytes_per_task": storage if isinstance(storage, list) else None,
            "storage_vs_copy_per_task": info.get("storage_vs_copy_per_task"),
        })
    return out


def print_dataset_rows(rows: list[dict], console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    from cl_bench.results import print_table

    for names in dict.fromkeys(tuple(r["datasets"]) for r in rows):
        table = Table(title=f"accuracy per dataset after the last task (%): {' -> '.join(names)}", title_justify="left")
        for column in ("strategy", "backbone", "scenario", "n", *names, "old tasks", "new task", "storage per task"):
            table.add_column(column)
        for r in (r for r in rows if tuple(r["datasets"]) == names):
            cells = [f"{m:.2f}" + ("" if math.isnan(s) else f" ± {s:.2f}") for m, s in zip(r["final"], r["final_std"])]
            old = "-" if math.isnan(r["old_task"]) else f"{r['old_task']:.2f}"
            ratio = r["storage_vs_copy_per_task"]
            storage = "-" if not r["storage_bytes_per_task"] else " / ".join(
                f"{b / 2**20:.2f} MiB" + (f" ({x:.3f}x)" if isinstance(x, (int, float)) else "")
                for b, x in zip(r["storage_bytes_per_task"], ratio or [None] * len(r["storage_bytes_per_task"])))
            table.add_row(*(escape(str(v)) for v in (r["strategy"], r["backbone"], r["scenario"], r["n"])), *cells,
                          old, f"{r['new_task']:.2f}", escape(storage))
        print_table(console, table)


# ----- command -----------------------------------------------------------------------------
# ----- against a paper's table ------------------------------------------------------------
def _overrides(row: dict) -> dict:
    """A paper row's `protocol_overrides` ("k=v k=v") as {key: parsed value}."""
    import yaml

    out = {}
    for item in str(row["protocol_overrides"]).split():
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def _normalise(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)  # flattened lists are stored as JSON text
        except ValueError:
            return value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def _protocol_differences(record: RunRecord, row: dict) -> list[str]:
    """`key: ours (paper theirs)` for each protocol key of the paper row the run does not match."""
    diffs = []
    for key, theirs in _overrides(row).items():
        ours = record.keys.get(key)
        if _normalise(ours) != _normalise(theirs):
            diffs.append(f"{key} {'unset' if ours is None else ours} (paper {theirs})")
    return diffs


def _paper_metric(summary: dict, metric: str, dataset: Optional[str] = None) -> Optional[float]:
    """The run's value of a paper row's metric (%): its summary metric, or, for a run whose tasks are
    whole datasets (dataset=sequence) and a row about one of them, that dataset's accuracy (or top-1
    error) after the last task, as Piggyback's and PackNet's tables give it."""
    names = summary.get("task_names") or []
    if dataset is not None and dataset in names:
        if metric not in ("acc", "error"):
            return None
        acc = 100.0 * float(np.asarray(summary["accuracy_matrix"], dtype=float)[-1, names.index(dataset)])
        return acc if metric == "acc" else 100.0 - acc
    if metric == "acc_task_aware":
        source = summary.get("metrics_task_aware") or {}
        return None if "acc" not in source else 100.0 * float(source["acc"])
    source = summary.get("metrics") or {}
    return None if metric not in source else 100.0 * float(source[metric])


def against(records: list[RunRecord], name: str) -> list[dict]:
    """The completed runs of `records` beside paper table `name` (cl_bench.paper_tables): one
    row per group of runs (same strategy, scenario and values of the table's protocol keys)
    and metric the table has for that method and scenario, with the paper row whose
    protocol the runs match best; `differences` lists the protocol keys they do not match."""
    from cl_bench import paper_tables

    table = paper_tables.load(name)
    rows_by = {}
    for row in table:
        rows_by.setdefault((row["method"], row["scenario"]), []).append(row)
    keys = sorted({k for row in table for k in _overrides(row)})
    groups: dict = {}
    for record in records:
        if record.status != "completed":
            continue
        strategy, scenario = record.keys.get("strategy"), record.keys.get("scenario")
        signature = json.dumps([_normalise(record.keys.get(k)) for k in keys], default=str)
        groups.setdefault((strategy, scenario, signature), []).append(record)
    out = []
    for (strategy, scenario, _), members in groups.items():
        candidates = rows_by.get((strategy, scenario), [])
        # runs over a dataset sequence: one comparison per dataset of the sequence the table has
        names = set(members[0].summary.get("task_names") or []) - {None}
        per_dataset = names & {row["dataset"] for row in candidates}
        for metric, dataset in dict.fromkeys((row["metric"], row["dataset"] if per_dataset else None)
                                             for row in candidates):
            if per_dataset and dataset not in per_dataset:
                continue
            options = [(len(_protocol_differences(members[0], row)), i, row) for i, row in enumerate(candidates)
                       if row["metric"] == metric and dataset in (None, row["dataset"])]
            _, _, row = min(options)
            # the row's protocol keys whose values tell it from the table's other rows of this metric (e.g. a buffer size)
            alike = [c for c in candidates if c["metric"] == metric and dataset in (None, c["dataset"])]
            varying = [k for k in _overrides(row)
                       if len({json.dumps(_overrides(c).get(k), default=str) for c in alike}) > 1]
            values = [v for v in (_paper_metric(r.summary, metric, dataset) for r in members) if v is not None]
            if not values:
                continue
            mean = float(np.mean(values))
            std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            out.append({
                "method": strategy, "scenario": scenario, "metric": metric if dataset is None else f"{metric} {dataset}",
                "n": len(values), "setting": " ".join(f"{k}={_overrides(row)[k]}" for k in varying),
                "ours": mean, "ours_std": std, "paper": row["value"], "paper_spread": row["spread"],
                "difference": mean - row["value"], "differences": _protocol_differences(members[0], row),
                "verified": row["verified"], "source": f"{row['paper']}, {row['table']}",
            })
    return out


def print_against(rows: list[dict], name: str, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    from cl_bench.results import print_line, print_table

    if not rows:
        print_line(console, f"no run in this folder has a row in paper table {name} (same strategy and scenario)")
        return
    sources = sorted({r["source"] for r in rows})
    table = Table(title=f"against {name}: {'; '.join(sources)} (%)", title_justify="left")
    with_setting = any(r.get("setting") for r in rows)
    for column in ("method", "scenario", *(("paper row",) if with_setting else ()), "metric", "ours", "paper",
                   "ours - paper", "protocol"):
        table.add_column(column)
    for r in rows:
        ours = f"{r['ours']:.2f}" + ("" if math.isnan(r["ours_std"]) else f" ± {r['ours_std']:.2f}") + f" (n={r['n']})"
        paper = f"{r['paper']:.2f}" + ("" if r["paper_spread"] is None else f" ({r['paper_spread']:.2f})")
        protocol = "same" if not r["differences"] else "DIFFERS: " + "; ".join(r["differences"])
        table.add_row(r["method"], r["scenario"], *((escape(r.get("setting") or "-"),) if with_setting else ()),
                      r["metric"], ours, paper + ("" if r["verified"] else " *"),
                      f"{r['difference']:+.2f}", escape(protocol))
    print_table(console, table)
    if not all(r["verified"] for r in rows):
        print_line(console, "* transcribed from the paper, not verified against it (the table's `verified` column)")


def report_command(args: list[str]) -> int:
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser(
        prog="clbench report",
        description="Aggregate a folder of runs (e.g. a multirun sweep dir) into mean ± std tables and plots.",
    )
    parser.add_argument("path", help="folder holding run folders (searched recursively)")
    parser.add_argument("--by", default="", help="comma-separated config keys to group rows by "
                        "(default: the keys that differ across runs, other than the seed)")
    parser.add_argument("--metrics", default="", help=f"comma-separated columns among: {', '.join(METRICS)}")
    parser.add_argument("--format", default=",".join(FORMATS),
                        help=f"comma-separated outputs among: {', '.join(FORMATS)} (default: all); files an "
                        "earlier report wrote to the same folder and this one does not are removed")
    parser.add_argument("--view", default="scenario", choices=VIEWS,
                        help="scenario: each run's own numbers (default); task_aware: class-IL runs' task-aware "
                        "matrix and metrics (other scenarios have one view and keep their own)")
    parser.add_argument("--out", default="", help="folder for report.csv/.md/.tex and plots "
                        "(default: PATH/report, PATH/report_task_aware for --view task_aware)")
    parser.add_argument("--no-plots", action="store_true",
                        help="skip the plots (the same as leaving plots out of --format)")
    parser.add_argument("--against", default="", metavar="TABLE",
                        help="also print the runs beside a paper's published numbers (cl_bench/paper_tables/TABLE.csv, "
                        "e.g. vandeven2019, buzzega2020, hsu2018, chaudhry2019agem; an unknown name lists them all), "
                        "with the difference and the protocol keys that differ")
    from cl_bench.cli import quiet_parse

    ns = quiet_parse(parser, args)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    formats = split(ns.format)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise CLBenchError(f"unknown --format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    if ns.no_plots:
        formats = [f for f in formats if f != "plots"]
    if ns.against:
        from cl_bench import paper_tables

        paper_tables.load(ns.against)  # an unknown table is refused before any work
    report = build_report(Path(ns.path), by=split(ns.by) or None, metrics=split(ns.metrics) or None, view=ns.view)
    out = Path(ns.out) if ns.out else Path(ns.path) / ("report" if ns.view == "scenario" else "report_task_aware")
    console = Console()
    if "console" in formats:
        print_console(report, console)
    written = write_outputs(report, out, formats)
    sequences = dataset_rows(find_runs(Path(ns.path)))
    if sequences and "console" in formats:
        print_dataset_rows(sequences, console)
    if ns.against:
        print_against(against(find_runs(Path(ns.path)), ns.against), ns.against, console)
    if written:
        from rich.markup import escape

        from cl_bench.results import print_line

        print_line(console, f"wrote {len(written)} file(s) to {escape(str(out))}")
    return 0
