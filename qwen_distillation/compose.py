"""Hydra's compose API over the same config search path a run's ``@hydra.main`` searches: conf/ and, after it,
the user's ``--config-dir``, with the primary config ``-cn NAME`` names. The command line's checks (a sweep's,
``--cfg job``'s), the prune and cache_teacher commands, :func:`qwen_distillation.distill` and the wording of
Hydra's errors compose through it. Imports Hydra when it composes, nothing of the project but the config's
folder and the errors."""

from __future__ import annotations

import contextlib
import os

from qwen_distillation.config.presets import CONF_DIR
from qwen_distillation.errors import UsageError

CONFIG_DIR_FLAGS = ("--config-dir", "-cd")


def config_dir(args: list[str]) -> tuple[str | None, list[str]]:
    """The absolute folder of Hydra's ``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``) among ``args``, or
    None, and the other args."""
    flag, given, rest = _take_flag(args, CONFIG_DIR_FLAGS)
    if flag is None:
        return None, rest
    if not os.path.isdir(given):
        raise UsageError(f"{flag} {given}: no such directory (give the folder that holds your own config groups, "
                         f"e.g. {flag} my_conf with my_conf/experiment/NAME.yaml)")
    return os.path.abspath(given), rest


def config_name(args: list[str]) -> tuple[str, list[str]]:
    """The primary config Hydra's ``--config-name NAME`` (``-cn NAME``, ``--config-name=NAME``) among ``args``
    names (``config``, conf/config.yaml, without one), and the other args."""
    flag, name, rest = _take_flag(args, ("--config-name", "-cn"))
    return (name if flag else "config"), rest


def _take_flag(args: list[str], flags: tuple[str, ...]) -> tuple[str | None, str | None, list[str]]:
    """The last of Hydra's value flags ``flags`` among ``args`` (``FLAG VALUE`` or ``FLAG=VALUE``, as Hydra's
    argparse keeps the last), its value, and the other args; ``(None, None, args)`` without one."""
    flag = value = None
    rest, i = [], 0
    while i < len(args):
        name, eq, inline = args[i].partition("=")
        if name in flags and (eq or i + 1 < len(args)):
            flag, value = name, inline if eq else args[i + 1]
            i += 1 if eq else 2
            continue
        rest.append(args[i])
        i += 1
    return flag, value, rest


def compose_flags(directory: str | None, name: str) -> list[str]:
    """The flags :func:`compose_run_config` reads a ``--config-dir`` ``directory`` and a primary config ``name``
    from (:func:`config_dir`, :func:`config_name`)."""
    return (["--config-dir", directory] if directory else []) + ["--config-name", name]


@contextlib.contextmanager
def hydra_search_path(directory: str | None):
    """Hydra's compose API over conf/ and, after it, a ``--config-dir`` ``directory``, as a run's ``@hydra.main``
    searches them: its primary config (``-cn NAME``) too, which an added ``hydra.searchpath`` does not reach."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()  # as hydra.initialize_config_dir does, which takes one folder only
    version.setbase("1.3")
    search_path = create_config_search_path(CONF_DIR)
    if directory:
        # Where Hydra's --config-dir puts it: after conf/, before the schema.
        search_path.prepend(provider="command-line", path=f"file://{directory}",
                            anchor=SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)
    try:
        yield
    finally:
        restore_gh_from_backup(backup)
