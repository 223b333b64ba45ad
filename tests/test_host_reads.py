"""A training step reads device values back to the host only where it must (docs/performance.md,
"Host time per step"): on a GPU each such read waits for the device to finish its queue, and the
host launches nothing meanwhile."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import compose_config, tiny_overrides
from qwen_distillation.data.manager import collate, collate_packed
from qwen_distillation.losses.feature import FeatureProjector, masked_feature_loss
from qwen_distillation.modeling.parts import (gather_positions, gather_targets, position_mask, response_positions,
                                              response_targets)

PACKAGE = str(Path(__file__).resolve().parents[1] / "qwen_distillation")
READS = ("item", "__float__", "__int__", "__bool__", "tolist", "nonzero")


def _examples() -> list[dict]:
    rows = [(7, 3), (12, 5), (4, 1), (9, 9)]  # (prompt length, response length)
    out = []
    for i, (prompt, response) in enumerate(rows):
        ids = [(i * 31 + j) % 50 + 1 for j in range(prompt + response)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "domain": i % 2})
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_gathered_positions_equal_the_boolean_mask_in_values_and_gradients(packed):
    batch = collate_packed(_examples(), 0, 24) if packed else collate(_examples(), 0)
    labels = batch["labels"]
    positions = response_positions(labels)
    assert positions.numel() == response_targets(labels).numel() == 3 + 5 + 1 + 9
    assert torch.equal(gather_targets(labels, positions), response_targets(labels))
    states = torch.randn(*labels.shape, 6, requires_grad=True)
    weight = torch.randn(6)
    mask = position_mask(labels)
    by_mask, = torch.autograd.grad((states[mask] * weight).sin().sum(), states)
    gathered = gather_positions(states, positions)
    assert torch.equal(gathered, states[mask])
    by_index, = torch.autograd.grad((gathered * weight).sin().sum(), states)
    assert torch.equal(by_index, by_mask)


@pytest.mark.parametrize("packed", [False, True])
def test_feature_loss_by_positions_equals_it_by_mask_in_values_and_gradients(packed):
    batch = collate_packed(_examples(), 0, 24) if packed else collate(_examples(), 0)
    labels = batch["labels"]
    torch.manual_seed(0)
    students = [torch.randn(*labels.shape, 6, requires_grad=True) for _ in range(2)]
    teachers = [torch.randn(*labels.shape, 10) for _ in range(2)]
    projector = FeatureProjector([(0, 0), (1, 1)], 6, 10)
    results = []
    for positions in (None, response_positions(labels)):
        value = masked_feature_loss(students, teachers, position_mask(labels), projector, positions=positions,
                                    loss="mse", normalize=True, reduction="sum")
        results.append((value, *torch.autograd.grad(value, [*students, *projector.parameters()])))
    assert results[0][0] > 0
    for by_mask, by_positions in zip(*results):
        assert torch.equal(by_mask, by_positions)


def test_a_training_step_reads_the_device_once_per_micro_batch_and_twice_per_step(tmp_path, monkeypatch):
    """Stages 1 (CE + KD, one ``logit`` term) and 2 (all five terms), 2 micro-batches a step. Per step the
    package reads
    back: the non-finite check of each micro-batch's terms (one read for all of them), the gradient
    norm, and the step's logged loss sums (one read). ``response_positions`` reads the labels on
    the host, before the copy. Before this was cut, a step read the device 8 times per micro-batch
    (counting the tokens, 3 boolean-mask indexings, 2 logged values, the non-finite check), in stage 2
    4 more (the feature term's boolean-mask indexing of its 2 layer pairs) and a read per further term."""
    from qwen_distillation.app import run
    from qwen_distillation.training import distiller

    reads: list[Counter] = []
    in_step = {"on": False}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            boolean = name != "__getitem__" or any(isinstance(p, torch.Tensor) and p.dtype == torch.bool
                                                   for p in (args[0] if isinstance(args[0], tuple) else args[:1]))
            if in_step["on"] and boolean and caller.co_filename.startswith(PACKAGE):
                reads[-1][caller.co_name] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in (*READS, "__getitem__"):
        counting(name)
    train_step = distiller.Distiller._train_step

    def counted_step(self, run_):
        reads.append(Counter())
        in_step["on"] = True
        try:
            return train_step(self, run_)
        finally:
            in_step["on"] = False

    monkeypatch.setattr(distiller.Distiller, "_train_step", counted_step)
    run(compose_config(tiny_overrides(tmp_path, steps=2) + ["end_stage=2", "stage1.eval_every=0",
                                                            "stage2.eval_every=0"]))
    assert len(reads) == 4
    for step in reads:
        # A check the loss makes on the CPU only (losses.logit._all_rows_valid_on_cpu) is not a device read.
        assert step.pop("_all_rows_valid_on_cpu", 0) > 0
        assert step == Counter({"response_positions": 2, "nonfinite_terms": 2, "step": 1, "host_floats": 1})
