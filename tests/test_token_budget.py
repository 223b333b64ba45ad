"""stageN.tokens_per_step: a step serves examples up to a token budget instead of a fixed count.

The sampler keeps to the budget (at least one example a step), tracks the medical ratio per
step, is deterministic and resumes exactly; epochs count the pool's tokens over the budget;
micro-batches are cut by examples, or by tokens when packed; a tiny run logs each step's input
tokens within its budget; hard-example sampling keeps to the budget too; the engines that cannot
work with it are refused naming the override."""

from __future__ import annotations

import random

import pytest

from qwen_distillation.config.validate import validate_config
from qwen_distillation.data.hard_sampling import HardExampleSampler
from qwen_distillation.data.manager import StageSampler, length_grouped_batches, token_micro_batches
from qwen_distillation.errors import ConfigError
from tests.conftest import compose_config, kill_in_stages, tiny_overrides, train_rows

BUDGET = 100


def _pools(n_general=60, n_medical=50, seed=0):
    rng = random.Random(seed)

    def example(domain, i):
        n = rng.randint(5, 60)
        return {"id": f"{domain[0]}{i}", "domain": domain, "input_ids": [1] * n, "labels": [1] * n}

    return [example("general", i) for i in range(n_general)], [example("medical", i) for i in range(n_medical)]


def _sampler(schedule="linear", start=0.2, end=0.8, steps=40, seed=0, budget=BUDGET, pools=None):
    general, medical = pools or _pools()
    return StageSampler(general, medical, examples_per_step=4, total_steps=steps, schedule=schedule, start=start,
                        end=end, plateaus=5, seed=seed, stage="stage2", tokens_per_step=budget)


def _tokens(step) -> int:
    return sum(len(e["input_ids"]) for e in step.examples)


def test_each_step_fills_its_budget_up_to_the_example_that_would_not_fit():
    sampler = _sampler()
    steps = [sampler.next_step() for _ in range(40)]
    sizes = {len(step.examples) for step in steps}
    assert len(sizes) > 1, "the number of examples a step varies with their lengths"
    for step in steps:
        assert 1 <= len(step.examples) and _tokens(step) <= BUDGET
        # Taking one more example (the first one of the next step's pools) would have passed the
        # budget: every example is at most 60 tokens, so a step holds more than 40.
        assert _tokens(step) > BUDGET - 60


def test_an_example_longer_than_the_budget_is_a_step_of_its_own():
    lengths = [30, 250, 40, 20, 300]
    general = [{"id": f"g{i}", "domain": "general", "input_ids": [1] * n, "labels": [1] * n}
               for i, n in enumerate(lengths)]
    sampler = StageSampler(general, [], examples_per_step=4, total_steps=10, schedule="constant", start=0.0,
                           end=0.0, plateaus=5, seed=0, stage="stage1", tokens_per_step=BUDGET)
    served = []
    while sum(len(step) for step in served) < len(lengths):  # the first epoch, each example once
        served.append([len(e["input_ids"]) for e in sampler.next_step().examples])
    assert sorted(n for step in served for n in step) == sorted(lengths)
    assert [250] in served and [300] in served
    assert all(sum(step) <= BUDGET for step in served if step not in ([250], [300]))


def test_the_served_medical_ratio_tracks_the_schedule_per_step():
    sampler = _sampler(steps=60)
    served = [sampler.next_step() for _ in range(60)]
    for step in served:
        assert step.num_medical == sum(e["domain"] == "medical" for e in step.examples)
        # Within one example of the target share of this step's own size.
        assert abs(step.num_medical - step.medical_ratio_target * len(step.examples)) <= 1
    # And over the stage, the medical examples are the target share's sum within one example.
    total_target = sum(s.medical_ratio_target * len(s.examples) for s in served)
    assert abs(sum(s.num_medical for s in served) - total_target) <= 1
    assert served[0].medical_ratio < 0.5 < served[-1].medical_ratio


