"""Reproduce the replay table of Buzzega et al. (NeurIPS 2020, "Dark Experience for General
Continual Learning", Table 2, Seq-MNIST) and a B-first-half class-IL table for the
cosine-classifier methods, on the offline real digits.

Protocol "smnist" (the paper's Seq-MNIST, Sec. 4 and its appendix): the named experiments
`buzzega2020_seq_mnist` (buffer 200) and `buzzega2020_seq_mnist_buffer500` (conf/experiment/),
each method's best hyperparameters for that buffer in
conf/experiment_method/<experiment>/<strategy>.yaml. The script builds and runs their
`clbench run -m` command lines (printed before they run) and prints the runs beside the paper
(`clbench report RUNS --against buzzega2020`):

    clbench run -m experiment=buzzega2020_seq_mnist seed=0,1,2 strategy=finetune,er,gem,agem,icarl,der,derpp,joint
    clbench run -m experiment=buzzega2020_seq_mnist_buffer500 seed=0,1,2 strategy=er,gem,agem,icarl,der,derpp
    clbench report multirun/... --against buzzega2020

The protocol: 5 tasks of 2 classes in natural order, MLP 784-100-100-10 (hidden 100-100;
64-100-100 on the 8x8 Split Digits), plain SGD (no momentum, no weight decay), batch 10,
1 epoch per task, buffers of 200 and 500. Each method runs with the paper's best
hyperparameters for Seq-MNIST and that buffer (the authors' `utils/best_args.py`,
'seq-mnist': learning rate, replay batch size, alpha/beta, GEM's margin gamma, iCaRL without
weight decay). As in the paper, one class-IL training run gives both numbers: class-IL
accuracy and the task-IL accuracy of the same model with the outputs masked to each task's
classes (`metrics_task_aware`). The methods published after the paper (X-DER, ER-ACE, GDumb)
have no Seq-MNIST entry there: they run with ER's learning rate for the buffer and their own
shipped defaults otherwise. The experiments' dataset is the paper's split_mnist; this script
runs the offline split_mnist5k unless --dataset says otherwise.

Protocol "bhalf" (the LUCIR/PODNet/WA protocol, scaled down; no paper table): class-IL with
half the classes in the first task (`dataset.first_task_classes=5`) then one class per task
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
import shlex
import statistics
import tempfile
from pathlib import Path

import cl_bench
from cl_bench import CLBenchError
from cl_bench.report import against, find_runs, print_against

PAPER_TABLE = "buzzega2020"
# One named experiment per buffer column of the paper's Table 2 (conf/experiment/).
EXPERIMENTS = {200: "buzzega2020_seq_mnist", 500: "buzzega2020_seq_mnist_buffer500"}
SMNIST_METHODS = ["finetune", "joint", "er", "gem", "agem", "icarl", "der", "derpp", "xder", "er_ace", "gdumb"]
# Methods without a buffer: one run per seed, under the first buffer's experiment.
NO_BUFFER = ("finetune", "joint")
# The paper's ordering on Seq-MNIST class-IL that this reproduction checks.
PAPER_ORDER = "DER++ >= DER > ER ~ GEM > iCaRL > A-GEM (class-IL, both buffers)"
COMMON = ["checkpoint=false", "device.num_threads=1"]

BHALF = [
    "scenario=class_il",
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


def merged(ours: list[str], theirs: list[str]) -> list[str]:
    """`ours` without the keys the user's own overrides (`theirs`) set, then `theirs`."""
    keys = {o.partition("=")[0].lstrip("+~") for o in theirs}
    return [o for o in ours if o.partition("=")[0].lstrip("+~") not in keys] + theirs


def smnist_sweeps(methods: list[str], buffers: list[int], seeds: list[int], runs: Path) -> list[list[str]]:
    """The `clbench run -m` command lines (without `clbench run`): one sweep per buffer's experiment;
    the methods without a buffer run in the first one."""
    lines = []
    for i, buffer in enumerate(buffers):
        group = [m for m in methods if m not in NO_BUFFER or i == 0]
        if group:
            lines.append(["-m", f"experiment={EXPERIMENTS[buffer]}", f"seed={','.join(map(str, seeds))}",
                          f"strategy={','.join(group)}", f"hydra.sweep.dir={runs / f'buffer{buffer}'}"])
    return lines


def bhalf_sweeps(methods: list[str], seeds: list[int], runs: Path) -> list[list[str]]:
    lines = []
    # `++`: a sweep over strategies first composes its default strategy (finetune), which has no memory
    for name, group, memory in (("no_memory", [m for m in methods if m in NO_BUFFER], []),
                                ("memory200", [m for m in methods if m not in NO_BUFFER],
                                 ["++strategy.memory_size=200"])):
        if group:
            lines.append(["-m", *BHALF, f"seed={','.join(map(str, seeds))}", f"strategy={','.join(group)}", *memory,
                          f"hydra.sweep.dir={runs / name}"])
    return lines


