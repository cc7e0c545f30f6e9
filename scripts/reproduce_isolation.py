"""Parameter-isolation strategies against fine-tuning, in task-IL, on the offline streams.

Runs `finetune` and the eight isolation strategies (pnn, packnet, piggyback, hat, cpg,
den, feature_extraction, individual_networks) with one protocol for all (default:
Adam, lr 3e-3, 3 epochs: a protocol where fine-tuning forgets), and prints per
dataset a Markdown table: final ACC, BWT, the worst final accuracy over tasks, the
model size after each task (total parameters, parameters used by the last task, mask
bytes) and the training time with its ratio to finetune's, all from the runs'
metrics.json summaries.

    python scripts/reproduce_isolation.py [--datasets split_digits,split_mnist5k] [--seeds 0]
        [--out results.json] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401

try:
    from scripts.reproduce_progress import RunsProgress
except ImportError:  # run as python scripts/reproduce_isolation.py: this folder is on sys.path
    from reproduce_progress import RunsProgress

STRATEGIES = ["finetune", "pnn", "packnet", "piggyback", "hat", "cpg", "den", "feature_extraction",
              "individual_networks"]
PROTOCOL = ["train.optimizer=adam", "train.lr=0.003", "train.epochs=3"]


def run(overrides: list[str], folder: Path, runs: RunsProgress, label: str) -> dict:
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["checkpoint=false", "scenario=task_il", *overrides])
    return runs.run(cfg, folder, label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="split_digits,split_mnist5k")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="")
    args, overrides = parser.parse_known_args()
    overrides = overrides or PROTOCOL
    results = {}
    datasets, names, seeds = args.datasets.split(","), args.strategies.split(","), args.seeds.split(",")
    with tempfile.TemporaryDirectory() as tmp, RunsProgress(len(datasets) * len(names) * len(seeds)) as runs:
        for ds in datasets:
            for name in names:
                for seed in seeds:
                    folder = Path(tmp) / f"{ds}-{name}-{seed}"
                    s = run([f"dataset={ds}", f"strategy={name}", f"seed={seed}", *overrides], folder, runs,
                            f"{name} · {ds} · task_il · seed {seed}")
                    R = np.asarray(s["accuracy_matrix"])
                    info = [log["strategy"] for log in s["train_log"]]
                    results.setdefault(ds, {}).setdefault(name, []).append({
                        "acc": s["metrics"]["acc"], "bwt": s["metrics"]["bwt"], "min_final": float(R[-1].min()),
                        "final_row": R[-1].tolist(), "train_s": sum(s["timing"]["train_s"]),
                        "params_after_task": [log["parameters"] for log in s["train_log"]],
                        "params_used_per_task": info[-1].get("parameters_per_task"),
                        "mask_bytes_after_task": [i.get("mask_bytes", 0) for i in info],
                    })
    print(f"protocol: {' '.join(overrides)}  (task_il, seeds {args.seeds})")
    for ds, by_name in results.items():
        ft_time = statistics.mean(r["train_s"] for r in by_name.get("finetune", [{"train_s": float("nan")}]))
        print(f"\n### {ds}\n")
        print("| strategy | ACC % | BWT % | min final % | params after each task | params used per task (final) "
              "| mask bytes (final) | train s | x finetune |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, rs in by_name.items():
            mean = lambda k: statistics.mean(r[k] for r in rs)  # noqa: E731
            r0 = rs[0]
            print(f"| {name} | {100 * mean('acc'):.2f} | {100 * mean('bwt'):.2f} | {100 * mean('min_final'):.2f} "
                  f"| {' / '.join(map(str, r0['params_after_task']))} | {' / '.join(map(str, r0['params_used_per_task'] or []))} "
                  f"| {r0['mask_bytes_after_task'][-1]} | {mean('train_s'):.2f} | {mean('train_s') / ft_time:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"protocol": overrides, "results": results}, indent=1))


if __name__ == "__main__":
    main()