def test_stages_of_one_domain_serve_only_it():
    general, medical = _pools()
    for start, domain in ((0.0, "general"), (1.0, "medical")):
        sampler = StageSampler(general if start == 0 else [], medical if start == 1 else [], examples_per_step=4,
                               total_steps=5, schedule="constant", start=start, end=start, plateaus=5, seed=0,
                               stage="stage1", tokens_per_step=BUDGET)
        for _ in range(10):
            assert {e["domain"] for e in sampler.next_step().examples} == {domain}


def test_deterministic_and_a_restored_sampler_serves_the_same_steps():
    reference = _sampler(seed=7)
    expected = [[e["id"] for e in reference.next_step().examples] for _ in range(30)]
    again = _sampler(seed=7)
    assert [[e["id"] for e in again.next_step().examples] for _ in range(30)] == expected
    first = _sampler(seed=7)
    got = [[e["id"] for e in first.next_step().examples] for _ in range(11)]
    resumed = _sampler(seed=7)
    resumed.load_state_dict(first.state_dict())
    got += [[e["id"] for e in resumed.next_step().examples] for _ in range(19)]
    assert got == expected
    assert [[e["id"] for e in _sampler(seed=8).next_step().examples] for _ in range(3)] != expected[:3]


def _hard(seed=0, budget=BUDGET):
    _, medical = _pools()
    return HardExampleSampler(medical, examples_per_step=4, seed=seed, uniform_floor=0.3, temperature=0.5,
                              rescore_every=5, tokens_per_step=budget)


def test_hard_example_sampling_keeps_to_the_budget_favours_hard_examples_and_resumes():
    sampler = _hard()
    sampler.update_scores(list(range(50)), [5.0] * 25 + [0.0] * 25)  # the first half is hard
    served = []
    for _ in range(40):
        step = sampler.next_step()
        assert len({e["id"] for e in step.examples}) == len(step.examples) >= 1  # distinct
        assert _tokens(step) <= BUDGET and step.num_medical == len(step.examples) and step.medical_ratio == 1.0
        served += [int(e["id"][1:]) for e in step.examples]
    assert sum(i < 25 for i in served) > 0.7 * len(served)
    assert len(set(served)) > 25  # the uniform floor reaches the easy half too

    def ids(sampler, n):
        return [[e["id"] for e in sampler.next_step().examples] for _ in range(n)]

    reference = _hard(seed=4)
    expected = ids(reference, 12)
    first = _hard(seed=4)
    got = ids(first, 5)
    resumed = _hard(seed=4)
    resumed.load_state_dict(first.state_dict())
    assert got + ids(resumed, 7) == expected


def test_a_hard_step_whose_budget_outlasts_the_pool_is_served_in_rounds():
    examples = [{"id": f"m{i}", "input_ids": [1] * n, "labels": [1] * n} for i, n in enumerate((10, 20, 30))]
    sampler = HardExampleSampler(examples, examples_per_step=1, seed=0, tokens_per_step=130)
    ids = [e["id"] for e in sampler.next_step().examples]
    assert sorted(ids[:3]) == ["m0", "m1", "m2"] and sorted(ids[3:6]) == ["m0", "m1", "m2"]  # two whole rounds
    assert sum(int(i[1:]) * 10 + 10 for i in ids) <= 130 and len(ids) >= 6


def test_token_micro_batches_hold_at_most_the_token_cap():
    examples = [{"input_ids": [1] * n} for n in (10, 20, 30, 40, 50, 90)]
    groups = token_micro_batches(examples, 60)
    assert [[len(e["input_ids"]) for e in g] for g in groups] == [[10, 20, 30], [40], [50], [90]]


def test_packed_micro_batches_stay_within_batch_size_rows_when_the_lengths_do_not_pack_evenly():
    # Nine examples of 33 tokens hold 297 <= 8 x 40 tokens, but rows of 40 take one each: nine rows.
    examples = [{"input_ids": [1] * 33} for _ in range(9)]
    assert [len(g) for g in token_micro_batches(examples, 320)] == [9]  # the token cap alone
    assert [len(g) for g in token_micro_batches(examples, 320, row_length=40)] == [8, 1]
    rng = random.Random(5)
    for _ in range(50):
        examples = [{"input_ids": list(range(2, n + 2)), "labels": [-100] + list(range(3, n + 2))}
                    for n in sorted(rng.randint(2, 40) for _ in range(rng.randint(1, 40)))]
        packed = length_grouped_batches(examples, 4, 0, pack_length=40, by_tokens=True)
        assert all(b["input_ids"].numel() <= 4 * 40 for b in packed)  # the positions of batch_size full rows
        assert sum(int((b["segments"] >= 0).sum()) for b in packed) == sum(len(e["input_ids"]) for e in examples)


