"""GPU throughput: clbench's runner against a bare PyTorch loop on Split CIFAR-10 + ResNet-18.

Writes CIFAR-10's python batches itself (50,000 + 10,000 32x32 images by default: each
class a colour with noise and a class-dependent stripe, so the network learns something),
then times, per precision (32 and bf16), the runner's training and evaluation against a
plain PyTorch loop doing the same steps: same stream on the device, same batches, the
same random crop + flip augmentation, SGD, `train.epochs` per task, an evaluation of every
task after each. Runs alternate; medians are reported as images per second and as the
ratio clbench / bare loop (1.00 = no overhead).

    python scripts/bench_gpu.py                         # device=cuda, 5,000 images per class
    python scripts/bench_gpu.py --device cpu --per-class 20 --test-per-class 10 --repeats 1
    python scripts/bench_gpu.py -- train.batch_size=256 device.deterministic=false
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import bench_data_path  # the bare loop (same folder)
import bench_overhead  # the timed Runner.run (same folder)
import numpy as np
import torch
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench.config import build
from cl_bench.data.cifar import write_cifar10_batches
from cl_bench.runner import resolve_device


def make_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    colour = np.random.default_rng(0).integers(60, 196, size=(10, 3, 1, 1))
    y = np.repeat(np.arange(10), per_class)
    x = colour[y] + rng.normal(0, 40, size=(len(y), 3, 32, 32))
    for c in range(10):  # a horizontal stripe whose row depends on the class
        x[y == c, :, 3 * c : 3 * c + 2, :] += 60
    return np.clip(x, 0, 255).astype(np.uint8), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--per-class", type=int, default=5000, help="training images per class (CIFAR-10: 5,000)")
    parser.add_argument("--test-per-class", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per task")
    parser.add_argument("--precisions", default="32,bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=None, help="where to write the CIFAR-10 files (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both sides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp) / "data"
        write_cifar10_batches(root, make_images(args.per_class, 1), make_images(args.test_per_class, 2))
        device = resolve_device(args.device)
        rows = []
        for precision in args.precisions.split(","):
            with initialize_config_module("cl_bench.conf", version_base="1.3"):
                cfg = compose("config", overrides=[
                    "dataset=split_cifar10", "backbone=resnet18", f"dataset.root={root}", "dataset.download=false",
                    "dataset.verify=false", f"device.name={args.device}", f"train.precision={precision}",
                    f"train.epochs={args.epochs}", "progress=false", "checkpoint=false", *args.overrides])
            if cfg.train.optimizer.value != "sgd" or cfg.train.momentum or cfg.train.weight_decay:
                raise SystemExit("the bare loop is plain SGD: use train.optimizer=sgd without momentum or weight decay")
            stream = build(cfg.dataset, "dataset", scenario=cfg.scenario.value, seed=cfg.seed).to(device)
            bare_loop = lambda: bench_data_path.bare_loop(cfg, stream, device, time.perf_counter)  # noqa: E731
            bare_loop()  # warm-up: cuDNN, allocator, lazy imports
            bare, ours = [], []
            for r in range(args.repeats):
                bare.append(bare_loop())
                _, _, summary = bench_overhead.clbench_run(cfg, Path(tmp) / f"run-{precision}-{r}")
                ours.append((sum(summary["timing"]["train_s"]), sum(summary["timing"]["eval_s"])))
            images = sum(log["samples"] for log in summary["train_log"])
            med = lambda runs, i: statistics.median(run[i] for run in runs)  # noqa: E731
            rows.append((precision, images, med(bare, 0), med(ours, 0), med(bare, 0) + med(bare, 1),
                         med(ours, 0) + med(ours, 1), summary["metrics"]["acc"], summary["peak_memory_bytes"]))
            del stream
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"Split CIFAR-10 ({args.per_class * 10} training images, 5 tasks) / ResNet-18 / finetune, "
          f"{args.epochs} epoch(s) per task, batch {cfg.train.batch_size}, {name}, median of {args.repeats}")
    print("precision   bare img/s   clbench img/s   train ratio   train+eval ratio   final acc   peak memory")
    for precision, images, bt, ot, b_all, o_all, acc, peak in rows:
        print(f"{precision:9}   {images / bt:10.0f}   {images / ot:13.0f}   {ot / bt:11.3f}   {o_all / b_all:16.3f}"
              f"   {acc:9.4f}   {peak / 2**20:8.0f} MiB")


if __name__ == "__main__":
    main()
