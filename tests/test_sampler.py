"""The data manager serves the configured medical ratio per step and resumes exactly."""

from __future__ import annotations

import math

import pytest

from qwen_distillation.data.manager import StageSampler, medical_ratio_at
from qwen_distillation.errors import CheckpointError, DataError


def _pools(n_general=50, n_medical=40):
    general = [{"id": f"g{i}", "domain": "general"} for i in range(n_general)]
    medical = [{"id": f"m{i}", "domain": "medical"} for i in range(n_medical)]
    return general, medical


def _sampler(schedule="linear", start=0.3, end=0.7, steps=20, per_step=8, seed=0, plateaus=5):
    general, medical = _pools()
    return StageSampler(general, medical, examples_per_step=per_step, total_steps=steps, schedule=schedule,
                        start=start, end=end, plateaus=plateaus, seed=seed, stage="stage2")


def test_schedules_hand_values():
    assert medical_ratio_at(0, 11, "linear", 0.3, 0.7) == pytest.approx(0.3)
    assert medical_ratio_at(5, 11, "linear", 0.3, 0.7) == pytest.approx(0.5)
    assert medical_ratio_at(10, 11, "linear", 0.3, 0.7) == pytest.approx(0.7)
    assert medical_ratio_at(5, 11, "cosine", 0.3, 0.7) == pytest.approx(0.5)
    assert medical_ratio_at(2, 11, "cosine", 0.3, 0.7) == pytest.approx(0.3 + 0.4 * (1 - math.cos(math.pi * 0.2)) / 2)
    # step: 5 plateaus 0.3, 0.4, 0.5, 0.6, 0.7
    assert [round(medical_ratio_at(s, 10, "step", 0.3, 0.7), 6) for s in range(10)] == [
        0.3, 0.3, 0.4, 0.4, 0.5, 0.5, 0.6, 0.6, 0.7, 0.7]
    assert medical_ratio_at(7, 10, "constant", 0.3, 0.7) == 0.3


@pytest.mark.parametrize("schedule", ["linear", "cosine", "step"])
def test_served_ratio_follows_the_schedule(schedule):
    sampler = _sampler(schedule=schedule, steps=40, per_step=8)
    served, targets = [], []
    for _ in range(40):
        step = sampler.next_step()
        assert step.num_medical == sum(e["domain"] == "medical" for e in step.examples)
        assert len(step.examples) == 8
        served.append(step.medical_ratio)
        targets.append(step.medical_ratio_target)
    # Each step is within one example of its target, and the running mean tracks the
    # running target within one example over the whole stage (error diffusion).
    assert all(abs(s - t) <= 1 / 8 for s, t in zip(served, targets))
    assert abs(sum(served) - sum(targets)) <= 1 / 8
    assert served[0] <= 0.375 and served[-1] >= 0.625
    assert sum(served[:10]) < sum(served[-10:])


def test_stage1_and_stage3_serve_one_domain():
    general, medical = _pools()
    only_general = StageSampler(general, [], examples_per_step=4, total_steps=5, schedule="constant", start=0.0,
                                end=0.0, plateaus=5, seed=0, stage="stage1")
    only_medical = StageSampler([], medical, examples_per_step=4, total_steps=5, schedule="constant", start=1.0,
                                end=1.0, plateaus=5, seed=0, stage="stage3")
    for _ in range(5):
        assert all(e["domain"] == "general" for e in only_general.next_step().examples)
        assert all(e["domain"] == "medical" for e in only_medical.next_step().examples)


def test_every_example_is_served_once_per_epoch():
    general, medical = _pools(12, 12)
    sampler = StageSampler(general, medical, examples_per_step=4, total_steps=6, schedule="constant", start=0.0,
                           end=0.0, plateaus=5, seed=3, stage="stage1")
    ids = [e["id"] for _ in range(3) for e in sampler.next_step().examples]
    assert sorted(ids) == sorted(e["id"] for e in general)


def test_state_dict_resumes_exactly():
    reference = _sampler(seed=5)
    expected = [[e["id"] for e in reference.next_step().examples] for _ in range(20)]
    first = _sampler(seed=5)
    got = [[e["id"] for e in first.next_step().examples] for _ in range(7)]
    state = first.state_dict()
    resumed = _sampler(seed=5)
    resumed.load_state_dict(state)
    got += [[e["id"] for e in resumed.next_step().examples] for _ in range(13)]
    assert got == expected


def test_seed_changes_the_order_and_is_deterministic():
    a = [e["id"] for e in _sampler(seed=1).next_step().examples]
    assert a == [e["id"] for e in _sampler(seed=1).next_step().examples]
    assert a != [e["id"] for e in _sampler(seed=2).next_step().examples]


def test_missing_domain_is_a_clear_error():
    general, _ = _pools()
    with pytest.raises(DataError, match=r"stage2 serves medical data.*data\.medical is empty"):
        StageSampler(general, [], examples_per_step=4, total_steps=3, schedule="linear", start=0.3, end=0.7,
                     plateaus=5, seed=0, stage="stage2")


def test_a_step_schedule_of_one_plateau_needs_only_its_start_domain():
    """A step schedule of one plateau serves ``start`` throughout (medical_ratio_at); a stage at 0 -> 1 was
    refused for want of medical data it never draws."""
    general, _ = _pools()
    sampler = StageSampler(general, [], examples_per_step=4, total_steps=3, schedule="step", start=0.0, end=1.0,
                           plateaus=1, seed=0, stage="stage2")
    assert all(e in general for _ in range(3) for e in sampler.next_step().examples)
    with pytest.raises(DataError, match=r"stage2 serves medical data"):
        StageSampler(general, [], examples_per_step=4, total_steps=3, schedule="step", start=0.0, end=1.0,
                     plateaus=2, seed=0, stage="stage2")


def test_resume_with_different_data_is_refused():
    sampler = _sampler()
    state = sampler.state_dict()
    general, medical = _pools(n_general=49)
    other = StageSampler(general, medical, examples_per_step=8, total_steps=20, schedule="linear", start=0.3,
                         end=0.7, plateaus=5, seed=0, stage="stage2")
    with pytest.raises(CheckpointError, match="stage2's training checkpoint: the general data has 49 examples but "
                                              "the checkpoint was taken with 50; resume with the data it was taken "
                                              "with, or delete OUTPUT_DIR/stage2/checkpoint-\\* to restart stage2"):
        other.load_state_dict(state)
    with pytest.raises(CheckpointError, match="its sampler state lacks carry, general, medical; it is not the state "
                                              "of uniform sampling"):
        _sampler().load_state_dict({"step": 3, "seed": 0, "scores": [], "size": 90})


def test_a_constant_schedule_needs_only_its_start_domain():
    """`end` is ignored by a constant schedule (medical_ratio_at); the domains a stage needs, its size
    and its data checks ignored it too late: constant 0 -> 1 demanded medical data it never served
    and sized the stage on both pools."""
    from qwen_distillation.data.manager import stage_domains

    assert stage_domains("constant", 0.0, 1.0) == ("general",)
    assert stage_domains("constant", 1.0, 0.5) == ("medical",)
    assert stage_domains("linear", 0.0, 1.0) == ("general", "medical")
    sampler = StageSampler(_pools(6)[0], [], examples_per_step=2, total_steps=3, schedule="constant", start=0.0,
                           end=1.0, plateaus=5, seed=0, stage="stage1")
    assert [ex["domain"] for _ in range(3) for ex in sampler.next_step().examples] == ["general"] * 6