def test_packed_micro_batches_are_cut_by_tokens_unpacked_by_examples():
    rng = random.Random(3)
    examples = []
    for _ in range(9):
        n = rng.randint(4, 16)
        examples.append({"input_ids": list(range(2, n + 2)), "labels": [-100] * 2 + list(range(4, n + 2))})
    plain = length_grouped_batches(examples, 2, 0, by_tokens=True)
    assert [b["input_ids"].shape[0] for b in plain] == [2, 2, 2, 2, 1]
    packed = length_grouped_batches(examples, 2, 0, pack_length=16, by_tokens=True)
    # Each packed micro-batch holds at most data.max_length x batch_size = 32 input tokens.
    assert all(int((b["segments"] >= 0).sum()) <= 32 for b in packed)
    assert sum(int((b["segments"] >= 0).sum()) for b in packed) == sum(len(e["input_ids"]) for e in examples)
    assert sum(int(b["segments"].max()) + 1 for b in packed) == 9


def test_epochs_count_the_pool_tokens_over_the_budget(tmp_path):
    from qwen_distillation.training.distiller import Distiller

    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "out") + [
        "stage1.max_steps=null", "stage1.epochs=2", "stage1.tokens_per_step=500"]))
    distiller = Distiller(cfg)
    general, medical = _pools()

    class Data:
        pass

    distiller.data = Data()
    distiller.data.general, distiller.data.medical = general, medical
    tokens = sum(len(e["input_ids"]) for e in general)
    assert distiller._stage_steps("stage1", cfg.stage1) == -(-2 * tokens // 500)
    cfg.stage1.max_steps = 7
    assert distiller._stage_steps("stage1", cfg.stage1) == 7


def test_examples_longer_than_the_budget_count_one_step_each_and_are_logged(tmp_path, caplog):
    """Counted in tokens, a budget below the examples' lengths made epochs=0.1 serve 0.9 passes
    (each step holds at least one whole example); each such example now counts as one step."""
    from qwen_distillation.training.distiller import Distiller

    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "out") + [
        "stage1.max_steps=null", "stage1.epochs=1", "stage1.tokens_per_step=10"]))
    distiller = Distiller(cfg)

    class Data:
        pass

    distiller.data = Data()
    distiller.data.general = [{"input_ids": [1] * n} for n in (4, 6, 12, 30)]  # 4 + 6 fill one budget of 10
    distiller.data.medical = []
    with caplog.at_level("WARNING", logger="qwen_distillation.training.distiller"):
        assert distiller._stage_steps("stage1", cfg.stage1) == 3
    assert "stage1.grad_accum=2 is not used with stage1.tokens_per_step" in caplog.text  # tiny_overrides: 2
    assert "stage1.tokens_per_step=10 is below the length of 2 of the stage's 4 examples (the longest: " \
           "30 tokens)" in caplog.text
    caplog.clear()
    cfg.stage1.tokens_per_step = 30  # every example fits: counted in tokens as before, ceil(52 / 30)
    with caplog.at_level("WARNING", logger="qwen_distillation.training.distiller"):
        assert distiller._stage_steps("stage1", cfg.stage1) == 2
    assert "is below the length" not in caplog.text


def _distiller_over(cfg, general, medical):
    """A Distiller of ``cfg`` whose training pools are ``general`` and ``medical`` (no data read): for _stage_steps."""
    from types import SimpleNamespace

    from qwen_distillation.training.distiller import Distiller

    distiller = Distiller(cfg)
    distiller.data = SimpleNamespace(general=general, medical=medical)
    return distiller


