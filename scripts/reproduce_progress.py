"""The progress display of the reproduce_*.py scripts (a helper they import, not a script).

A script that runs many runs shows one line for all of them, on stderr:

    run 3/24  ewc · task_il · seed 0  ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━  0:04:12  eta 0:29:24

(elapsed time; time left estimated as the mean time of the runs done so far times the
runs left, counting down between runs). Beneath it, while a run is going (rich 14.1 or
later: older versions draw one live display at a time, so they show this line only), the
runner's own display: each task's training bar and a line per long strategy phase (Fisher,
generator training, herding, ...). That part is cleared when the run ends, so what
stays on the screen is the script's own output, one line per run, and the tables.
On a console that is not a terminal (output to a file, CI) nothing is drawn while the
runs go; the script's line is written once at the end.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from cl_bench.runner import Runner


_NESTED_LIVE = tuple(int(part) for part in version("rich").split(".")[:2]) >= (14, 1)


class _TimeLeft(ProgressColumn):
    """Mean time of the runs done so far x runs left, counting down while a run goes."""

    def render(self, task) -> Text:
        done, per_run = task.completed, task.fields.get("per_run")
        if not done or per_run is None or task.total is None:
            return Text("eta -:--:--", style="progress.remaining")
        left = max(0.0, per_run * task.total - (task.elapsed or 0.0))
        return Text(f"eta {timedelta(seconds=int(left))}", style="progress.remaining")


class _RunnerBeneath(Runner):
    """A Runner whose display (tasks, strategy phases) shows beneath the script's line
    while it runs and is cleared when the run ends."""

    def _progress_bar(self):
        # Off where nothing would be drawn (rich would still end it with a blank line), and
        # before rich 14.1, which cannot draw a live display inside another one.
        if not self.console.is_terminal or not _NESTED_LIVE:
            return nullcontext(None)
        bar = super()._progress_bar()  # a rich Progress, or an empty context with progress=false
        if isinstance(bar, Progress):
            bar.live.transient = True
        return bar


class RunsProgress:
    """`with RunsProgress(n) as runs: summary = runs.run(cfg, folder, "ewc · task_il · seed 0")`."""

    def __init__(self, total: int) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TimeElapsedColumn(),
            _TimeLeft(),
            console=self.console,
            # the scripts' print()s go above the display on a terminal; piped stdout stays untouched
            redirect_stdout=sys.stdout.isatty(),
        )
        self.total, self.done = total, 0
        self.line = self.progress.add_task("", total=total, per_run=None, start=False)

    def __enter__(self) -> "RunsProgress":
        self.progress.__enter__()
        self.progress.start_task(self.line)
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def run(self, cfg, folder: Path, label: str) -> dict:
        """Run one configuration (its runner's display shown beneath while it goes); its summary."""
        self.progress.update(self.line, description=f"run {self.done + 1}/{self.total}  {label}")
        summary = _RunnerBeneath(cfg, folder, console=self.console).run()
        self.done += 1
        elapsed = next(t.elapsed for t in self.progress.tasks if t.id == self.line) or 0.0
        self.progress.update(self.line, completed=self.done, per_run=elapsed / self.done)
        return summary


if __name__ == "__main__":
    sys.exit("reproduce_progress.py is a helper of the reproduce_*.py scripts: run one of those")
