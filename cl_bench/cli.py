"""`clbench` command line: `run` (a Hydra app), `report`, `list`."""

from __future__ import annotations

import os
import sys
from importlib.resources import files

from cl_bench import CLBenchError

GROUPS = ("dataset", "backbone", "strategy", "device", "experiment", "logger")

USAGE = """usage: clbench <command> [args]

commands:
  run [overrides...]   train and evaluate (Hydra overrides, -m for sweeps, --help for the config groups)
  report PATH [opts]   aggregate a folder of runs into mean ± std tables and plots (report --help)
  list                 the available datasets, backbones, strategies, devices and experiments
  script NAME [args]   run one of the shipped scripts (reproductions, benchmarks; `clbench script` lists them)

add --debug to show full tracebacks."""


def config_options() -> dict[str, list[tuple[str, str]]]:
    """Options of each config group, with the first comment line of each file as its description."""
    root = files("cl_bench.conf")
    out: dict[str, list[tuple[str, str]]] = {}
    for group in GROUPS:
        entries = []
        for item in sorted(root.joinpath(group).iterdir(), key=lambda p: p.name):
            if not item.name.endswith(".yaml"):
                continue
            text = item.read_text(encoding="utf-8")
            desc = next(
                (ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#") and "@package" not in ln),
                "",
            )
            entries.append((item.name[: -len(".yaml")], desc))
        out[group] = entries
    return out


def list_command() -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for group, entries in config_options().items():
        how = f"{group}=[NAME,...], several at once" if group == "logger" else f"{group}=NAME"
        table = Table(title=f"{group} (select with {how})", title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description")
        for name, desc in entries:
            table.add_row(name, escape(desc))  # descriptions hold brackets: pip install 'clbench[wandb]'
        console.print(table)
    return 0


def quiet_parse(parser, args: list[str]):
    """argparse, but a usage error becomes one line (argparse prints the usage and exits)."""
    import contextlib
    import io

    from cl_bench import CLBenchError

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise CLBenchError((lines[-1] if lines else "bad arguments").split("error: ", 1)[-1]) from None


def override_problem(args: list[str]) -> str | None:
    """Overrides Hydra would take silently in a way the user did not mean: a key given twice
    (the last one wins) or an empty run folder (the current folder)."""
    seen: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            continue
        key = key.lstrip("+~")
        if key in seen:
            return f"{key} is given twice ({seen[key]!r} and {value!r}); give it once"
        seen[key] = value
        if key in ("hydra.run.dir", "hydra.sweep.dir") and not value.strip("'\" "):
            return f"{key} is empty; give a folder (or leave it out for a new one under outputs/)"
    return None


def own_config_folder(args: list[str]) -> bool:
    """Whether the command names a user's own config folder (its options are Hydra's to know)."""
    return any(a.startswith(("-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name",
                             "hydra.searchpath")) for a in args)


def unknown_group_option(args: list[str]) -> str | None:
    """One line for the commonest mistake, an unknown option of a config group
    (`strategy=ewcc`), before Hydra composes anything; None when every choice exists.
    Comma lists of a sweep are checked one by one; other sweep syntax is left to Hydra."""
    if own_config_folder(args):
        return None  # Hydra knows the options of a user's config folder (its errors are condensed too)
    options = None
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in GROUPS or "(" in value:
            continue
        options = options or {g: [name for name, _ in entries] for g, entries in config_options().items()}
        for choice in value.strip("[] ").split(","):  # logger=[csv,tensorboard]: a list of options
            choice = choice.strip()
            if key == "logger" and not choice:
                continue  # logger=[]
            if choice not in options[key] and not (key == "experiment" and choice == "null"):
                return (
                    f"unknown {key} {choice!r}; choose one of: {', '.join(options[key])} "
                    f"(`clbench list` describes them)"
                )
    return None


def hydra_usage_problem(args: list[str]) -> str | None:
    """Hydra's own command-line flags (`--cfg`, `-m`, ...) checked with its own parser, in one line."""
    from hydra._internal.utils import get_args_parser

    from cl_bench import CLBenchError

    parser = get_args_parser()
    parser.prog = "clbench run"
    try:
        quiet_parse(parser, args)
    except CLBenchError as exc:
        return str(exc)
    return None


def debug_enabled() -> bool:
    return os.environ.get("CLBENCH_DEBUG") == "1"


def _note_new_folders(args: list[str]) -> None:
    """Before Hydra creates the run folder: note which folders on its way do not exist yet,
    so that a refused run removes exactly those again (`cl_bench.rundir`)."""
    import datetime

    from cl_bench.rundir import note_missing

    paths = [f"outputs/{datetime.datetime.now():%Y-%m-%d}"]
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in ("hydra.run.dir", "output_dir") and value and "${" not in value:
            paths.append(value.strip("'\""))
    note_missing(paths)


class CommandLineProblem(CLBenchError):
    """A command line refused before anything ran (bad override, unknown option, ...)."""


def launch(args: list[str]) -> list[dict]:
    """`clbench run ARGS` without the printing of errors: the checks, then the Hydra app.

    Returns the summary (metrics.json's content) of each run that finished, in order; raises
    `CLBenchError` for a refused command line and the run's own exception for a failed run.
    The command line and the Python API (`cl_bench.run`) both go through here.
    """
    if "-m" in args or "--multirun" in args:  # hydra/launcher=fork (cl_bench/launcher), also from an editable install
        from hydra_plugins.clbench_launcher.fork_launcher import register

        register()
    problem = override_problem(args) or hydra_usage_problem(args) or unknown_group_option(args)
    checked: frozenset = frozenset()  # the sweep's jobs whose configs check_sweep composed
    if problem is None and ("-m" in args or "--multirun" in args):
        from cl_bench.sweep import check_sweep_jobs

        problem, checked = check_sweep_jobs(args)
    if problem:
        raise CommandLineProblem(problem)
    from cl_bench.sweep import skip_checked_jobs

    from cl_bench.app import FAILURES, SUMMARIES, SWEEP_DIRS, run_app

    _note_new_folders(args)
    argv, sys.argv = sys.argv, ["clbench run", *args]
    # Hydra re-raises instead of printing its own multi-line report; the errors are
    # condensed to one line by the caller (--debug: the full traceback).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    stderr = sys.stderr
    sys.stderr = _WithoutHydraPreamble(stderr)
    FAILURES.clear()
    SUMMARIES.clear()
    SWEEP_DIRS.clear()
    try:
        with skip_checked_jobs(checked):
            run_app()
        if FAILURES:
            raise FAILURES.pop()
        LAST_SWEEP_DIRS[:] = SWEEP_DIRS or _sweep_dir_of(args)
        return list(SUMMARIES)
    finally:
        _release_sweep_workers()
        sys.stderr, sys.argv = stderr, argv
        FAILURES.clear()
        SUMMARIES.clear()
        SWEEP_DIRS.clear()


def _release_sweep_workers() -> None:
    """After a sweep under the joblib launcher: stop its idle worker processes now. joblib's
    loky executor is reusable and would otherwise be shut down at interpreter exit, waiting
    for every worker to exit on its own (measured: ~1.8 s on a 2-worker sweep, after all
    results were written). Every job has returned by now, its results written atomically."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None) if loky is not None else None
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


# The sweep folder(s) of the last `launch` of a sweep, for the advice printed at its end.
LAST_SWEEP_DIRS: list[str] = []


def _sweep_dir_of(args: list[str]) -> list[str]:
    """The sweep folder of a sweep whose jobs ran in other processes (joblib, submitit): the one
    Hydra composed for it, else the `hydra.sweep.dir=` of the command line."""
    if "-m" not in args and "--multirun" not in args:
        return []
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(HydraConfig.get().sweep.dir)]
    except Exception:
        pass
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "hydra.sweep.dir" and "${" not in value:
            return [value.strip("'\"")]
    return []


def run_command(args: list[str]) -> int:
    from cl_bench.runner import RunInterrupted

    LAST_SWEEP_DIRS.clear()
    try:
        launch(args)
    except CommandLineProblem as exc:
        print(f"clbench: error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"clbench: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print("clbench: interrupted; run the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug_enabled():
            raise
        from cl_bench.errors import describe

        job = getattr(exc, "clbench_job", None)
        print(f"clbench: error: {describe(exc, args)}" + (f" [{job}]" if job else ""), file=sys.stderr)
        return 2
    for sweep_dir in LAST_SWEEP_DIRS:
        print(f"clbench: sweep done; compare its runs with: clbench report {sweep_dir}", file=sys.stderr)
    return 0


class _WithoutHydraPreamble:
    """stderr without the "Error executing job with overrides: [...]" line Hydra writes
    before re-raising a failed sweep job (clbench's one line names the job)."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith("Error executing job with overrides:"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def report_entry(args: list[str]) -> int:
    from cl_bench.report import report_command

    try:
        return report_command(args)
    except Exception as exc:
        if debug_enabled():
            raise
        from cl_bench.errors import describe

        print(f"clbench: error: {describe(exc)}", file=sys.stderr)
        return 2


def script_command(args: list[str]) -> int:
    """`clbench script NAME [args]`: the scripts/ folder ships inside the package as
    cl_bench.scripts, so the README's reproductions and benchmarks run from any install."""
    import runpy

    root = files("cl_bench.scripts")
    names = sorted(p.name[:-3] for p in root.iterdir() if p.name.endswith(".py") and not p.name.startswith("_"))
    if not args or args[0] in ("-h", "--help"):
        print("usage: clbench script NAME [args]   (NAME --help: its options)\n\nscripts: " + ", ".join(names))
        return 0 if args else 2
    name = args[0].removesuffix(".py")
    if name not in names:
        print(f"clbench: error: unknown script {args[0]!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    path = str(root.joinpath(f"{name}.py"))
    argv, sys.argv = sys.argv, [path, *args[1:]]
    sys.path.insert(0, os.path.dirname(path))  # the scripts import each other as siblings
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # a script's SystemExit("message"): the message, as Python prints it
        return 1
    finally:
        sys.argv = argv
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A user's own modules (`strategy._target_: my_methods.Mine`) live in the folder clbench is
    # run from: importable as with `python -m`, but after the installed packages.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    if "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1":
        argv = [a for a in argv if a != "--debug"]
        os.environ["CLBENCH_DEBUG"] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return run_command(rest)
    if command == "list":
        return list_command()
    if command == "report":
        return report_entry(rest)
    if command == "script":
        return script_command(rest)
    print(f"clbench: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def entry() -> None:
    """The `clbench` command (and `python -m cl_bench.cli`): `main`, then `exit_now`."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with `code` after what a normal exit does that leaves a trace: the
    atexit handlers (logging's flush and close, joblib's and the loggers' shutdowns) and a
    flush of stdout and stderr; then `os._exit`, without the interpreter's teardown of every
    module, which after torch and its compiler stack are imported costs about a second
    (measured: `python -c "import torch"` 1.7-1.8 s, 1.2-1.3 s with `os._exit`; a default
    `clbench run` 4.2 s, 3.1 s). Nothing is written or closed by that teardown: clbench's
    files are closed when each run ends. A normal exit instead while another non-daemon
    thread is still running (the interpreter would wait for it)."""
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken pipe: nothing more can be written anyway
                pass
        os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    entry()