@pytest.mark.parametrize("budget", [None, "tokens"])
def test_a_step_larger_than_the_whole_pool_is_logged(budget, tmp_path, caplog):
    """A step that holds more than the stage's whole pool serves examples more than once in every
    step (an epoch then is not one pass): the run says so, with the option to lower."""
    general, medical = _pools()
    tokens = sum(len(e["input_ids"]) for e in general)
    size = ["stage1.batch_size=1", f"stage1.grad_accum={len(general) + 1}"] if budget is None else [
        f"stage1.tokens_per_step={tokens + 1}"]
    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "out") + size))
    distiller = _distiller_over(cfg, general, medical)
    with caplog.at_level("WARNING", logger="qwen_distillation.training.distiller"):
        distiller._stage_steps("stage1", cfg.stage1)
    assert "every step serves some examples more than once" in caplog.text
    assert ("lower stage1.tokens_per_step" if budget else "lower stage1.batch_size or stage1.grad_accum") \
        in caplog.text
    caplog.clear()
    if budget:  # a step of exactly the pool: no warning
        cfg.stage1.tokens_per_step = tokens
    else:
        cfg.stage1.grad_accum = len(general)
    with caplog.at_level("WARNING", logger="qwen_distillation.training.distiller"):
        distiller._stage_steps("stage1", cfg.stage1)
    assert "more than once" not in caplog.text


@pytest.mark.parametrize("budget", [None, "tokens"])
def test_a_step_of_over_a_hundred_passes_over_the_pool_is_refused(budget, tmp_path):
    """A mistyped step size (10**8 tokens of a few thousand) only got the warning above and then spent hours
    building its first step: over MAX_PASSES_PER_STEP passes of the pool, it is refused naming the option."""
    from qwen_distillation.training.distiller import MAX_PASSES_PER_STEP

    general, medical = _pools()
    tokens = sum(len(e["input_ids"]) for e in general)
    most = ["stage1.batch_size=1", f"stage1.grad_accum={MAX_PASSES_PER_STEP * len(general)}"] if budget is None \
        else [f"stage1.tokens_per_step={MAX_PASSES_PER_STEP * tokens}"]
    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "out") + most))
    distiller = _distiller_over(cfg, general, medical)
    distiller._check_step_size(1)  # exactly a hundred passes: warned of, not refused
    if budget:
        cfg.stage1.tokens_per_step += 1
        named = f"stage1.tokens_per_step={MAX_PASSES_PER_STEP * tokens + 1}: "
    else:
        cfg.stage1.grad_accum += 1
        named = f"stage1.batch_size=1 x stage1.grad_accum={MAX_PASSES_PER_STEP * len(general) + 1}: "
    with pytest.raises(ConfigError) as err:
        distiller._check_step_size(1)
    assert str(err.value).startswith(named) and f"{MAX_PASSES_PER_STEP} times over" in str(err.value), err.value


def test_a_later_stages_absurd_token_budget_is_refused_before_the_first_stage_trains(tmp_path, capsys):
    from tests.conftest import run_cli

    out = tmp_path / "out"
    code, output = run_cli(tiny_overrides(out, steps=1) + ["end_stage=2", "stage2.tokens_per_step=100000000"], capsys)
    assert code != 0 and "stage2.tokens_per_step=100000000: a step of 100,000,000 would hold" in output, output
    assert not (out / "stage1").exists()


def test_a_mixed_step_whose_share_of_one_domain_outgrows_its_pool_is_logged(tmp_path, caplog):
    """Stage 2's linear 0.3 -> 0.7 of 8 examples serves up to 6 medical ones a step: with 5 medical examples
    (and plenty of general ones, so the step fits the two pools together) every such step repeated some
    of them without a word."""
    general, medical = _pools(n_medical=5)
    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "out") + [
        "stage2.batch_size=4", "stage2.grad_accum=2"]))
    distiller = _distiller_over(cfg, general, medical)
    with caplog.at_level("WARNING", logger="qwen_distillation.training.distiller"):
        distiller._stage_steps("stage2", cfg.stage2)
    assert ("stage2: a step serves up to 6 medical examples (stage2.medical_ratio 0.3 -> 0.7 of 8) but data.medical "
            "holds 5 training examples") in caplog.text
    assert "lower stage2.batch_size or stage2.grad_accum" in caplog.text and "general examples" not in caplog.text
    caplog.clear()
    distiller.data.medical = _pools(n_medical=6)[1]  # 6 is enough
    with caplog.at_level("WARNING", logger="qwen_distillation.training.distiller"):
        distiller._stage_steps("stage2", cfg.stage2)
    assert "more than once" not in caplog.text


