"""The files of a saved model or tokenizer, checked before transformers reads them.

A weights file cut short (a save or a copy killed part-way), a file of garbage, or a JSON file
that does not parse is reported by its full path, with what is wrong and how to fix it, where
transformers would raise a ``SafetensorError`` or ``JSONDecodeError`` that names no file. The
checks read only the JSON files and the headers of the weights files (safetensors checks that
the header's tensors cover the file), not the weights themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from qwen_distillation.errors import CheckpointError

try:  # a config class of transformers 5 that checks its own sizes (llama, qwen2) raises it
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub: none does
    StrictDataclassError = ()

MODEL_JSON = ("config.json", "generation_config.json", "adapter_config.json", "model.safetensors.index.json",
              "adapter_model.safetensors.index.json")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def read_json(path: Path, fix: str):
    """The parsed JSON file ``path``; raises CheckpointError naming it and ``fix`` if it does not parse."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON, the file is truncated or damaged ({err}); {fix}") from err
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror}); {fix}") from err


def check_json_files(directory: str | Path, names: tuple[str, ...], fix: str) -> None:
    """Each of the files ``names`` that ``directory`` holds must parse as JSON."""
    for name in names:
        path = Path(directory) / name
        if path.is_file():
            read_json(path, fix)


def check_weight_files(directory: str | Path, fix: str) -> None:
    """Every ``*.safetensors`` file of ``directory`` has a whole header that covers the file, and
    every shard a ``*.safetensors.index.json`` lists exists."""
    directory = Path(directory)
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({err}); {fix}") from err
    for index in sorted(directory.glob("*.safetensors.index.json")):
        listing = read_json(index, fix)
        weight_map = listing.get("weight_map", {}) if isinstance(listing, dict) else {}
        missing = sorted({shard for shard in weight_map.values() if not (directory / shard).is_file()})
        if missing:
            raise CheckpointError(f"{index}: lists the weights file {directory / missing[0]}, which is missing; {fix}")


def check_model_dir(directory: str | Path, fix: str) -> None:
    """The JSON and weights files of a model or LoRA adapter directory (see the module docstring)."""
    check_json_files(directory, MODEL_JSON, fix)
    check_weight_files(directory, fix)


def check_tokenizer_dir(directory: str | Path, fix: str) -> None:
    """The JSON files of a tokenizer directory."""
    check_json_files(directory, TOKENIZER_JSON, fix)
