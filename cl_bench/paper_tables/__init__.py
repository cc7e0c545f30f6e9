"""Published numbers of the papers clbench reproduces, as versioned data files.

Each `<name>.csv` holds one paper's table: one row per (dataset, scenario, method,
metric) with the published value (and its spread where printed), the table it comes
from, the paper's protocol in words and as clbench overrides (`protocol_overrides`,
space-separated `key=value`: what a run must have set to follow the paper), and
`verified`: true only where the number was checked against the paper itself (read in
the paper's own text); each file's `#` header says where its numbers come from otherwise
(an image of the table or a results notebook in the authors' repository, a README). Values
are in percent. Metrics: `acc`, `acc_task_aware` and `forgetting` (x 100) compare with a
run's summary metrics; a row whose `dataset` is one task of a `dataset=sequence` run (PackNet,
Piggyback) compares `acc` / `error` (top-1, = 100 - accuracy) with that dataset's accuracy after
the last task; `error_top5` has no counterpart in a run and is not compared.
`clbench report PATH --against <name>` prints a folder's results beside a table
(cl_bench.report.against_table).
"""

from __future__ import annotations

import csv
from importlib.resources import files

from cl_bench import CLBenchError

COLUMNS = ("version", "paper", "table", "dataset", "scenario", "method", "metric", "value", "spread",
           "protocol", "protocol_overrides", "verified")


def available() -> list[str]:
    return sorted(p.name[:-4] for p in files(__name__).iterdir() if p.name.endswith(".csv"))


def load(name: str) -> list[dict]:
    """The rows of paper table `name`; a one-line error naming the tables there are."""
    if name not in available():
        raise CLBenchError(f"unknown paper table {name!r}; available: {', '.join(available())}")
    text = files(__name__).joinpath(f"{name}.csv").read_text()
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    for row in rows:
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise CLBenchError(f"paper table {name} lacks the column(s) {', '.join(missing)}")
        row["value"] = float(row["value"])
        row["spread"] = float(row["spread"]) if row["spread"] else None
        row["verified"] = row["verified"].strip().lower() == "true"
    return rows