def run_sweeps(lines: list[list[str]], common: list[str], user: list[str]) -> None:
    """Run each sweep through the CLI's code path; a failed run (e.g. a diverged one) is
    recorded in its folder (failed.json) and becomes a row that says so, not a number."""
    for line in lines:
        args = ["-m", *merged([*line[1:], *common], user)]
        print("\n$ clbench run " + " ".join(shlex.quote(a) for a in args), flush=True)
        try:
            cl_bench.run(overrides=args[1:], multirun=True)
        except CLBenchError as exc:
            print(f"FAILED: {exc}", flush=True)


def buffer_of(summary: dict) -> int:
    return 0 if summary["strategy"] in NO_BUFFER else int(summary["config"]["strategy"].get("memory_size") or 0)


def cell(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if not pct:
        return "-"
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def table(records: list, methods: list[str], protocol: str, seeds: list[int]) -> str:
    """The markdown table of the runs (ours; the paper's numbers are in the --against table)."""
    results: dict[tuple[str, int], list[dict]] = {}
    failed: dict[tuple[str, int], list[str]] = {}
    for r in records:
        if r.status == "completed":
            results.setdefault((r.summary["strategy"], buffer_of(r.summary)), []).append(r.summary)
        else:
            key = (r.keys.get("strategy") or next((o.split("=", 1)[1] for o in r.overrides
                                                   if str(o).startswith("strategy=")), "?"), 0)
            failed.setdefault(key, []).append(f"{r.path.name}: {r.reason}")
    order = {m: i for i, m in enumerate(methods)}
    base = {s["config"]["seed"]: sum(s["timing"]["train_s"]) for s in results.get(("finetune", 0), [])}
    first = next((s for runs_ in results.values() for s in runs_), {"dataset": "?"})
    lines = [f"{first['dataset']}, protocol {protocol}, seeds {' '.join(map(str, seeds))} "
             "(mean ± std, %; time: median ratio of train time to finetune's on the same seed)", ""]
    if protocol == "smnist":
        lines += ["| method | buffer | class-IL | task-IL | time vs finetune |", "|---|---|---|---|---|"]
    else:
        lines += ["| method | memory | class-IL ACC | BWT | time vs finetune |", "|---|---|---|---|---|"]
    for (method, buffer), runs_ in sorted(results.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        ratios = [sum(s["timing"]["train_s"]) / base[s["config"]["seed"]] for s in runs_ if s["config"]["seed"] in base]
        ratio = f"{statistics.median(ratios):.1f}x" if ratios else "-"
        acc = cell([s["metrics"]["acc"] for s in runs_])
        other = (cell([s["metrics_task_aware"]["acc"] for s in runs_]) if protocol == "smnist"
                 else cell([s["metrics"]["bwt"] for s in runs_]))
        lines.append(f"| {method} | {buffer or '-'} | {acc} | {other} | {ratio} |")
    for (method, _), reasons in failed.items():
        lines.append(f"| {method} | | failed: {'; '.join(reasons)} |")
    if protocol == "smnist":
        lines += ["", f"Paper's ordering: {PAPER_ORDER}. Paper numbers: cl_bench/paper_tables/{PAPER_TABLE}.csv "
                  "(transcribed, not verified against the paper)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=("smnist", "bhalf"), default="smnist")
    parser.add_argument("--dataset", default="split_mnist5k",
                        help="split_mnist5k (offline, the default here), split_mnist (the paper's) or split_digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--buffers", type=int, nargs="+", default=[200, 500], choices=sorted(EXPERIMENTS))
    parser.add_argument("--runs", type=Path, default=None, help="folder for the runs (default: a new temporary "
                        "folder); run again on the same folder to continue where it stopped")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("overrides", nargs="*", help="extra clbench overrides, e.g. dataset=split_digits")
    args = parser.parse_args(argv)
    runs = args.runs or Path(tempfile.mkdtemp(prefix="reproduce_der_"))
    if args.protocol == "smnist":
        methods = args.methods or SMNIST_METHODS
        unknown = [m for m in methods if m not in SMNIST_METHODS]
        if unknown:
            raise CLBenchError(f"no Seq-MNIST settings for {unknown[0]!r}; choose among {', '.join(SMNIST_METHODS)}")
        methods = ["finetune"] + [m for m in methods if m != "finetune"]
        lines = smnist_sweeps(methods, args.buffers, args.seeds, runs)
    else:
        methods = args.methods or BHALF_METHODS
        methods = ["finetune"] + [m for m in methods if m != "finetune"]
        lines = bhalf_sweeps(methods, args.seeds, runs)
    print(f"protocol {args.protocol}; runs in {runs}", flush=True)
    run_sweeps(lines, [f"dataset={args.dataset}", *COMMON], args.overrides)

    records = find_runs(runs)
    text = table(records, methods, args.protocol, args.seeds)
    print()
    print(text)
    if args.protocol == "smnist":
        from rich.console import Console

        print()
        print_against(against(records, PAPER_TABLE), PAPER_TABLE, Console())
        print(f"\nThe same table again: clbench report {runs} --against {PAPER_TABLE}")
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
