"""Reproduce the replay reference protocol and print ACC, BWT and time against finetune.

The issue's protocol (a peer library's numbers on Split Digits: ER ~0.81, GEM ~0.92,
iCaRL ~0.87 final average accuracy): Split Digits, class-IL, MLP 64-256-256 (our `mlp`
backbone on 8x8 inputs), SGD lr 0.05, batch 32, 10 epochs per task, memory 200.
Every strategy runs with the same seeds; runs are interleaved seed by seed so machine
load affects all methods alike, and the time column is each method's training time
(the runner's train_s, including task-end work such as herding, EEIL's balanced
fine-tuning and BiC's bias fit) divided by finetune's on the same seed (median).

    python scripts/reproduce_replay.py [--seeds 0 1 2] [--out table.md] [hydra overrides...]
    python scripts/reproduce_replay.py dataset=split_mnist5k
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)

try:
    from scripts.reproduce_progress import RunsProgress
except ImportError:  # run as python scripts/reproduce_replay.py: this folder is on sys.path
    from reproduce_progress import RunsProgress

STRATEGIES = ["finetune", "er", "gem", "agem", "icarl", "eeil", "bic", "joint"]
PEER = {"er": "0.81", "gem": "0.92", "icarl": "0.87"}
PROTOCOL = [
    "scenario=class_il",
    "backbone=mlp",
    "backbone.hidden_sizes=[256,256]",
    "train.optimizer=sgd",
    "train.lr=0.05",
    "train.momentum=0.0",
    "train.batch_size=32",
    "train.epochs=10",
    "checkpoint=false",
    "device.num_threads=1",
]


def run_one(strategy: str, seed: int, overrides: list[str], folder: Path, runs: RunsProgress) -> dict:
    extra = ["strategy.memory_size=200"] if strategy not in ("finetune", "joint") else []
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*PROTOCOL, f"strategy={strategy}", f"seed={seed}", *extra, *overrides])
    return runs.run(cfg, folder, f"{strategy} · class_il · seed {seed}")


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. dataset=split_mnist5k")
    args = parser.parse_args()
    strategies = ["finetune"] + [s for s in args.strategies if s != "finetune"]
    results: dict[str, list[dict]] = {s: [] for s in strategies}
    with tempfile.TemporaryDirectory() as tmp, RunsProgress(len(args.seeds) * len(strategies)) as runs:
        for seed in args.seeds:
            for strategy in strategies:
                summary = run_one(strategy, seed, args.overrides, Path(tmp) / f"{strategy}_{seed}", runs)
                results[strategy].append(summary)
                print(f"seed {seed} {strategy:8s} ACC {summary['metrics']['acc']:.3f} "
                      f"train {sum(summary['timing']['train_s']):.2f} s", flush=True)
    dataset = results["finetune"][0]["dataset"]
    lines = [
        f"{dataset}, class-IL, MLP 256-256, SGD lr 0.05, batch 32, 10 epochs/task, memory 200, "
        f"seeds {' '.join(map(str, args.seeds))} (mean ± std; time: median ratio of train time to finetune's)",
        "",
        "| strategy | ACC | BWT | train s (median) | time vs finetune | exemplars | memory bytes | peer ACC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_times = [sum(s["timing"]["train_s"]) for s in results["finetune"]]
    for strategy in strategies:
        runs = results[strategy]
        times = [sum(s["timing"]["train_s"]) for s in runs]
        ratio = statistics.median(t / b for t, b in zip(times, base_times))
        info = runs[0]["strategy_info"]
        lines.append(
            f"| {strategy} | {mean_std([s['metrics']['acc'] for s in runs])} "
            f"| {mean_std([s['metrics']['bwt'] for s in runs])} | {statistics.median(times):.2f} | {ratio:.1f}x "
            f"| {info.get('exemplars', '-')} | {info.get('bytes', '-')} | {PEER.get(strategy, '') if dataset == 'split_digits' else ''} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
