"""Runner overhead: clbench's `run` against a bare PyTorch loop doing the same steps.

Both sides, in one process, on the same tensors: for each task a fresh SGD optimizer,
`epochs` passes over a seeded permutation in batches of `batch_size` (normalised on
the fly), then an evaluation of every task's test set. clbench adds its own work on
top (the random-init evaluation, checkpoints, result files); the ratio says what that
costs. Runs alternate and the median is reported.

    python scripts/bench_overhead.py [--repeats 5] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import bench_data_path  # the bare loop, shared with the data-path benchmark (same folder)
import torch
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401
from cl_bench.config import build
from cl_bench.runner import Runner, resolve_device


def bare_loop(cfg, device: torch.device) -> float:
    """The same training and evaluation written as a plain PyTorch script (the data-path
    benchmark's loop), in wall-clock seconds."""
    stream = build(cfg.dataset, "dataset", scenario=cfg.scenario.value, seed=cfg.seed).to(device)
    return sum(bench_data_path.bare_loop(cfg, stream, device, time.perf_counter))


def clbench_run(cfg, folder: Path) -> tuple[float, float, dict]:
    t0 = time.perf_counter()
    summary = Runner(cfg, folder).run()
    total = time.perf_counter() - t0
    loop = sum(summary["timing"]["train_s"]) + sum(summary["timing"]["eval_s"])
    return loop, total, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", *args.overrides])
    if cfg.train.optimizer.value != "sgd" or cfg.train.momentum or cfg.train.weight_decay:
        raise SystemExit("the bare loop is plain SGD; compare with train.optimizer=sgd and no momentum/decay")
    device = resolve_device(cfg.device.name)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # warm torch's lazy imports
    bare_loop(cfg, device)  # warm-up (data loading caches, allocator)
    ours_loop, ours_total, bare = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            bare.append(bare_loop(cfg, device))
            loop, total, summary = clbench_run(cfg, Path(tmp) / f"run{r}")
            ours_loop.append(loop)
            ours_total.append(total)
    b = statistics.median(bare)
    lo, to = statistics.median(ours_loop), statistics.median(ours_total)
    steps = sum(t["steps"] for t in summary["train_log"])
    print(f"config: {summary['dataset']} / {summary['backbone']} / {summary['strategy']} / {summary['scenario']}, "
          f"device {summary['device']}, {steps} steps, {args.repeats} repeats (median)")
    print(f"bare PyTorch loop (train + eval)       {b:8.3f} s")
    print(f"clbench train + eval time              {lo:8.3f} s   ratio {lo / b:5.2f}")
    print(f"clbench whole Runner.run()             {to:8.3f} s   ratio {to / b:5.2f}")
    print("  (also loads the data, evaluates the untrained model, writes checkpoints and results)")
    print(f"final average accuracy (clbench run)   {summary['metrics']['acc']:.4f}")


if __name__ == "__main__":
    main()
