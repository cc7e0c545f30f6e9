"""Paper figures from a `clbench report`: accuracy-matrix heatmaps and accuracy curves.

For each (dataset, scenario) section of the report:

- `heatmaps_<dataset>_<scenario>.png/.pdf`: one panel per method, the accuracy matrix
  R[i, j] (%) averaged over seeds, every cell printed as a number (readable in print
  without colour; the colour map, viridis, is monotone in lightness). Cells above the
  diagonal (j > i: task j not trained yet when evaluated) are masked out of the colour
  map and drawn grey and hatched, their value in small grey type, so that a dark cell
  always means a task that was learned and then forgotten (or never learned, on the
  diagonal), never one that was not trained yet; the figure's legend says so;
- `curves_<dataset>_<scenario>.png/.pdf`: one panel per task j with the accuracy on task
  j after each training step i, and a last panel with the accuracy on all tasks seen so
  far (mean_{j<=i} R[i, j]); one line per method, mean over seeds with a ±1 std band.
  Methods differ by line style and marker as well as colour; a dotted vertical line
  marks the step at which the panel's task is learned, and the steps before it (task not
  trained yet) are shaded grey.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
MARKERS = ["o", "s", "^", "D", "v", "x", "P", "*", "h", "<"]
NOT_TRAINED_FACE = "#e6e6e6"  # cells of tasks not trained yet: light grey ...
NOT_TRAINED_HATCH = "#a0a0a0"  # ... hatched with darker grey lines
NOT_TRAINED_HATCH_PATTERN = "///"
NOT_TRAINED_LABEL = "not trained yet (j > i): grey, hatched, value in grey"
VIEW_LABELS = {"scenario": "", "task_aware": ", task-aware view"}


def _view_label(section: tuple, view: str) -> str:
    """Only class-IL runs have a task-aware view; the others are shown with their own numbers."""
    return VIEW_LABELS[view] if section[1] == "class_il" or view == "scenario" else ", its own numbers (one view)"


def _group_label(keys: list[str], values: tuple) -> str:
    parts = []
    for k, v in zip(keys, values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        parts.append(str(v) if k in ("strategy", "backbone") else f"{k.split('.')[-1]}={v}")
    return ", ".join(parts) or "all runs"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-")


def method_matrices(report: Any) -> dict[tuple, list[tuple[str, list[np.ndarray]]]]:
    """section -> [(method label, [R per run])] in table order."""
    out: dict[tuple, list] = {}
    runs = report.runs
    for section, sec in runs.groupby(["dataset", "scenario"], sort=True, dropna=False):
        keys = report.group_keys.get(section, [])
        groups = sec.groupby(keys, sort=False, dropna=False) if keys else [((), sec)]
        entries = []
        for gval, g in groups:
            gval = gval if isinstance(gval, tuple) else (gval,)
            mats = [m for m in g["matrix"]]
            shapes = {m.shape for m in mats}
            if len(shapes) != 1:
                continue  # runs of different stream lengths cannot be averaged
            entries.append((_group_label(keys, gval), mats))
        out[section] = entries
    return out


def _save(fig: Any, path: Path) -> list[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "pdf"):
        target = path.with_suffix(f".{ext}")
        fig.savefig(target, dpi=150, bbox_inches="tight")
        written.append(target)
    return written


def not_trained_mask(T: int) -> np.ndarray:
    """True where R[i, j] was measured before task j was trained (j > i)."""
    return np.triu(np.ones((T, T), dtype=bool), k=1)


def heatmap_figure(section: tuple, entries: list, view: str = "scenario") -> Any:
    """The heatmap figure (one panel per method); not-yet-trained cells masked and hatched."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    n = len(entries)
    cols = min(n, 4)
    rows = -(-n // cols)
    T = entries[0][1][0].shape[0]
    size = 0.55 * T + 1.2
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size + 1.0, rows * size + 1.0), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad=NOT_TRAINED_FACE)
    upper = not_trained_mask(T)
    image = None
    for ax, (label, mats) in zip(axes.flat, entries):
        R = 100 * np.mean(mats, axis=0)
        image = ax.imshow(np.ma.masked_array(R, mask=upper), vmin=0, vmax=100, cmap=cmap)
        for i in range(T):
            for j in range(T):
                if upper[i, j]:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="none", edgecolor=NOT_TRAINED_HATCH,
                                           hatch=NOT_TRAINED_HATCH_PATTERN, linewidth=0, label="_not trained yet"))
                    ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=6, color="#606060",
                            style="italic")
                else:
                    ax.text(j, i, f"{R[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="black" if R[i, j] > 55 else "white")
        ax.set_title(f"{label} (n={len(mats)})", fontsize=9)
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xlabel("evaluated on task j", fontsize=8)
        ax.set_ylabel("after training task i", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    title = f"Accuracy matrix R[i, j] (%), {section[0]}, {section[1]}{_view_label(section, view)}, mean over seeds"
    fig.suptitle(title, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label="accuracy (%), on and below the diagonal")
    key = Patch(facecolor=NOT_TRAINED_FACE, edgecolor=NOT_TRAINED_HATCH, hatch=NOT_TRAINED_HATCH_PATTERN,
                linewidth=0, label=NOT_TRAINED_LABEL)
    fig.legend(handles=[key], loc="outside lower center", fontsize=7, frameon=False,
               title="dark on or below the diagonal: a task learned then forgotten (or never learned)",
               title_fontsize=7)
    return fig


def plot_heatmaps(section: tuple, entries: list, out: Path, view: str = "scenario") -> list[Path]:
    import matplotlib.pyplot as plt

    fig = heatmap_figure(section, entries, view)
    written = _save(fig, out / f"heatmaps_{_slug(section[0])}_{_slug(section[1])}")
    plt.close(fig)
    return written


def seen_tasks_accuracy(R: np.ndarray) -> np.ndarray:
    """mean_{j<=i} R[i, j] for each step i."""
    return np.array([R[i, : i + 1].mean() for i in range(R.shape[0])])


def plot_curves(section: tuple, entries: list, out: Path, view: str = "scenario") -> list[Path]:
    import matplotlib.pyplot as plt

    T = entries[0][1][0].shape[0]
    panels = T + 1
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), sharex=True, squeeze=False)
    steps = np.arange(T)
    for m, (label, mats) in enumerate(entries):
        stack = 100 * np.stack(mats)  # runs x T x T
        style = dict(linestyle=LINESTYLES[m % len(LINESTYLES)], marker=MARKERS[m % len(MARKERS)],
                     color=f"C{m % 10}", markersize=4, linewidth=1.4)
        series = [stack[:, :, j] for j in range(T)]
        series.append(np.stack([seen_tasks_accuracy(R) for R in stack]))
        for p, values in enumerate(series):
            ax = axes.flat[p]
            mean = values.mean(0)
            std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
            ax.plot(steps, mean, label=f"{label} (n={len(mats)})", **style)
            ax.fill_between(steps, mean - std, mean + std, color=style["color"], alpha=0.18, linewidth=0)
    for p in range(panels):
        ax = axes.flat[p]
        if p < T:
            ax.set_title(f"task {p}", fontsize=9)
            ax.axvline(p, color="grey", linestyle=":", linewidth=1)
            if p > 0:  # steps before the task is trained
                ax.axvspan(-0.5, p - 0.5, facecolor=NOT_TRAINED_FACE, edgecolor=NOT_TRAINED_HATCH,
                           hatch=NOT_TRAINED_HATCH_PATTERN, linewidth=0, zorder=0, alpha=0.5)
        else:
            ax.set_title("all tasks seen so far", fontsize=9)
        ax.set_ylim(-2, 102)
        ax.set_xlim(-0.5, T - 0.5)
        ax.set_xticks(steps)
        ax.grid(True, linewidth=0.3)
        ax.tick_params(labelsize=7)
        if p % cols == 0:
            ax.set_ylabel("accuracy (%)", fontsize=8)
        if p >= panels - cols:
            ax.set_xlabel("after training task", fontsize=8)
            ax.xaxis.set_tick_params(labelbottom=True)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
               bbox_to_anchor=(0.5, -0.02 - 0.03 * ((len(labels) - 1) // 4)))
    fig.suptitle(f"Accuracy after each training step, {section[0]}, {section[1]}{_view_label(section, view)} "
                 "(mean ± std over seeds; hatched: task not trained yet)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) - 1) // 4), 1, 1))
    written = _save(fig, out / f"curves_{_slug(section[0])}_{_slug(section[1])}")
    plt.close(fig)
    return written


def plot_names(report: Any) -> list[str]:
    """The file names `write_plots` writes for `report`."""
    names = []
    for section, entries in method_matrices(report).items():
        if entries:
            stem = f"{_slug(section[0])}_{_slug(section[1])}"
            names += [f"{kind}_{stem}.{ext}" for kind in ("heatmaps", "curves") for ext in ("png", "pdf")]
    return names


def write_plots(report: Any, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for section, entries in method_matrices(report).items():
        if not entries:
            continue
        view = getattr(report, "view", "scenario")
        written += plot_heatmaps(section, entries, Path(out), view)
        written += plot_curves(section, entries, Path(out), view)
    return written
