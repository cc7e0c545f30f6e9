"""Generative replay (DGR, MeRGAN, DGM-w, DGM-a) beside finetune, er and joint, class-IL.

Runs each strategy on the same stream, seed and protocol and prints ACC, BWT, the
classifier's and the generator's training time and sizes, and where the sample grids
were saved. `mergan_jtr` is MeRGAN with strategy.variant=jtr (joint training with
replay) beside `mergan` (replay alignment). Use a GPU for the default generator settings:

    python scripts/reproduce_generative.py --dataset split_digits --device cuda
    python scripts/reproduce_generative.py --dataset split_mnist5k --device cuda \
        --strategies dgr mergan --set strategy.generator_passes=20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401

try:
    from scripts.reproduce_progress import RunsProgress
except ImportError:  # run as python scripts/reproduce_generative.py: this folder is on sys.path
    from reproduce_progress import RunsProgress

DEFAULT = ["finetune", "er", "joint", "dgr", "mergan", "mergan_jtr", "dgm_w", "dgm_a"]
GENERATIVE = ("dgr", "mergan", "dgm_w", "dgm_a")
# names that are a strategy config plus overrides
VARIANTS = {"mergan_jtr": ("mergan", ["strategy.variant=jtr"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="split_digits")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--strategies", nargs="+", default=DEFAULT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/generative")
    parser.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for the generative strategies")
    parser.add_argument("--protocol", nargs="*", default=["train.epochs=5"], help="overrides for every strategy")
    args = parser.parse_args()
    from importlib.resources import files

    conf = Path(str(files("cl_bench.conf").joinpath("strategy")))  # the installed config tree
    rows, names = [], []
    for name in args.strategies:
        strategy = VARIANTS.get(name, (name, []))[0]
        if (conf / f"{strategy}.yaml").exists():
            names.append(name)
        else:
            print(f"skipping {name}: no conf/strategy/{strategy}.yaml", file=sys.stderr)
    with RunsProgress(len(names)) as runs:
        for name in names:
            strategy, variant = VARIANTS.get(name, (name, []))
            extra = args.set if strategy in GENERATIVE else []
            overrides = [
                f"dataset={args.dataset}", f"strategy={strategy}", "scenario=class_il", f"device.name={args.device}",
                f"seed={args.seed}", "checkpoint=false", *args.protocol, *extra, *variant,
            ]
            with initialize_config_module("cl_bench.conf", version_base="1.3"):
                cfg = compose("config", overrides=overrides)
            out = Path(args.out) / args.dataset / name
            s = runs.run(cfg, out, f"{name} · class_il · seed {args.seed}")
            info = s.get("strategy_info") or {}
            gen_s = info.get("generator_train_s_total", 0.0)
            total = sum(s["timing"]["train_s"])
            rows.append({
                "strategy": name, "acc": s["metrics"]["acc"], "bwt": s["metrics"]["bwt"],
                "train_s": total, "classifier_s": total - gen_s, "generator_s": gen_s,
                "classifier_params": s["parameters"], "generator_params": info.get("generator_parameters", 0),
                "artifacts": str(out / "artifacts") if (out / "artifacts").exists() else "",
            })
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.dataset}, class_il, seed {args.seed}, {' '.join(args.protocol)} {' '.join(args.set)}")
    print("| strategy | ACC | BWT | train s (classifier + generator) | classifier params | generator params |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['acc']:.4f} | {r['bwt']:.4f} | {r['train_s']:.1f} "
            f"({r['classifier_s']:.1f} + {r['generator_s']:.1f}) | {r['classifier_params']} | {r['generator_params']} |"
        )


if __name__ == "__main__":
    main()
