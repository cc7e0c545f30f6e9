"""Reproduce the replay table of Buzzega et al. (NeurIPS 2020, "Dark Experience for General
Continual Learning", Table 2, Seq-MNIST) and a B-first-half class-IL table for the
cosine-classifier methods, on the offline real digits.

Protocol "smnist" (the paper's Seq-MNIST, Sec. 4 and its appendix): 5 tasks of 2 classes
in natural order, MLP 784-100-100-10 (`backbone=mlp`, hidden 100-100; 64-100-100 on the
8x8 Split Digits), plain SGD (no momentum, no weight decay), batch 10, 1 epoch per task,
buffers of 200 and 500. Each method runs with the paper's best hyperparameters for
Seq-MNIST and that buffer (the authors' `utils/best_args.py`, 'seq-mnist': learning
rate, replay batch size, alpha/beta, GEM's margin gamma, iCaRL without weight decay).
As in the paper, one class-IL training run gives both numbers: class-IL accuracy and the
task-IL accuracy of the same model with the outputs masked to each task's classes
(`metrics_task_aware`). The methods published after the paper (X-DER, ER-ACE, GDumb) have
no Seq-MNIST entry there: they run with ER's learning rate for the buffer and their own
shipped defaults otherwise.

Protocol "bhalf" (the LUCIR/PODNet/WA protocol, scaled down): class-IL with half the
classes in the first task (`dataset.first_task_classes=5`) then one class per task
(6 tasks), conv backbone (`backbone=cnn`), SGD momentum 0.9, weight decay 5e-4, lr 0.01,
batch 32, 5 epochs per task, memory 200 (20 per class at the end), every method with its
shipped defaults.

Seeds are interleaved (every method of seed 0, then seed 1, ...) so machine load hits all
methods alike; the time column is each method's training time (train_s, including task-end
phases) over finetune's on the same seed (median over seeds).

    python scripts/reproduce_der.py                       # smnist on split_mnist5k, 3 seeds
    python scripts/reproduce_der.py --protocol smnist dataset=split_digits
    python scripts/reproduce_der.py --protocol bhalf --out table.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench import CLBenchError

try:
    from scripts.reproduce_progress import RunsProgress
except ImportError:  # run as python scripts/reproduce_der.py: this folder is on sys.path
    from reproduce_progress import RunsProgress

COMMON = ["scenario=class_il", "checkpoint=false", "device.num_threads=1"]

SMNIST = [
    "dataset=split_mnist5k",
    "backbone=mlp",
    "backbone.hidden_sizes=[100,100]",
    "train.optimizer=sgd",
    "train.momentum=0.0",
    "train.weight_decay=0.0",
    "train.batch_size=10",
    "train.epochs=1",
]

# The authors' best arguments for 'seq-mnist' (aimagelab/mammoth, utils/best_args.py), as
# clbench overrides, per buffer size. `replay_batch_size` is the number of memory samples
# replayed per step.
SMNIST_METHODS: dict[str, dict[int, list[str]]] = {
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
    # not in the paper's Seq-MNIST table: ER's learning rate for the buffer, shipped defaults otherwise
    "xder": {200: ["train.lr=0.01"], 500: ["train.lr=0.1"]},
    "er_ace": {200: ["train.lr=0.01"], 500: ["train.lr=0.1"]},
    "gdumb": {200: [], 500: []},
}

# Buzzega et al. 2020, Table 2, Seq-MNIST (class-IL, task-IL), in %: the data file
# cl_bench/paper_tables/buzzega2020.csv (also `clbench report PATH --against buzzega2020`).
def _paper_smnist() -> dict[tuple[str, int], tuple[float, float]]:
    from cl_bench import paper_tables
    from cl_bench.report import _overrides

    cells: dict[tuple[str, int], dict[str, float]] = {}
    for row in paper_tables.load("buzzega2020"):
        buffer = int(_overrides(row).get("strategy.memory_size", 0))
        cells.setdefault((row["method"], buffer), {})[row["metric"]] = row["value"]
    return {key: (c["acc"], c["acc_task_aware"]) for key, c in cells.items()}


PAPER_SMNIST = _paper_smnist()
# The paper's ordering on Seq-MNIST class-IL that this reproduction checks.
PAPER_ORDER = "DER++ >= DER > ER ~ GEM > iCaRL > A-GEM (class-IL, both buffers)"

BHALF = [
    "dataset=split_mnist5k",
    "dataset.num_tasks=6",
    "dataset.first_task_classes=5",
    "backbone=cnn",
    "train.optimizer=sgd",
    "train.lr=0.01",
    "train.momentum=0.9",
    "train.weight_decay=5e-4",
    "train.batch_size=32",
    "train.epochs=5",
]
BHALF_METHODS = ["finetune", "icarl", "eeil", "bic", "lucir", "podnet", "wa", "joint"]


def run_one(overrides: list[str], folder: Path, runs: RunsProgress, label: str) -> dict:
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*COMMON, *overrides])
    return runs.run(cfg, folder, label)


def cell(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def smnist_jobs(methods: list[str], buffers: list[int]) -> list[tuple[str, int, list[str]]]:
    jobs = []
    for method in methods:
        table = SMNIST_METHODS[method]
        for buffer in ([0] if 0 in table else buffers):
            memory = [] if buffer == 0 else [f"strategy.memory_size={buffer}"]
            jobs.append((method, buffer, [*SMNIST, f"strategy={method}", *table[buffer], *memory]))
    return jobs


def bhalf_jobs(methods: list[str]) -> list[tuple[str, int, list[str]]]:
    return [(m, 0 if m in ("finetune", "joint") else 200, [*BHALF, f"strategy={m}"]
             + ([] if m in ("finetune", "joint") else ["strategy.memory_size=200"])) for m in methods]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=("smnist", "bhalf"), default="smnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--buffers", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. dataset=split_digits")
    args = parser.parse_args()
    if args.protocol == "smnist":
        methods = args.methods or list(SMNIST_METHODS)
        jobs = smnist_jobs(["finetune"] + [m for m in methods if m != "finetune"], args.buffers)
    else:
        methods = args.methods or BHALF_METHODS
        jobs = bhalf_jobs(["finetune"] + [m for m in methods if m != "finetune"])
    results: dict[tuple[str, int], list[dict]] = {(m, b): [] for m, b, _ in jobs}
    failed: dict[tuple[str, int], list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp, RunsProgress(len(args.seeds) * len(jobs)) as runs:
        for seed in args.seeds:
            for method, buffer, overrides in jobs:
                label = f"{method} · buffer {buffer} · seed {seed}"
                try:
                    summary = run_one([*overrides, f"seed={seed}", *args.overrides],
                                      Path(tmp) / f"{method}_{buffer}_{seed}", runs, label)
                except CLBenchError as exc:  # e.g. a diverged run: a row that says so, not a number
                    print(f"{label}: FAILED: {exc}", flush=True)
                    failed.setdefault((method, buffer), []).append(f"seed {seed}: {exc}")
                    continue
                results[(method, buffer)].append(summary)
                aware = (summary.get("metrics_task_aware") or {}).get("acc", float("nan"))
                print(f"{label}: class-IL {summary['metrics']['acc']:.4f} task-IL {aware:.4f} "
                      f"train {sum(summary['timing']['train_s']):.2f} s", flush=True)
    base = {s["config"]["seed"]: sum(s["timing"]["train_s"]) for s in results[("finetune", 0)]}
    first = next(s for runs_ in results.values() for s in runs_)
    lines = [f"{first['dataset']}, protocol {args.protocol}, seeds {' '.join(map(str, args.seeds))} "
             "(mean ± std, %; time: median ratio of train time to finetune's on the same seed)", ""]
    if args.protocol == "smnist":
        lines += ["| method | buffer | class-IL | task-IL | paper class-IL | paper task-IL | time vs finetune |",
                  "|---|---|---|---|---|---|---|"]
    else:
        lines += ["| method | memory | class-IL ACC | BWT | time vs finetune |", "|---|---|---|---|---|"]
    for (method, buffer), runs_ in results.items():
        if (method, buffer) in failed:
            lines.append(f"| {method} | {buffer or '-'} | failed: {'; '.join(failed[(method, buffer)])} |")
            continue
        ratios = [sum(s["timing"]["train_s"]) / base[s["config"]["seed"]] for s in runs_ if s["config"]["seed"] in base]
        ratio = statistics.median(ratios) if ratios else float("nan")
        acc = cell([s["metrics"]["acc"] for s in runs_])
        if args.protocol == "smnist":
            aware = cell([s["metrics_task_aware"]["acc"] for s in runs_])
            paper = PAPER_SMNIST.get((method, buffer), ("-", "-"))
            lines.append(f"| {method} | {buffer or '-'} | {acc} | {aware} | {paper[0]} | {paper[1]} | {ratio:.1f}x |")
        else:
            bwt = cell([s["metrics"]["bwt"] for s in runs_])
            lines.append(f"| {method} | {buffer or '-'} | {acc} | {bwt} | {ratio:.1f}x |")
    if args.protocol == "smnist":
        lines += ["", f"Paper's ordering: {PAPER_ORDER}. Paper numbers: cl_bench/paper_tables/buzzega2020.csv "
                  "(transcribed, not verified against the paper)."]
    table = "\n".join(lines)
    print()
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
