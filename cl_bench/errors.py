"""One line for any error a run or a report can end with.

`describe(exc)` is what `clbench` prints after "clbench: error: ". clbench's own errors
(`CLBenchError`) already are one line. Hydra's and OmegaConf's composition errors are
condensed to the key, the problem and the valid choices (their "full_key:",
"object_type=" and "Config search path" lines are dropped); OS errors name the path and
the OS reason; YAML errors the file and line. Anything else is an internal error: its
type and first line, and `--debug` for the traceback.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from cl_bench import CLBenchError

_NOISE = re.compile(r"^\s*(full_key:|reference_type=|object_type=|Config search path|provider=|See https://)")


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in str(text).splitlines() if ln.strip() and not _NOISE.match(ln)]


def _full_key(exc: BaseException) -> Optional[str]:
    key = getattr(exc, "full_key", None)
    if key:
        return str(key)
    match = re.search(r"full_key: (\S+)", str(exc))
    return match.group(1) if match else None


def _valid_keys(args: Sequence[str], full_key: str) -> list[str]:
    """The keys next to `full_key` in the config composed without the override that named it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    parent = full_key.rpartition(".")[0]
    kept = [a for a in args if not a.startswith("-") and a.lstrip("+~").partition("=")[0] != full_key]
    try:
        if GlobalHydra.instance().is_initialized():
            cfg = compose("config", overrides=kept)
        else:
            with initialize_config_module(config_module="cl_bench.conf", version_base="1.3"):
                cfg = compose("config", overrides=kept)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return sorted(k for k in node.keys() if k != "_target_") if node is not None else []
    except Exception:
        return []


def _describe_config_error(exc: BaseException, args: Sequence[str]) -> str:
    cause = exc.__cause__ or exc
    key = _full_key(cause)
    detail = _lines(str(cause))
    kind = type(cause).__name__
    if key and kind in ("ConfigAttributeError", "ConfigKeyError"):
        valid = _valid_keys(args, key)
        hint = f"; valid keys: {', '.join(valid)}" if valid else ""
        return f"unknown key {key}{hint}"
    if key and kind == "ValidationError":
        return f"bad value for {key}: {detail[0] if detail else cause}"
    lines = _lines(str(exc))
    if kind == "MissingConfigException" or "Available options" in str(exc):
        # "In 'config': Could not find 'device/gpu'" + the list of options
        text = str(exc)
        head = lines[0] if lines else text
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        return head + (f"; available options: {', '.join(options)}" if options else "")
    if kind == "OverrideParseException":
        return "; ".join(lines[:2]) + " (write overrides as key=value)"
    if cause is not exc and detail:
        return "; ".join([*lines[:1], *detail[:1]])
    return "; ".join(lines[:2]) or kind


def describe(exc: BaseException, args: Sequence[str] = ()) -> str:
    """One line naming what went wrong and, where clbench knows it, what to do."""
    if isinstance(exc, CLBenchError):
        return " ".join(_lines(str(exc))) or type(exc).__name__
    try:
        import yaml

        yaml_error = isinstance(exc, yaml.YAMLError) or isinstance(exc.__cause__, yaml.YAMLError)
    except ImportError:  # pragma: no cover - PyYAML comes with Hydra
        yaml_error = False
    if yaml_error:
        err = exc if exc.__cause__ is None else exc.__cause__
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
        problem = getattr(err, "problem", None) or (_lines(str(err)) or ["invalid YAML"])[0]
        return f"cannot parse {where}: {problem}"
    module = type(exc).__module__ or ""
    if module.startswith(("hydra", "omegaconf")):
        return _describe_config_error(exc, args)
    if isinstance(exc, OSError):
        if isinstance(exc, FileExistsError) and exc.filename:
            return f"{exc.filename} exists and is not a folder"
        if exc.filename and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return f"{type(exc).__name__}: {exc}"
    first = (_lines(str(exc)) or [""])[0]
    return f"internal error ({type(exc).__name__}: {first}); rerun with --debug for the traceback and please report it"
