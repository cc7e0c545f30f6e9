"""`hydra/launcher=fork`: clbench's local parallel launcher (installed as `hydra_plugins.clbench_launcher`).

Hydra's joblib launcher runs jobs in loky worker processes that are *spawned*: each imports
torch, Hydra and clbench again (about 3 s per worker on a 2-core machine) before its first
job, so a sweep of many small runs spends much of its time starting workers. This launcher
forks its workers from the sweep's own process after that process has imported everything a
run needs (torch, its optimizer and compiler stack, the runner, the strategies), so workers
start in milliseconds with those modules already loaded, copy-on-write.

Jobs are handed out in order, one at a time, to `n_jobs` workers (joblib's convention:
-1 = all cores, -2 = all but one); each job composes its config exactly as under the basic
launcher, so results are bit-identical to running the jobs one after the other (tested).
The parent process never runs a torch computation nor touches CUDA before forking (both
are unsafe to fork), and workers never fork again. Linux and other systems with
`os.fork` only; elsewhere the launcher refuses in one line (use hydra/launcher=joblib).
"""
