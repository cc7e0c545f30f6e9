"""One run folder, one process: an exclusive lock, and a refused run leaves no trace.

The app opens the run folder before it reads the checkpoint or builds anything:

1. `RunFolder.open()` takes an exclusive OS lock (`flock` on `.clbench.lock` in the
   folder). The OS drops it when the process dies, so a killed run never leaves the
   folder locked; a second run on a locked folder stops in one line.
2. Everything that can refuse the run (config checks, a checkpoint of another config,
   results already there, a missing dataset) happens next, writing nothing.
3. `refuse()` undoes what opening did: it removes the lock file and the folder itself
   when this process created them, so the folder is exactly as it was found.
   `commit()` instead claims the folder: it removes temporary files left by a write
   that was killed half-way, the records of an earlier failure (and with
   `resume=false` the earlier run's results), and writes Hydra's `.hydra/` record of
   the config (Hydra's own copy is switched off in `conf/config.yaml`,
   `hydra.output_subdir: null`, because Hydra writes it before the app can check
   anything).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Optional

from cl_bench import CLBenchError

LOCK_FILE = ".clbench.lock"
RECORD_DIR = ".hydra"
# Files of one run, removed before a run starts over (resume=false).
RUN_FILES = ("checkpoint.pt", "metrics.json", "results.md", "accuracy_matrix.csv",
             "accuracy_matrix_task_aware.csv", "failed.json",
             # the loggers' files and folders at their default places (cl_bench.loggers)
             "steps.csv", "evals.csv", "scalars.csv", "mlflow.db")
RUN_FOLDERS = ("artifacts", "tensorboard", "wandb", "mlartifacts")
# The temporary names `results.atomic_write_bytes` uses: `.<name>.<random>.tmp`.
TEMP_GLOB = ".*.tmp"

# A token unique to this process, for default run folders (`${clbench_run_id:}`).
_RUN_ID = f"{os.getpid():x}{secrets.token_hex(2)}"
# Folders that did not exist when `clbench run` started (noted by the CLI before Hydra
# creates the run folder): the only ones a refused run may remove again.
MISSING: set[Path] = set()


def note_missing(paths: Iterable[str | os.PathLike]) -> None:
    """Remember which of `paths` and their parents do not exist yet."""
    for path in paths:
        path = Path(path).absolute()
        for folder in (path, *path.parents):
            if folder.exists():
                break
            MISSING.add(folder)


def created_here(folder: Path) -> bool:
    folder = Path(folder).absolute()
    return folder in MISSING or folder.name.endswith(_RUN_ID)


def run_id() -> str:
    return _RUN_ID


def _register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("clbench_run_id"):
        OmegaConf.register_new_resolver("clbench_run_id", run_id, use_cache=True)


_register_resolver()


def created_chain(path: Path) -> list[Path]:
    """`path` and the folders above it that this run created and that hold nothing else
    (deepest first): what a refused run removes again."""
    chain: list[Path] = []
    child = None
    for folder in (Path(path).absolute(), *Path(path).absolute().parents):
        try:
            entries = {p.name for p in folder.iterdir()} if folder.exists() else set()
        except OSError:
            break
        if not (created_here(folder) and entries <= {child}):
            break
        chain.append(folder)
        child = folder.name
    return chain


def remove_chain(chain: list[Path]) -> None:
    for folder in chain:  # deepest first; rmdir removes only empty folders
        try:
            folder.rmdir()
        except OSError:
            break


class RunFolder:
    """The run folder `path`, locked by this process between `open()` and `release()`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None
        self._created_lock = False
        self._created_dirs: list[Path] = []

    # ----- opening ------------------------------------------------------------------------
    def open(self) -> "RunFolder":
        self._created_dirs = created_chain(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(self.path))
            self._lock()
        except OSError as exc:
            self._remove_created()
            if isinstance(exc, FileExistsError) or (self.path.exists() and not self.path.is_dir()):
                raise CLBenchError(f"cannot use {self.path} as the run folder: it exists and is not a folder") from None
            where = exc.filename or self.path
            raise CLBenchError(f"cannot use {where} as the run folder: {exc.strerror or exc}") from None
        return self

    @property
    def empty(self) -> bool:
        """Whether the folder holds nothing (apart from the lock file this run created)."""
        ignore = {LOCK_FILE} if self._created_lock else set()
        return self.path.is_dir() and not any(p.name not in ignore for p in self.path.iterdir())

    def _lock(self) -> None:
        import fcntl

        lock = self.path / LOCK_FILE
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                self._created_lock = True
            except FileExistsError:
                fd = os.open(lock, os.O_RDWR)
                self._created_lock = False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                raise CLBenchError(
                    f"{self.path} is in use by another clbench run{holder}; wait for it to finish "
                    "or choose another folder (hydra.run.dir=...)"
                ) from None
            # A refused run may have removed the file between our open and our lock:
            # hold the lock only on the file that is still there.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)

    def _holder(self) -> str:
        try:
            pid = (self.path / LOCK_FILE).read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    # ----- leaving ------------------------------------------------------------------------
    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def refuse(self) -> None:
        """Release the folder and remove what `open` created: the folder is as it was found."""
        if self._fd is not None and self._created_lock:
            try:
                (self.path / LOCK_FILE).unlink()
            except OSError:
                pass
        self.release()
        self._remove_created()

    def _remove_created(self) -> None:
        remove_chain(self._created_dirs)

    # ----- claiming -----------------------------------------------------------------------
    def commit(self, record: dict, start_over: bool = False) -> None:
        """Claim the folder for this run: clear leftovers and write the config record.

        `record` maps file names under `.hydra/` to their YAML text. `start_over`
        (resume=false) also removes the earlier run's results, checkpoint and artifacts.
        """
        from cl_bench.results import atomic_write_text

        self.remove_temp_files()
        names: Iterable[str] = RUN_FILES if start_over else ("failed.json",)
        for name in names:
            (self.path / name).unlink(missing_ok=True)
        if start_over:
            for name in RUN_FOLDERS:
                shutil.rmtree(self.path / name, ignore_errors=True)
        for name, text in record.items():
            atomic_write_text(self.path / RECORD_DIR / name, text)
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def remove_temp_files(self) -> None:
        for folder in (self.path, self.path / "artifacts", self.path / RECORD_DIR):
            if folder.is_dir():
                for tmp in folder.glob(TEMP_GLOB):
                    tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RunFolder":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.release()
