"""Data-path benchmark: clbench's runner (strategy=finetune) against a bare PyTorch loop.

Both do the same optimizer steps on the same uint8 tensors already on the device: for
each task a fresh SGD optimizer, `train.epochs` passes over a seeded permutation in
batches of `train.batch_size`, each batch indexed, scaled, normalised (and augmented
when the stream has an augmentation), then every task's test set evaluated in large
batches under `torch.inference_mode()`. The runner's train and eval times come from
its own timers (metrics.json); the bare loop is timed the same way. Runs alternate
in one process; the medians and their ratios are printed.

`--clock cpu` (the default) times both sides in process CPU time, which a busy shared
machine disturbs far less than wall time; with one intra-op thread (`device.num_threads=1`)
CPU time is the work done. `--clock wall` uses wall time (use it on a GPU). The runner
side is the runner's own hot loop: `Runner._train_task` and `runner.evaluate` per task.

    python scripts/bench_data_path.py                                  # Split Digits, MLP
    python scripts/bench_data_path.py dataset=split_mnist5k            # 28x28 MNIST digits
    python scripts/bench_data_path.py dataset=split_mnist dataset.root=DIR backbone=mlp
    python scripts/bench_data_path.py --processes 6 device.num_threads=1   # 6 fresh processes

On a virtual machine the ratio of one process can sit several percent away from another's
for the whole process (measured here: 1.02 to 1.12 for the same command), so `--processes N`
runs the measurement in N fresh processes, one after another, and prints each process's
ratios and their median.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench.config import build
from cl_bench.runner import Runner, evaluate, resolve_device, seed_everything


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(cfg, stream, device: torch.device, clock=time.process_time) -> tuple[float, float]:
    """(train seconds, eval seconds) of a plain PyTorch script doing the runner's steps."""
    seed_everything(cfg.seed)
    model = build(cfg.backbone, "backbone", input_shape=stream.input_shape, num_outputs=stream.num_outputs).to(device)
    shape = (1, -1) + (1,) * (len(stream.input_shape) - 1)
    mean = stream.transform.mean.to(device).view(shape)
    std = stream.transform.std.to(device).view(shape)
    augment = stream.transform.augment
    gen = torch.Generator().manual_seed(cfg.seed)
    bs, epochs, lr, ebs = cfg.train.batch_size, cfg.train.epochs, cfg.train.lr, cfg.train.eval_batch_size
    # train.precision=bf16: the runner's autocast, around the same steps and evaluations
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if str(cfg.train.precision) == "bf16" \
        else contextlib.nullcontext
    train_s = eval_s = 0.0
    for task in stream.tasks:
        _sync(device)
        t0 = clock()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        x_all, y_all = task.train.x, task.train.y
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y_all), generator=gen).to(device)
            for i in range(0, len(y_all), bs):
                idx = perm[i : i + bs]
                x = x_all[idx].float() / 255
                if augment is not None:
                    x = augment(x, gen)
                with autocast():
                    loss = F.cross_entropy(model((x - mean) / std), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        _sync(device)
        t1 = clock()
        model.eval()
        with torch.inference_mode(), autocast():
            for other in stream.tasks:
                correct = 0
                for i in range(0, len(other.test), ebs):
                    x = (other.test.x[i : i + ebs].float() / 255 - mean) / std
                    correct += (model(x).argmax(1) == other.test.y[i : i + ebs]).sum()
                (correct / len(other.test)).item()
        eval_s += clock() - t1
        train_s += t1 - t0
    return train_s, eval_s


class Timed(NamedTuple):
    train_s: float
    eval_s: float
    acc: float  # final average accuracy (the scenario's)
    steps: int
    scenario: str


def runner_loop(cfg, folder: Path, clock=time.process_time) -> Timed:
    """The runner's own per-task train and evaluation calls, timed with `clock`; the same
    work as the train + eval time of a `clbench run` (metrics.json's timing)."""
    runner = Runner(cfg, folder)
    runner.prepare()
    ebs = cfg.train.eval_batch_size
    with runner._autocast():  # the untrained model's row, untimed: a run draws from the RNG there too
        evaluate(runner.strategy, runner.stream, ebs, runner.eval_split)
    train_s = eval_s = 0.0
    acc, steps = None, 0
    for task in runner.stream.tasks:
        runner._sync()
        t0 = clock()
        steps += runner._train_task(task, None)["steps"]
        runner._sync()
        t1 = clock()
        with runner._autocast():
            acc, _ = evaluate(runner.strategy, runner.stream, ebs, runner.eval_split)
        runner._sync()
        eval_s += clock() - t1
        train_s += t1 - t0
        runner._save_artifacts(task)  # untimed, as in a run (a generator's samples draw from the RNG)
    return Timed(train_s, eval_s, float(acc.mean()), steps, runner.stream.scenario)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--processes", type=int, default=1, help="fresh processes to measure in, one after another")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one process's result, for --processes
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=split_mnist5k train.epochs=2")
    args = parser.parse_args()
    if args.processes > 1:
        return across_processes(args)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", "strategy=finetune", "checkpoint=false", *args.overrides])
    if cfg.train.optimizer.value != "sgd" or cfg.train.momentum or cfg.train.weight_decay:
        raise SystemExit("the bare loop is plain SGD: use train.optimizer=sgd without momentum or weight decay")
    device = resolve_device(cfg.device.name)
    if cfg.device.num_threads is not None:
        torch.set_num_threads(cfg.device.num_threads)
    stream = build(cfg.dataset, "dataset", scenario=cfg.scenario.value, seed=cfg.seed).to(device)
    bare_loop(cfg, stream, device, clock)  # warm-up: allocator, lazy imports, kernels
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        summary = Runner(cfg, Path(tmp) / "full").run()  # warm-up, and a full run for the facts printed below
        for r in range(args.repeats):
            bare.append(bare_loop(cfg, stream, device, clock))
            ours.append(runner_loop(cfg, Path(tmp) / f"run{r}", clock)[:2])
    steps = sum(t["steps"] for t in summary["train_log"])
    med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
    bt, be, ot, oe = med(bare, 0), med(bare, 1), med(ours, 0), med(ours, 1)
    ratios = {"train": ot / bt, "eval": oe / be, "train+eval": (ot + oe) / (bt + be)}
    if args.json:
        print(json.dumps(ratios))
        return
    print(f"{summary['dataset']} ({'x'.join(map(str, stream.input_shape))}) / {cfg.backbone._target_.rsplit('.', 1)[-1]} / "
          f"finetune / {summary['scenario']}, device {summary['device']}, {torch.get_num_threads()} threads, "
          f"{steps} steps of {cfg.train.batch_size}, median of {args.repeats} alternating runs, {args.clock} clock")
    print("            bare loop    clbench    ratio")
    print(f"train      {bt:8.3f} s {ot:8.3f} s   {ratios['train']:5.3f}")
    print(f"eval       {be:8.3f} s {oe:8.3f} s   {ratios['eval']:5.3f}")
    print(f"train+eval {bt + be:8.3f} s {ot + oe:8.3f} s   {ratios['train+eval']:5.3f}")


def across_processes(args) -> None:
    """The measurement in `args.processes` fresh processes: each one's ratios, and their medians."""
    command = [sys.executable, __file__, "--json", "--repeats", str(args.repeats), "--clock", args.clock,
               *args.overrides]
    runs = []
    for i in range(args.processes):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench_data_path: process {i + 1} failed:\n{done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"process {i + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()), flush=True)
    print(f"median of {args.processes} processes (clbench / bare loop, {args.repeats} alternating runs each): "
          + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.3f}" for k in runs[0])
          + f"; train+eval range {min(r['train+eval'] for r in runs):.3f}-{max(r['train+eval'] for r in runs):.3f}")


if __name__ == "__main__":
    main()