@pytest.mark.parametrize("overrides, key, words", [
    (["stage1.tokens_per_step=0"], "stage1.tokens_per_step=0", "must be >= 1"),
    (["stage2.tokens_per_step=512", "distributed=zero2"], "stage2.tokens_per_step=512", "distributed=none"),
    (["stage2.tokens_per_step=512", "distributed=fsdp2"], "stage2.tokens_per_step=512", "distributed=none"),
])
def test_refused_combinations_name_the_override(tmp_path, overrides, key, words):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(tiny_overrides(tmp_path / "out") + overrides))
    assert key in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("packing", ["false", "true"])
def test_a_run_with_a_token_budget_logs_steps_within_it(tmp_path, packing):
    from qwen_distillation.app import run

    out = tmp_path / packing
    run(compose_config(tiny_overrides(out, steps=3) + [
        "start_stage=2", "stage2.tokens_per_step=300", "stage3.tokens_per_step=300",
        "stage3.sampling.rescore_every=2", "stage3.sampling.max_scored=8", f"train.packing={packing}"]))
    rows = train_rows(out)
    assert [(r["stage"], r["step"]) for r in rows] == [(2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3)]
    assert all(r["medical_ratio"] == 1.0 and "sampler/score_mean" in r for r in rows[3:])  # hard sampling
    for row in rows:
        assert row["examples"] >= 1 and row["input_tokens"] <= 300
        assert 0 < row["tokens"] < row["input_tokens"]  # the response targets are a part of the input
        assert row["loss"] == row["loss"]
    assert len({r["examples"] for r in rows}) > 1 or len({r["input_tokens"] for r in rows}) > 1


