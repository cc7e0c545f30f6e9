"""GEM and A-GEM cost against finetune and a bare PyTorch loop (issue 17, item 2).

The issue's protocol: Split Digits, class-IL, MLP 64-256-256-10, plain SGD lr 0.05,
batch 32, 10 epochs (400 steps), memory 200 (A-GEM: reference batches of 256), one
torch thread. In one process, alternating: the bare loop (`bench_overhead.bare_loop`),
then finetune, A-GEM and GEM through clbench's Runner (`bench_overhead.clbench_run`),
then A-GEM and GEM with their previous gradient computation (the reference kept in
tests/test_gem_speed.py, swapped into the Runner's strategy). Times are the runner's
train + eval timers (wall clock); medians and the min-max spread over the repeats are
printed with the ratios to finetune and to the bare loop. Each run's accuracy matrix
is checked against the previous implementation's (the runs are deterministic).

    python scripts/bench_gem.py [--repeats 5] [--no-previous] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import bench_overhead  # the bare loop and the timed Runner.run, shared with the overhead benchmark (same folder)
import numpy as np
import torch
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench.runner import resolve_device

PROTOCOL = (
    "dataset=split_digits", "scenario=class_il", "backbone=mlp", "train.optimizer=sgd", "train.lr=0.05",
    "train.batch_size=32", "train.epochs=10", "device.num_threads=1", "checkpoint=false", "seed=0",
)
METHODS = {
    "finetune": (),
    "agem": ("strategy.memory_size=200", "strategy.sample_size=256"),
    "gem": ("strategy.memory_size=200",),
}


def load_reference():
    """tests/test_gem_speed.py, which keeps the previous GEM/A-GEM gradient computation."""
    path = Path(__file__).resolve().parents[1] / "tests" / "test_gem_speed.py"
    if not path.is_file():
        sys.exit(f"bench_gem needs a clbench checkout (it compares against {path.name} in tests/); "
                 "run it as python scripts/bench_gem.py there")
    spec = importlib.util.spec_from_file_location("gem_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def previous_run(reference, cfg, folder: Path) -> tuple[float, dict]:
    summary = reference.ReferenceRunner(cfg, folder).run()
    return sum(summary["timing"]["train_s"]) + sum(summary["timing"]["eval_s"]), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-previous", action="store_true", help="skip timing the previous implementation")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of the protocol")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfgs = {
            m: compose("config", overrides=["progress=false", *PROTOCOL, f"strategy={m}", *extra, *args.overrides])
            for m, extra in METHODS.items()
        }
    reference = load_reference()
    device = resolve_device(cfgs["finetune"].device.name)
    names = ["bare", *METHODS] + ([] if args.no_previous else ["agem (previous)", "gem (previous)"])
    times: dict[str, list[float]] = {n: [] for n in names}
    matrices: dict[str, list] = {n: [] for n in names}
    projected: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bench_overhead.bare_loop(cfgs["finetune"], device)  # warm-up: allocator, lazy imports, kernels
        for m in METHODS:
            bench_overhead.clbench_run(cfgs[m], Path(tmp) / f"warm-{m}")
        for r in range(args.repeats):
            times["bare"].append(bench_overhead.bare_loop(cfgs["finetune"], device))
            for name in names[1:]:
                folder = Path(tmp) / f"{name.replace(' ', '_')}-{r}"
                if name.endswith("(previous)"):
                    seconds, summary = previous_run(reference, cfgs[name.split()[0]], folder)
                else:
                    seconds, _, summary = bench_overhead.clbench_run(cfgs[name], folder)
                times[name].append(seconds)
                matrices[name].append(np.asarray(summary["accuracy_matrix"]))
                projected[name] = [log["strategy"].get("projected_steps") for log in summary["train_log"]]

    steps = 400 if not args.overrides else "?"
    print(f"Split Digits class-IL, MLP 64-256-256-10, SGD lr 0.05, batch 32, 10 epochs ({steps} steps), memory 200, "
          f"A-GEM sample 256; {torch.get_num_threads()} thread, device {device}, {args.repeats} alternating repeats, "
          "train+eval seconds (the runner's wall-clock timers)")
    fine, bare = statistics.median(times["finetune"]), statistics.median(times["bare"])
    print(f"{'':18s}{'median':>8s}{'min':>8s}{'max':>8s}{'/ finetune':>12s}{'/ bare':>8s}")
    for name in names:
        t = times[name]
        med = statistics.median(t)
        print(f"{name:18s}{med:8.3f}{min(t):8.3f}{max(t):8.3f}{med / fine:12.2f}{med / bare:8.2f}")
    for m in METHODS:
        runs = matrices[m]
        assert all(np.array_equal(runs[0], R) for R in runs), f"{m}: the accuracy matrix changed between repeats"
    if not args.no_previous:
        for m in ("agem", "gem"):
            same = all(np.array_equal(matrices[m][0], R) for R in matrices[f"{m} (previous)"])
            before = projected[f"{m} (previous)"]
            projections = "same" if projected[m] == before else f"previous: {before}"
            print(f"{m}: accuracy matrix {'equal to' if same else 'DIFFERENT from'} the previous implementation's; "
                  f"projected steps per task {projected[m]} ({projections}); final ACC {matrices[m][0][-1].mean():.4f}")
            if not same or projected[m] != before:
                raise SystemExit(1)


if __name__ == "__main__":
    main()
