"""Every strategy's shipped defaults on every offline stream, optimizer protocol and scenario.

The contract of `conf/strategy/*.yaml`: with no strategy override, each strategy trains
without divergence on `split_digits` and `split_mnist5k`, under the default optimizer
(SGD, lr 0.05) and under Adam (lr 0.01), in every scenario it supports. This script runs
that grid with the default training protocol (5 epochs) and prints one Markdown row per
run: status (completed, or the one-line error of a diverged/refused run), ACC, BWT,
fine-tuning's BWT on the same stream/protocol/scenario for comparison, and the
strategy's warnings.

    python scripts/check_defaults.py                               # the whole grid (long)
    python scripts/check_defaults.py --strategies mas,ewc --streams split_digits
    python scripts/check_defaults.py --out defaults.json train.epochs=3

Exit status 1 when any run failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from hydra import compose, initialize_config_module

import cl_bench.config  # noqa: F401  (registers the schema)
from cl_bench import CLBenchError
from cl_bench.config import build
from cl_bench.runner import Runner

OPTIMIZERS = {"sgd": [], "adam": ["train.optimizer=adam", "train.lr=0.01"]}
STREAMS = ["split_digits", "split_mnist5k"]


def strategies() -> list[str]:
    return sorted(p.name[:-5] for p in files("cl_bench.conf").joinpath("strategy").iterdir() if p.name.endswith(".yaml"))


def compose_cfg(overrides: list[str]):
    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        return compose("config", overrides=["progress=false", "checkpoint=false", "device.num_threads=1", *overrides])


def scenarios_of(name: str) -> tuple[str, ...]:
    return build(compose_cfg([f"strategy={name}"]).strategy, "strategy").scenarios


def run_one(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        try:
            s = Runner(compose_cfg(overrides), Path(folder) / "run").run()
        except CLBenchError as exc:
            return {"status": "failed", "error": str(exc)}
    m = s["metrics"]
    return {"status": "completed", "acc": m["acc"], "bwt": m["bwt"], "warnings": s.get("warnings", [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=",".join(strategies()))
    parser.add_argument("--streams", default=",".join(STREAMS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    rows, baseline = [], {}
    print("| strategy | stream | optimizer | scenario | status | ACC | BWT | finetune BWT | warnings |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.strategies.split(","):
        for stream in args.streams.split(","):
            for opt in args.optimizers.split(","):
                for scenario in scenarios_of(name):
                    common = [f"dataset={stream}", f"scenario={scenario}", *OPTIMIZERS[opt], *args.overrides]
                    key = (stream, opt, scenario)
                    if key not in baseline:
                        baseline[key] = run_one(["strategy=finetune", *common])
                    r = run_one([f"strategy={name}", *common])
                    rows.append({"strategy": name, "stream": stream, "optimizer": opt, "scenario": scenario, **r})
                    ft = baseline[key].get("bwt")
                    status = r["status"] if r["status"] == "completed" else f"FAILED: {r['error']}"
                    cells = [f"{r[k]:.4f}" if k in r else "" for k in ("acc", "bwt")]
                    print(f"| {name} | {stream} | {opt} | {scenario} | {status} | {cells[0]} | {cells[1]} | "
                          f"{'' if ft is None else f'{ft:.4f}'} | {'; '.join(r.get('warnings', []))} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["status"] != "completed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
