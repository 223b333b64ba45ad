"""benchmarks/attention_term.py's work measure: the relation scores it counts from the shapes are
those ``relation_kl`` computes, in both packed layouts, with and without the key windows."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO
from qwen_distillation.data.encode import IGNORE_INDEX
from qwen_distillation.data.manager import collate_packed
from qwen_distillation.losses import attention
from qwen_distillation.modeling.parts import position_mask

spec = importlib.util.spec_from_file_location("attention_term", REPO / "benchmarks" / "attention_term.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("layout", ["rows", "padding_free"])
@pytest.mark.parametrize("windows", [False, True])
def test_the_counted_scores_are_the_ones_the_term_computes(layout, windows, monkeypatch):
    lengths = [7, 30, 3, 18, 5, 11, 24, 2]
    examples = [{"input_ids": list(range(1, n + 1)), "labels": [IGNORE_INDEX] + list(range(2, n + 1))}
                for n in lengths]
    batch = collate_packed(examples, 0, 40, layout)
    rows, length = batch["input_ids"].shape
    starts = batch["sequence_starts"].tolist() if windows else None
    computed = []
    allowed_keys = attention._allowed_keys

    def counted(*args, **kwargs):
        allowed = allowed_keys(*args, **kwargs)  # (B, 1, queries, keys)
        computed.append(allowed.shape[0] * allowed.shape[2] * allowed.shape[3])
        return allowed

    monkeypatch.setattr(attention, "_allowed_keys", counted)
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(rows, 2, length, 4, generator=generator) for _ in range(2))
    segments = batch["segments"]
    attention.relation_kl(q, k, q, k, position_mask(batch["labels"]), segments >= 0, relation_heads=2, chunk_size=8,
                          segments=segments, sequence_starts=starts)
    assert sum(computed) == bench.score_count(rows, length, 8, starts) > 0
    if windows and layout == "padding_free":
        assert sum(computed) < bench.score_count(rows, length, 8, None)
