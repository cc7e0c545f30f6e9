"""clbench against a peer library (Avalanche) at equal work, side by side in one process.

bench_all's protocol (Split Digits, class-IL, the default MLP 64-256-256-10, SGD lr 0.05,
batch 32, 10 epochs per task, memory 200 where there is one), each strategy run once by
clbench (its shipped defaults) and once by Avalanche on the same tensors, with the same
network, optimizer, batch size and epochs, alternating, `--repeats` times; medians.
Time on both sides is the process CPU time of training + evaluation of every task's test
set after each task, without start-up or data loading (clbench: the runner's per-task train
and evaluate calls, as bench_data_path times them; Avalanche: its `train(experience)` +
`eval(test_stream)` calls, with an accuracy metric and no logger). CPU time, because wall
time on a shared virtual machine moved by 2x between runs of the same job here; with one
torch thread (`device.num_threads=1`) it is the work done.
Avalanche gets the images already normalised as float tensors (clbench normalises uint8
batches on the fly), which only helps it.

Equal work per step, where the two libraries' defaults differ:
- replay (ER / Avalanche Replay): 32 new + 32 memory samples per step, memory 200;
- A-GEM: the reference batch is the whole memory, 200 samples (clbench's sample_size 256 is
  capped by its 200 stored samples; Avalanche keeps `patterns_per_exp` per task and draws
  `sample_size`=200 of them);
- GEM: one gradient per past task every step; clbench splits its 200 samples over the past
  tasks, Avalanche stores 80 per task, the same total over the run (800 sample-gradients per
  step summed over tasks 2-5);
- iCaRL: memory 200 shared over the seen classes, exemplars joined to the new data.
EWC differs in kind: clbench's default Fisher is the true Fisher from 1,000 per-sample
gradients, Avalanche's the empirical Fisher of minibatch gradients; the time is reported
as each library's EWC at its default.

Needs `pip install avalanche-lib` (not a clbench dependency; 0.6.0 was measured).

    python scripts/bench_peer.py -- device.num_threads=1
    python scripts/bench_peer.py --strategies finetune,agem --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import bench_data_path  # the runner's timed train and evaluate calls (same folder)
import torch
from bench_all import PROTOCOL
from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench.config import build
from cl_bench.runner import resolve_device, seed_everything

STRATEGIES = ("finetune", "ewc", "lwf", "er", "si", "agem", "gem", "icarl")


def peer_strategy(name: str, cfg, model: torch.nn.Module, device: torch.device, n_tasks: int):
    """The Avalanche strategy doing `name`'s work under cfg's optimizer, batch and epochs."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import AGEM, EWC, GEM, ICaRL, LwF, Naive, Replay, SynapticIntelligence
    from avalanche.training.plugins import EvaluationPlugin

    s, t = cfg.strategy, cfg.train
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    common = dict(optimizer=torch.optim.SGD(model.parameters(), lr=t.lr), train_mb_size=t.batch_size,
                  train_epochs=t.epochs, eval_mb_size=t.eval_batch_size, device=device, evaluator=evaluator)
    if name == "icarl":  # its own BCE loss and nearest-mean-of-exemplars classifier
        return ICaRL(feature_extractor=model.body, classifier=model.head, memory_size=s.memory_size,
                     buffer_transform=None, fixed_memory=True, **common)
    criterion = torch.nn.CrossEntropyLoss()
    kinds = {
        "finetune": lambda: Naive(model=model, criterion=criterion, **common),
        "ewc": lambda: EWC(model=model, criterion=criterion, ewc_lambda=s.get("ewc_lambda", 1000.0), **common),
        "lwf": lambda: LwF(model=model, criterion=criterion, alpha=s.get("alpha", 1.0),
                           temperature=s.get("temperature", 2.0), **common),
        "er": lambda: Replay(model=model, criterion=criterion, mem_size=s.get("memory_size", 200), **common),
        "si": lambda: SynapticIntelligence(model=model, criterion=criterion, si_lambda=s.get("c", 3.0),
                                           eps=s.get("xi", 0.1), **common),
        "agem": lambda: AGEM(model=model, criterion=criterion, patterns_per_exp=s.memory_size,
                             sample_size=min(s.sample_size, s.memory_size), **common),
        "gem": lambda: GEM(model=model, criterion=criterion, patterns_per_exp=2 * s.memory_size // n_tasks,
                           memory_strength=s.memory_strength, **common),
    }
    if name not in kinds:
        raise SystemExit(f"no Avalanche counterpart set up for {name!r}; choose from {', '.join(STRATEGIES)}")
    return kinds[name]()


