"""Where the Hydra config groups live (``conf/``) and the presets each offers."""

from __future__ import annotations

from pathlib import Path

# An absolute path: Hydra resolves a relative one against the package, not the repository.
CONF_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")


def preset_names(group: str) -> list[str]:
    """The presets of config group ``group`` (its ``conf/GROUP/*.yaml`` files), sorted; empty for a key
    that is no group."""
    return sorted(path.stem for path in Path(CONF_DIR, group).glob("*.yaml"))


def preset_only_keys(experiment: str | None, overrides: list[str]) -> set[str]:
    """The dotted keys the project's own preset ``conf/experiment/EXPERIMENT.yaml`` sets and none of the
    command line's ``overrides`` sets (``stage3.sampling.max_scored`` under ``experiment=demo``): the preset's
    values for its own stage options, which a stage option swapped on the command line may not read. A group
    choice (``stage3=general_kd``) sets no key; a value override sets its key and every key under it."""
    import yaml

    path = Path(CONF_DIR, "experiment", f"{experiment}.yaml")
    if not experiment or not path.is_file():
        return set()
    keys: set[str] = set()

    def leaves(node, prefix: str) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                leaves(value, f"{prefix}{name}.")
            else:
                keys.add(f"{prefix}{name}")

    leaves({k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k not in ("defaults",
                                                                                          "experiment")}, "")
    groups = {path.name for path in Path(CONF_DIR).iterdir() if path.is_dir()}
    set_here = {key for key in (o.lstrip("+~").partition("=")[0] for o in overrides if "=" in o or o[:1] == "~")
                if key not in groups}
    return {key for key in keys if not any(key == user or key.startswith(f"{user}.") for user in set_here)}
