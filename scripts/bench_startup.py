"""Whole-process wall time: `clbench run` on the default config against a bare PyTorch script.

The bare script is what a researcher would write for the same job: import torch and
scikit-learn, load the digits, the same stratified 70/30 split, the same MLP (64-256-256-10),
SGD, 5 tasks x 5 epochs of batches of 32, an evaluation of every task after each. Both run
as fresh processes, alternating, `--repeats` times; medians. The difference is what
clbench's own start-up costs (Hydra, composing and checking the config, its modules,
checkpoints and result files) beyond the work itself.

    python scripts/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = '''
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.manual_seed(0)
data = load_digits()
x = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
x_tr, x_te, y_tr, y_te = train_test_split(x, data.target, test_size=0.3, stratify=data.target, random_state=0)
x_tr, x_te = torch.from_numpy(x_tr).float() / 255, torch.from_numpy(x_te).float() / 255
y_tr, y_te = torch.from_numpy(y_tr).long(), torch.from_numpy(y_te).long()
mean, std = x_tr.mean(), x_tr.std()
x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                            torch.nn.ReLU(), torch.nn.Linear(256, 10))
gen = torch.Generator().manual_seed(0)
tasks = [(2 * t, 2 * t + 1) for t in range(5)]
for a, b in tasks:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    keep = (y_tr == a) | (y_tr == b)
    xs, ys = x_tr[keep], y_tr[keep]
    for epoch in range(5):
        perm = torch.randperm(len(ys), generator=gen)
        for i in range(0, len(ys), 32):
            idx = perm[i:i + 32]
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.inference_mode():
        accs = [(model(x_te[(y_te == c) | (y_te == d)]).argmax(1) == y_te[(y_te == c) | (y_te == d)]).float().mean().item()
                for c, d in tasks]
print("final average accuracy", sum(accs) / len(accs))
'''


def timed(cmd: list[str], cwd: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bare_py = Path(tmp) / "bare.py"
        bare_py.write_text(BARE)
        bare, ours = [], []
        clbench = [sys.executable, "-m", "cl_bench.cli", "run", "progress=false"]
        timed(clbench + [f"output_dir={tmp}/warm"], tmp)  # warm: the OS file cache, clbench's decoded-data cache
        for r in range(args.repeats):
            bare.append(timed([sys.executable, str(bare_py)], tmp))
            ours.append(timed(clbench + [f"output_dir={tmp}/run{r}"], tmp))
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"whole process, median of {args.repeats} alternating runs, {os.cpu_count()} cores:")
    print(f"bare PyTorch script      {b:6.2f} s")
    print(f"clbench run (defaults)   {o:6.2f} s   difference {o - b:+.2f} s   ratio {o / b:.2f}")


if __name__ == "__main__":
    main()