def peer_run(name: str, cfg, stream, device: torch.device) -> tuple[float, float]:
    """(train + eval seconds, final average accuracy) of the Avalanche run."""
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    seed_everything(cfg.seed)
    model = build(cfg.backbone, "backbone", input_shape=stream.input_shape, num_outputs=stream.num_outputs).to(device)
    with torch.no_grad():  # normalised float images, as a dataset library would hand them over
        joined = lambda split: TensorDataset(  # noqa: E731
            torch.cat([stream.transform(getattr(t, split).x.to(device)) for t in stream.tasks]),
            torch.cat([getattr(t, split).y.to(device) for t in stream.tasks]))
        # clbench's tasks, in its class order (the classes of task i are experience i's)
        bench = nc_benchmark(joined("train"), joined("test"), n_experiences=len(stream.tasks), task_labels=False,
                             shuffle=False, fixed_class_order=[c for t in stream.tasks for c in t.outputs])
    strategy = peer_strategy(name, cfg, model, device, len(stream.tasks))
    elapsed = 0.0
    for experience in bench.train_stream:
        t0 = time.process_time()
        strategy.train(experience)
        results = strategy.eval(bench.test_stream)
        elapsed += time.process_time() - t0
    acc = next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream"))
    return elapsed, float(acc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both sides, after the protocol's")
    args = parser.parse_args()
    try:
        import avalanche
    except ImportError:
        raise SystemExit("bench_peer needs Avalanche: pip install avalanche-lib") from None
    names = args.strategies.split(",")
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        configs = {n: compose("config", overrides=[*PROTOCOL, f"strategy={n}", *args.overrides]) for n in names}
    base = next(iter(configs.values()))
    device = resolve_device(base.device.name)
    if base.device.num_threads is not None:
        torch.set_num_threads(base.device.num_threads)
    stream = build(base.dataset, "dataset", scenario=base.scenario.value, seed=base.seed).to(device)
    ours, peer = {n: [] for n in names}, {n: [] for n in names}
    acc = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:  # warm-up: lazy imports and allocator on both sides
            bench_data_path.runner_loop(configs[n], Path(tmp) / f"{n}-warm")
            peer_run(n, configs[n], stream, device)
        for r in range(args.repeats):
            for n in names:
                timed = bench_data_path.runner_loop(configs[n], Path(tmp) / f"{n}-{r}")
                ours[n].append(timed.train_s + timed.eval_s)
                peer_s, peer_acc = peer_run(n, configs[n], stream, device)
                peer[n].append(peer_s)
                acc[n] = (timed.acc, peer_acc)
    print(f"Split Digits / MLP / class-IL / SGD lr {base.train.lr} / batch {base.train.batch_size} / "
          f"{base.train.epochs} epochs per task; {device}, {torch.get_num_threads()} thread(s); "
          f"Avalanche {avalanche.__version__}; CPU time, median of {args.repeats}, alternating")
    print("| strategy | clbench s | Avalanche s | x faster | clbench acc | Avalanche acc |")
    print("|---|---|---|---|---|---|")
    for n in names:
        o, p = statistics.median(ours[n]), statistics.median(peer[n])
        print(f"| {n} | {o:.3f} | {p:.3f} | {p / o:.2f} | {acc[n][0]:.4f} | {acc[n][1]:.4f} |")


if __name__ == "__main__":
    main()
