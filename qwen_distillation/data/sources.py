"""Build the tokenized general, medical and held-out evaluation sets of a run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from qwen_distillation.config.validate import DataSource, normalise_sources
from qwen_distillation.data.encode import build_examples, split_heldout
from qwen_distillation.data.loading import load_records
from qwen_distillation.modeling.loading import PACKAGE_PREFIX, resolve_path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("general", "medical")  # an example's "domain" field is the index here


@dataclass
class DomainData:
    """Training examples per domain and held-out evaluation sets by name
    (``general``, ``medical`` and one per ``data.eval`` source)."""

    general: list[dict] = field(default_factory=list)
    medical: list[dict] = field(default_factory=list)
    eval_sets: dict[str, list[dict]] = field(default_factory=dict)


def locate(path: str) -> str:
    """``package:`` paths resolve inside installed packages; a relative path that does not
    exist from the working directory is tried against the project root."""
    if path.startswith(PACKAGE_PREFIX):
        return resolve_path(path)
    if not os.path.isabs(path) and not os.path.exists(path) and (PROJECT_ROOT / path).exists():
        return str(PROJECT_ROOT / path)
    return path


def encode_source(source: DataSource, tokenizer, max_length: int) -> list[dict]:
    path = locate(source.path)
    records = load_records(path, split=source.split, subset=source.subset, max_records=source.max_records)
    return build_examples(records, source.format, tokenizer, max_length, source.path)


def _eval_name(source: DataSource, taken: set[str]) -> str:
    name = Path(source.path.split(":")[-1]).stem or "eval"
    while name in taken:
        name += "_"
    return name


def build_domain_data(data_cfg, tokenizer, *, seed: int) -> DomainData:
    """Load, encode and split every source of ``data_cfg`` (a DataConfig).

    Each training source gives ``data.eval_fraction`` of its examples (deterministically,
    by ``seed``) to the held-out set of its domain, capped at ``data.max_eval_examples``
    per domain overall.
    """
    out = DomainData()
    for domain_id, domain in enumerate(DOMAINS):
        heldout = []
        for source in normalise_sources(f"data.{domain}", getattr(data_cfg, domain)):
            examples = [{**e, "domain": domain_id} for e in encode_source(source, tokenizer, data_cfg.max_length)]
            train, held = split_heldout(examples, data_cfg.eval_fraction, data_cfg.max_eval_examples, seed)
            getattr(out, domain).extend(train)
            heldout.extend(held)
            log.info("data.%s: %s -> %d train, %d held out", domain, source.path, len(train), len(held))
        if heldout:
            out.eval_sets[domain] = heldout[: data_cfg.max_eval_examples]
    for source in normalise_sources("data.eval", data_cfg.eval):
        name = _eval_name(source, set(out.eval_sets))
        out.eval_sets[name] = encode_source(source, tokenizer, data_cfg.max_length)[: data_cfg.max_eval_examples]
    return out
