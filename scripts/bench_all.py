"""Every strategy's training + evaluation time against a bare PyTorch loop, as one table.

The README's performance table is this script's output. Protocol (issue 17's): Split
Digits, class-IL, the default MLP 64-256-256-10, SGD lr 0.05, batch 32, 10 epochs per
task (400 steps), each strategy with its shipped defaults, in class-IL where it supports it
(else task-IL: the parameter-isolation methods; the bare loop stays class-IL fine-tuning). In one process, on the same
stream: per repetition every strategy once, in turn, each timed right after a bare loop (plain
SGD fine-tuning written as a PyTorch script, `bench_data_path.bare_loop`) and a finetune run of
its own; the ratios are each strategy's to those two neighbours, medians over the repetitions
(the bare loop's time: the median of all its runs). Time is the runner's own per-task train and evaluate calls (the work of
metrics.json's train + eval time), without start-up, data loading, the random-init
evaluation or result writing; in process CPU time by default (`--clock cpu`: with one torch
thread it is the work done, and on a shared virtual machine wall time moved by 2x between
runs of the same job), `--clock wall` on a GPU or with several threads.

    python scripts/bench_all.py                         # all strategies, 3 repetitions
    python scripts/bench_all.py --strategies finetune,ewc,gem --repeats 5 -- train.epochs=5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import bench_data_path  # the bare loop (same folder)
import torch
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench.config import build
from cl_bench.runner import resolve_device

PROTOCOL = ["dataset=split_digits", "train.epochs=10", "train.optimizer=sgd", "train.lr=0.05", "train.batch_size=32",
            "progress=false", "checkpoint=false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=None, help="comma-separated (default: every conf/strategy option)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, after the protocol's")
    args = parser.parse_args()
    names = args.strategies.split(",") if args.strategies else sorted(
        p.name[:-5] for p in files("cl_bench.conf").joinpath("strategy").iterdir() if p.name.endswith(".yaml"))
    from hydra.utils import get_object

    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        configs = {}
        for n in names:  # class-IL where the strategy supports it, else task-IL (the isolation methods)
            cfg = compose("config", overrides=[*PROTOCOL, f"strategy={n}", *args.overrides])
            if "class_il" not in get_object(cfg.strategy._target_).scenarios:
                cfg = compose("config", overrides=[*PROTOCOL, f"strategy={n}", "scenario=task_il", *args.overrides])
            configs[n] = cfg
        base = compose("config", overrides=[*PROTOCOL, "strategy=finetune", *args.overrides])
    device = resolve_device(base.device.name)
    if base.device.num_threads is not None:
        torch.set_num_threads(base.device.num_threads)
    stream = build(base.dataset, "dataset", scenario=base.scenario.value, seed=base.seed).to(device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    bare_loop = lambda: sum(bench_data_path.bare_loop(base, stream, device, clock))  # noqa: E731
    bare_loop()  # warm-up
    # Each strategy's run is timed right after a bare loop and a finetune run of its own, and its
    # ratios are taken to those two: this virtual machine's speed drifts over the minutes a whole
    # repetition takes (the generative methods), so a ratio to a distant reference would carry it.
    bare, ours, facts = [], {n: [] for n in names}, {}
    to_bare, to_finetune = {n: [] for n in names}, {n: [] for n in names}
    reference = configs.get("finetune", base)
    seconds = lambda timed: timed.train_s + timed.eval_s  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for n in names:
                b = bare_loop()
                f = None if n == "finetune" else seconds(bench_data_path.runner_loop(reference, Path(tmp) / f"ref-{n}-{r}", clock))
                timed = bench_data_path.runner_loop(configs[n], Path(tmp) / f"{n}-{r}", clock)
                t = seconds(timed)
                if f is None:  # finetune is its own reference
                    f = t
                bare.append(b)
                ours[n].append(t)
                to_bare[n].append(t / b)
                to_finetune[n].append(t / f)
                facts[n] = (timed.steps, timed.acc, timed.scenario)
    b = statistics.median(bare)
    print(f"Split Digits / MLP {'-'.join(map(str, [64, *base.backbone.hidden_sizes, 10]))} / class-IL / SGD lr "
          f"{base.train.lr} / batch {base.train.batch_size} / {base.train.epochs} epochs per task; {device}, "
          f"{torch.get_num_threads()} thread(s); {args.clock} clock, median of {args.repeats}")
    print("| job | scenario | steps | train+eval s | x bare loop | x finetune | final acc |")
    print("|---|---|---|---|---|---|---|")
    print(f"| bare PyTorch loop | class_il | {facts.get('finetune', ('',))[0]} | {b:.3f} | 1.00 | – | – |")
    for n in names:
        t = statistics.median(ours[n])
        print(f"| {n} | {facts[n][2]} | {facts[n][0]} | {t:.3f} | {statistics.median(to_bare[n]):.2f} | "
              f"{statistics.median(to_finetune[n]):.2f} | {facts[n][1]:.4f} |")


if __name__ == "__main__":
    main()
