"""Kill-and-resume campaign: SIGKILL `clbench run` at random moments, rerun it, compare.

For each trial a strategy and a `checkpoint_every` are drawn, the run is started as a
real process (the `clbench run` a user types), killed with SIGKILL at a random moment
of its work (drawn once it has claimed its run folder: before the first checkpoint,
between tasks or mid-epoch), then run again with the same command
until it completes. The finished folder's accuracy matrices must be byte-identical to
those of an uninterrupted reference run of the same config, and the final weights (the
model in the last checkpoint) bit-identical.

    python scripts/kill_resume_campaign.py              # 24 kills, 1 torch thread
    python scripts/kill_resume_campaign.py --kills 8 --strategies finetune,si
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

STRATEGIES = ("finetune", "ewc", "si", "er", "lwf", "icarl", "hat", "packnet")
EVERY = ("1steps", "1epochs", "3steps", "")
COMMON = ("dataset=split_digits", "train.batch_size=16", "progress=false", "device.num_threads=1", "seed=0")
FILES = ("accuracy_matrix.csv", "accuracy_matrix_task_aware.csv")


def scenario_of(strategy: str) -> str:
    from hydra import compose, initialize_config_module
    from hydra.utils import get_object

    import cl_bench.config  # noqa: F401

    with initialize_config_module("cl_bench.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"strategy={strategy}"])
    scenarios = get_object(cfg.strategy._target_).scenarios
    return next(s for s in ("class_il", "task_il", "domain_il") if s in scenarios)


EPOCHS = 3


def command(strategy: str, scenario: str, folder: Path, every: str) -> list[str]:
    return [sys.executable, "-m", "cl_bench.cli", "run", f"strategy={strategy}", f"scenario={scenario}", *COMMON,
            f"train.epochs={EPOCHS}", f"checkpoint_every={every}", f"hydra.run.dir={folder}"]


def wait_until_claimed(proc: subprocess.Popen, folder: Path) -> None:
    """Until the run has locked its folder and accepted the config (its pid in the lock file):
    the kill moments are then drawn over the run's work, not over the start-up."""
    lock = folder / ".clbench.lock"
    while proc.poll() is None:
        try:
            if lock.read_text().strip() == str(proc.pid):
                return
        except OSError:
            pass
        time.sleep(0.01)


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_to_end(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return time.perf_counter() - t0


def checkpoint_state(folder: Path) -> str:
    path = folder / "checkpoint.pt"
    if not path.exists():
        return "no checkpoint"
    ckpt = torch.load(path, weights_only=False, map_location="cpu")
    mid, done = ckpt.get("mid"), ckpt["progress"]["tasks_done"]
    if mid is None:
        return f"after task {done - 1}" if done else "start"
    return f"task {mid['task']} ep {mid['epoch']} batch {mid['batch']}"


def final_weights(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=False, map_location="cpu")["model"]


def same(folder: Path, reference: Path) -> bool:
    for name in FILES:
        a, b = folder / name, reference / name
        if a.exists() != b.exists() or (a.exists() and a.read_bytes() != b.read_bytes()):
            return False
    wa, wb = final_weights(folder), final_weights(reference)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments")
    parser.add_argument("--root", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per task (longer runs: more mid-task kills)")
    args = parser.parse_args()
    globals()["EPOCHS"] = args.epochs
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    strategies = args.strategies.split(",")
    root = Path(args.root or tempfile.mkdtemp(prefix="kill_resume_"))
    root.mkdir(parents=True, exist_ok=True)

    references, durations, scenarios = {}, {}, {}
    for strategy in strategies:
        scenarios[strategy] = scenario_of(strategy)
        folder = root / f"reference_{strategy}"
        wall = run_to_end(command(strategy, scenarios[strategy], folder, ""), root)
        # The kill moments: uniform over the run's training and evaluation (drawn once the run
        # has claimed its folder, so the imports and the data loading before it are not drawn).
        timing = json.loads((folder / "metrics.json").read_text())["timing"]
        work = sum(timing["train_s"]) + sum(timing["eval_s"])
        durations[strategy] = (wall - work, work)
        references[strategy] = folder
        print(f"reference {strategy:<9} {scenarios[strategy]:<9} {wall:5.1f} s (start-up {wall - work:.1f} s)", flush=True)

    rows, identical = [], 0
    for trial in range(args.kills):
        strategy = strategies[trial % len(strategies)]
        every = EVERY[rng.randrange(len(EVERY))]
        _, work = durations[strategy]
        delay = rng.uniform(0.0, work)
        folder = root / f"trial{trial:02d}_{strategy}"
        cmd = command(strategy, scenarios[strategy], folder, every)
        proc = subprocess.Popen(cmd, cwd=root, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until_claimed(proc, folder)
        try:
            proc.wait(timeout=delay)
            killed = False  # it finished before the kill
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
        at_kill = checkpoint_state(folder) if killed else "finished"
        resume_s = run_to_end(cmd, root)
        ok = same(folder, references[strategy])
        identical += ok
        label = every or '""'
        rows.append((trial, strategy, label, delay, at_kill, resume_s, "yes" if ok else "NO"))
        print(f"{trial:>3}  {strategy:<9} {label:<8} kill@+{delay:5.2f}s  {at_kill:<24} "
              f"resume {resume_s:5.1f}s  identical: {'yes' if ok else 'NO'}", flush=True)

    print()
    print("| # | strategy | checkpoint_every | SIGKILL after the run claimed its folder | checkpoint at the kill | resume | byte-identical |")
    print("|---|---|---|---|---|---|---|")
    for trial, strategy, every, delay, at_kill, resume_s, ok in rows:
        print(f"| {trial} | {strategy} | {every} | {delay:.2f} s | {at_kill} | {resume_s:.1f} s | {ok} |")
    print(f"\n{identical}/{len(rows)} resumes byte-identical to the uninterrupted reference (matrices and final weights)")
    print(f"runs in {root}")
    return 0 if identical == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
