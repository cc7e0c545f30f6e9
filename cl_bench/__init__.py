"""clbench: a continual-learning benchmark runner.

Python API (notebooks, scripts): `cl_bench.run` runs exactly what `clbench run` runs.
"""

__version__ = "0.1.0"


class CLBenchError(Exception):
    """An error the user can act on: the CLI prints its message as one line and exits non-zero."""


def run(
    strategy: str | None = None,
    dataset: str | None = None,
    backbone: str | None = None,
    overrides: "list[str] | tuple[str, ...]" = (),
    *,
    multirun: bool = False,
    config_dir: str | None = None,
) -> "dict | list[dict]":
    """Run clbench from Python, through the same code path as the command line.

    `cl_bench.run(strategy="ewc", dataset="split_digits", overrides=["train.epochs=2", "seed=1"])`
    is `clbench run strategy=ewc dataset=split_digits train.epochs=2 seed=1`: the same
    config checks, run folder (`output_dir=...` or Hydra's `outputs/...`), checkpoints,
    result files and skip-if-done. Returns the run's summary: the content of its
    metrics.json (`summary["metrics"]["acc"]`, `summary["accuracy_matrix"]`, ...).

    `multirun=True` is `clbench run -m ...` (comma-separated values sweep) and returns the
    list of the finished runs' summaries. `config_dir` is `--config-dir`: a folder of your
    own config options (e.g. `strategy/mine.yaml`), searched before the shipped ones.

    Errors are raised, not printed: `CLBenchError` (its message is the one line the CLI
    would print) for a refused config or a failed run, `KeyboardInterrupt` for Ctrl-C,
    `cl_bench.runner.RunInterrupted` when a stop signal checkpointed the run.
    """
    from cl_bench.cli import launch

    args = [f"{group}={value}" for group, value in
            (("strategy", strategy), ("dataset", dataset), ("backbone", backbone)) if value is not None]
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'key=value' strings, e.g. ['train.epochs=2']")
    args += [str(o) for o in overrides]
    if config_dir is not None:
        args = ["--config-dir", str(config_dir), *args]
    if multirun:
        args = ["-m", *args]
    try:
        summaries = launch(args)
    except CLBenchError:
        raise
    except Exception as exc:
        from cl_bench.errors import describe

        if type(exc).__name__ == "RunInterrupted":
            raise
        raise CLBenchError(describe(exc, args)) from exc
    if multirun:
        return summaries
    if len(summaries) != 1:
        raise CLBenchError(f"expected one finished run, got {len(summaries)}")
    return summaries[0]
