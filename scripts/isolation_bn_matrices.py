"""Isolation strategies on a batch-norm backbone with the real optimizer protocol.

Runs the task-IL isolation strategies (default: packnet, cpg, hat, piggyback, pnn) on
Split CIFAR-10 written as real CIFAR python batches (small synthetic images: a class
colour and pattern under heavy noise, `--per-class` training images per class) with a
batch-norm ResNet (default: reduced_resnet18, nf 8) and SGD with momentum 0.9 and weight
decay 5e-4 (`--optimizer adamw` for AdamW), and prints for each strategy its accuracy
matrix and the drift of task 0's logits (on a fixed batch of its test images, task 0's
outputs) between the end of task 0 and the end of the stream: an isolation method must
show 0. With `--den` it also prints DEN's model size on Split Digits (mlp, defaults).

    python scripts/isolation_bn_matrices.py [--backbone reduced_resnet18] [--nf 8]
        [--strategies packnet,cpg,hat,piggyback,pnn] [--optimizer sgd] [--epochs 2] [--den]

The cl_bench imported is the first on the path: `PYTHONPATH=/other/checkout python
scripts/isolation_bn_matrices.py` measures another checkout (its own conf/ is used).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

import cl_bench

ROOT = Path(cl_bench.__file__).resolve().parents[1]
if (ROOT / "conf" / "__init__.py").is_file() and "cl_bench.conf" not in sys.modules:
    # the conf/ of the checkout being measured, not the editable install's
    spec = importlib.util.spec_from_file_location("cl_bench.conf", ROOT / "conf" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "conf")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["cl_bench.conf"] = module
    spec.loader.exec_module(module)

from hydra import compose, initialize_config_module  # noqa: E402

import cl_bench.config  # noqa: E402,F401
from cl_bench.runner import Runner  # noqa: E402

OPTIMIZERS = {
    "sgd": ["train.optimizer=sgd", "train.lr=0.01", "train.momentum=0.9", "train.weight_decay=5e-4"],
    "adamw": ["train.optimizer=adamw", "train.lr=0.003", "train.weight_decay=0.01"],
}


def cifar_files(folder: Path, per_class: int, test_per_class: int, seed: int = 0) -> list[str]:
    """CIFAR-10 python batches of learnable but not trivial 32x32 images."""
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "tests" / "real_format.py").is_file():
        sys.exit("isolation_bn_matrices needs a clbench checkout (it writes its data with tests/real_format.py); "
                 "run it as python scripts/isolation_bn_matrices.py there")
    sys.path.insert(0, str(checkout))
    from tests.real_format import write_cifar

    rng = np.random.default_rng(seed)
    n = per_class + test_per_class
    colour = rng.integers(70, 186, size=(10, 3, 1, 1))
    stripes = (np.arange(32)[None, :] // rng.integers(2, 9, size=(10, 1)) % 2)[:, None, None, :] * 30.0
    y = np.repeat(np.arange(10), n)
    x = colour[y] + stripes[y] + rng.normal(0, 45, size=(len(y), 3, 32, 32))
    x = np.clip(x, 0, 255).astype(np.uint8)
    train = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    test = np.concatenate([np.flatnonzero(y == c)[per_class:] for c in range(10)])
    write_cifar(folder, 10, (x[train], y[train]), (x[test], y[test]))
    return [f"dataset.root={folder}", "dataset.download=false", "dataset.verify=false"]


def compose_cfg(overrides: list[str]):
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        return compose("config", overrides=["progress=false", "checkpoint=false", "device.num_threads=1", *overrides])


def run_with_drift(overrides: list[str], folder: Path) -> tuple[dict, float]:
    """The run's summary and max |logit change| of task 0 (its outputs, fixed test batch)."""
    original = Runner._train_task
    seen: dict = {}

    def spy(self, task, bar):
        log = original(self, task, bar)
        s = self.strategy
        if "x" not in seen:
            t0 = self.stream.tasks[0]
            seen["x"] = self.stream.transform(t0.test.x[:64].to(s.device))
            seen["outputs"] = torch.tensor(t0.outputs, device=s.device)
        s.set_training(False)
        with torch.no_grad():
            seen.setdefault("logits", []).append(s.predict(seen["x"], 0)[:, seen["outputs"]].clone())
        return log

    Runner._train_task = spy
    try:
        summary = Runner(compose_cfg(overrides), folder).run()
    finally:
        Runner._train_task = original
    logits = seen["logits"]
    return summary, float((logits[-1] - logits[0]).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="reduced_resnet18")
    parser.add_argument("--nf", type=int, default=8, help="backbone.nf (reduced_resnet18, resnet32)")
    parser.add_argument("--strategies", default="packnet,cpg,hat,piggyback,pnn")
    parser.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=30)
    parser.add_argument("--den", action="store_true", help="also print DEN's size on split_digits (mlp)")
    args, extra = parser.parse_known_args()
    torch.set_num_threads(1)
    print(f"cl_bench from {ROOT}")
    with tempfile.TemporaryDirectory() as tmp:
        data = cifar_files(Path(tmp) / "data", args.per_class, args.test_per_class)
        backbone = [f"backbone={args.backbone}"]
        if args.backbone in ("reduced_resnet18", "resnet32"):
            backbone.append(f"backbone.nf={args.nf}")
        protocol = ["dataset=split_cifar10", "scenario=task_il", *data, *backbone, *OPTIMIZERS[args.optimizer],
                    f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", *extra]
        print(f"protocol: {' '.join(p for p in protocol if not p.startswith('dataset.root'))}")
        for name in args.strategies.split(","):
            print(f"\n## {name}")
            try:
                summary, drift = run_with_drift([*protocol, f"strategy={name}"], Path(tmp) / name)
            except Exception as exc:  # noqa: BLE001  (report and go on with the next strategy)
                print(f"refused/failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                if not isinstance(exc, cl_bench.CLBenchError):
                    traceback.print_exc(limit=3, file=sys.stdout)
                continue
            R = np.asarray(summary["accuracy_matrix"])
            print("accuracy matrix R[i, j] (row: after task i, column: task j)")
            for row in R:
                print("  " + " ".join(f"{v:6.3f}" for v in row))
            print(f"ACC {summary['metrics']['acc']:.4f}  BWT {summary['metrics']['bwt']:+.4f}  "
                  f"task-0 logit drift (max abs) {drift:.3e}  parameters {summary['train_log'][-1]['parameters']}")
    if args.den:
        with tempfile.TemporaryDirectory() as tmp:
            protocol = ["dataset=split_digits", "backbone=mlp", "scenario=task_il", "strategy=den",
                        "train.optimizer=adam", "train.lr=0.01", "train.epochs=5"]
            summary = Runner(compose_cfg(protocol), Path(tmp) / "den").run()
            info = summary["strategy_info"]
            base = summary["train_log"][0]["parameters"]
            print(f"\n## den (split_digits, mlp [256, 256], {' '.join(protocol[4:])})")
            print(f"parameters after each task: {[log['parameters'] for log in summary['train_log']]} "
                  f"({summary['train_log'][-1]['parameters'] / base:.2f}x the first)")
            print(f"units per layer: {info['units']}  added: {info['units_added']}  split: {info['units_split']}  "
                  f"ACC {summary['metrics']['acc']:.4f}")


if __name__ == "__main__":
    main()