def test_packing_a_budgeted_step_keeps_its_token_terms_and_changes_only_the_contrastive_negatives(tmp_path):
    """With a token budget, packed micro-batches are cut by tokens (data.max_length x batch_size), so they hold
    more examples than batch_size: the same examples and token-level terms as unpacked, but the contrastive
    term's in-batch negatives (and so its value) follow the micro-batches, as docs/configuration.md says."""
    from qwen_distillation.app import run

    rows = {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        run(compose_config(tiny_overrides(out, steps=1) + [
            "start_stage=2", "end_stage=2", "data.max_length=256", "stage2.tokens_per_step=1000",
            "stage2.loss.balancing.method=none", f"train.packing={packing}"]))
        (rows[packing],) = train_rows(out)
    unpacked, packed = rows["false"], rows["true"]
    assert (packed["examples"], packed["input_tokens"], packed["tokens"]) == (
        unpacked["examples"], unpacked["input_tokens"], unpacked["tokens"])
    for term in ("loss/ce", "loss/kd", "loss/feature", "loss/attention"):
        assert packed[term] == pytest.approx(unpacked[term], rel=1e-5), term
    assert packed["loss/contrastive"] != pytest.approx(unpacked["loss/contrastive"], rel=1e-3)


@pytest.mark.slow
def test_a_killed_run_with_a_token_budget_resumes_with_the_same_steps(tmp_path, monkeypatch):
    """Killed after step 3 of 4 of stage 2 (checkpoint at step 2) and again in stage 3 (hard-example
    sampling, its scores in flight), the same command resumes and logs the uninterrupted run's
    steps: the same examples, tokens, medical shares and losses."""
    from safetensors.torch import load_file

    from qwen_distillation.app import run

    common = tiny_overrides(tmp_path / "x", steps=4) + [
        "start_stage=2", "stage2.save_every=2", "stage2.tokens_per_step=300", "stage3.save_every=2",
        "stage3.tokens_per_step=300", "stage3.sampling.rescore_every=3", "stage3.sampling.max_scored=8"]
    run(compose_config(common + [f"output_dir={tmp_path / 'reference'}"]))
    kill_in_stages(monkeypatch, lambda: run(compose_config(common + [f"output_dir={tmp_path / 'resumed'}"])))
    drop = ("tokens_per_s",)
    reference, resumed = ([{k: v for k, v in row.items() if k not in drop} for row in train_rows(tmp_path / name)]
                          for name in ("reference", "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] * 2
    assert resumed == reference
    ours, theirs = (load_file(tmp_path / name / "stage3" / "final" / "model.safetensors")
                    for name in ("reference", "resumed"))
    assert all(ours[name].equal(theirs[name]) for name in ours)


@pytest.mark.parametrize("overrides, named", [
    (["stage2.tokens_per_step=100"], "stage2.tokens_per_step=100: "),
    (["stage2.batch_size=1", "train.packing=true", "train.pack_step=true"], "stage2.batch_size=1: "),
    (["stage2.batch_size=1", "train.packing=true", "stage2.tokens_per_step=4096"], "stage2.batch_size=1: "),
])
def test_a_contrastive_term_whose_micro_batches_hold_one_example_each_is_refused(tmp_path, overrides, named):
    """Validation lets a contrastive stage pass with batch_size 1 when packing by tokens puts several examples
    into a micro-batch, and a token budget cuts a step by tokens; with examples too long for two to share a
    step's budget or a packed micro-batch (batch_size x data.max_length = 96 tokens here), every micro-batch
    held one example and loss/contrastive was exactly 0 at every step, without a word."""
    from qwen_distillation.training.distiller import Distiller

    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "out") + overrides))  # stage2 contrastive 0.05
    distiller = Distiller(cfg)

    class Data:
        pass

    distiller.data = Data()
    distiller.data.general = [{"input_ids": [1] * n} for n in (60, 80, 96)]
    distiller.data.medical = [{"input_ids": [1] * n} for n in (55, 90)]
    with pytest.raises(ConfigError) as err:
        distiller._check_contrastive_pairs(2)
    assert named in str(err.value) and "the stage's two shortest have 115 tokens together" in str(err.value)
    assert "exactly 0 at every step" in str(err.value) and "stage2.loss.weights.contrastive=0" in str(err.value)
    distiller.data.general.append({"input_ids": [1] * 40})  # 40 + 55 tokens fit together: the term can train
    distiller._check_contrastive_pairs(2)
    cfg.stage2.loss.weights.contrastive = 0.0  # no term, nothing to refuse
    distiller.data.general.pop()
    distiller._check_contrastive_pairs(2)


def test_an_eval_every_past_a_stage_sized_by_epochs_is_warned_of(tmp_path, caplog):
    """Without max_steps the stage's length is known once its data is: an eval_every past it evaluated
    the stage only at its end, without a word."""
    from qwen_distillation.training.distiller import Distiller

    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "out") + [
        "stage1.max_steps=null", "stage1.epochs=1", "stage1.batch_size=2", "stage1.grad_accum=1",
        "stage1.eval_every=5"]))
    distiller = Distiller(cfg)

    class Data:
        pass

    distiller.data = Data()
    distiller.data.general, distiller.data.medical = [{"input_ids": [1] * 4}] * 8, []
    with caplog.at_level("WARNING", logger="qwen_distillation.training.distiller"):
        assert distiller._stage_steps("stage1", cfg.stage1) == 4
    assert ("stage1.eval_every=5: ignored, the stage runs 4 steps (stage1.epochs=1.0 over its data), so it is "
            "evaluated only at its end; to evaluate during it, lower it (e.g. stage1.eval_every=1)") in caplog.text
    caplog.clear()
    cfg.stage1.eval_every = 4
    with caplog.at_level("WARNING", logger="qwen_distillation.training.distiller"):
        distiller._stage_steps("stage1", cfg.stage1)
    assert "eval_every" not in caplog.text
    # A save_every past the same end: no checkpoint by steps, and it was warned of only beside max_steps.
    cfg.stage1.save_every = 5
    with caplog.at_level("WARNING", logger="qwen_distillation.training.distiller"):
        distiller._stage_steps("stage1", cfg.stage1)
    assert ("stage1.save_every=5: past the stage's 4 steps (stage1.epochs=1.0 over its data), so it writes no "
            "checkpoint by steps") in caplog.text
