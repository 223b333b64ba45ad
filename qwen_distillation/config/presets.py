"""Where the Hydra config groups live (``conf/``) and the presets each offers."""

from __future__ import annotations

from pathlib import Path

# An absolute path: Hydra resolves a relative one against the package, not the repository.
CONF_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")


def preset_names(group: str) -> list[str]:
    """The presets of config group ``group`` (its ``conf/GROUP/*.yaml`` files), sorted; empty for a key
    that is no group."""
    return sorted(path.stem for path in Path(CONF_DIR, group).glob("*.yaml"))
