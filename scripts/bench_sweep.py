"""Wall-clock of one 4-run sweep with 1 worker and with N workers, under clbench's fork launcher
(default) or Hydra's joblib launcher.

    python scripts/bench_sweep.py                      # split_mnist5k, finetune/joint x seeds 0,1
    python scripts/bench_sweep.py --workers 2 -- train.epochs=3
    python scripts/bench_sweep.py --launcher joblib    # Hydra's joblib (loky) launcher

The 1-worker reference is the basic launcher (one process, jobs one after another), what a
sweep without a parallel launcher costs.

Each sweep runs through `clbench run -m` in a fresh folder (so nothing is skipped); the
threads per worker are set by the app (cores // workers). The speed-up is the 1-worker
time over the N-worker time; the 1-minute load average before each sweep is printed,
since other processes on the machine distort the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = ["dataset=split_mnist5k", "strategy=finetune,joint", "seed=0,1", "progress=false"]


def run_sweep(folder: Path, workers: int, extra: list[str], launcher: str = "fork") -> float:
    parallel = [f"hydra/launcher={launcher}", f"hydra.launcher.n_jobs={workers}"] if workers > 1 else []
    cmd = [sys.executable, "-m", "cl_bench.cli", "run", "-m", *SWEEP, *extra, *parallel, f"hydra.sweep.dir={folder}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"sweep failed:\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--launcher", default="fork", choices=("fork", "joblib"))
    parser.add_argument("extra", nargs="*", help="extra overrides for every run")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, args.workers):
            load = os.getloadavg()[0]
            folder = Path(tmp) / f"w{workers}"
            wall = run_sweep(folder, workers, args.extra, args.launcher)
            runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*/metrics.json"))]
            threads = sorted({r["config"]["device"]["num_threads"] for r in runs})
            train = sum(sum(r["timing"]["train_s"]) for r in runs)
            results[workers] = wall
            print(f"{workers} worker(s): {len(runs)} runs, {wall:.1f} s wall, torch threads per run {threads}, "
                  f"sum of the runs' train time {train:.1f} s, load average before {load:.2f}")
    print(f"speed-up with {args.workers} workers ({args.launcher} launcher): {results[1] / results[args.workers]:.2f}x "
          f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
