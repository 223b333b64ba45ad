"""Gradient balancing between loss terms and hard-example sampling for stage 3."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from qwen_distillation.data.hard_sampling import HardExampleSampler, score_indices
from qwen_distillation.errors import CheckpointError
from qwen_distillation.training.balancing import Balancer, step_logs


# Tiny tensors: one intra-op thread avoids contention (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- balancing

def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _inputs(seed=1, n=5):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))


def _losses(model, x, factors=(1.0, 1.0, 1.0)):
    """Quadratic losses pulling the outputs towards a, -a and b: kd and ce conflict."""
    out = model(x)
    a, b = torch.tensor([3.0, -2.0]), torch.tensor([1.0, 4.0])
    return {"kd": factors[0] * ((out - a) ** 2).sum(),
            "ce": factors[1] * ((out + a) ** 2).sum(),
            "feature": factors[2] * ((out - b) ** 2).sum()}


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def _zero(model):
    for p in model.parameters():
        p.grad = None


def _per_term_grads(model, losses, weights):
    out = {}
    for name, loss in losses.items():
        out[name] = _flat(torch.autograd.grad(weights[name] * loss, list(model.parameters()), retain_graph=True))
    return out


WEIGHTS = {"kd": 0.7, "ce": 0.3, "feature": 0.5}


def test_none_equals_weighted_sum_exactly():
    model, x = _mlp(), _inputs()
    losses = _losses(model, x)
    (sum(WEIGHTS[n] * losses[n] for n in losses) * 0.125).backward()
    expected = _grads(model)
    _zero(model)
    logs = Balancer("none", list(WEIGHTS), WEIGHTS).backward(_losses(model, x), list(model.parameters()), scale=0.125)
    assert all(torch.equal(g, e) for g, e in zip(_grads(model), expected))
    assert logs == {"weight/kd": 0.7, "weight/ce": 0.3, "weight/feature": 0.5}


def test_none_accumulates_over_micro_batches():
    model, x = _mlp(), _inputs(n=6)
    balancer = Balancer("none", list(WEIGHTS), WEIGHTS)
    # Losses are sums over examples; scale = 1 / examples in the step.
    balancer.backward(_losses(model, x), list(model.parameters()), scale=1 / 6)
    whole = _grads(model)
    _zero(model)
    balancer.backward(_losses(model, x[:2]), list(model.parameters()), scale=1 / 6)
    balancer.backward(_losses(model, x[2:]), list(model.parameters()), scale=1 / 6)
    for g, w in zip(_grads(model), whole):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_pcgrad_hand_example_from_the_paper():
    # L1 = g1 . x, L2 = g2 . x: the gradients are g1 = (1, 0), g2 = (-1, 1), g1 . g2 = -1 < 0.
    x = nn.Parameter(torch.zeros(2))
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    logs = Balancer("pcgrad", ["kd", "ce"], {"kd": 1.0, "ce": 1.0}).backward(
        {"kd": g1 @ x, "ce": g2 @ x}, [x])
    # g1' = g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5); g2' = g2 - (g2.g1)/|g1|^2 g1 = (0, 1)
    torch.testing.assert_close(x.grad, torch.tensor([0.5, 1.5]))
    assert logs["conflicts"] == 2
    assert logs["cos/kd_ce"] == pytest.approx(-1 / math.sqrt(2))
    assert logs["weight/kd"] == 1.0


def test_pcgrad_conflicting_gradients_are_projected():
    model, x = _mlp(), _inputs()
    weights = {"kd": 1.0, "ce": 1.0}
    losses = _losses(model, x)
    originals = _per_term_grads(model, {n: losses[n] for n in weights}, weights)
    assert float(originals["kd"] @ originals["ce"]) < 0  # the test needs a conflict
    logs = Balancer("pcgrad", list(weights), weights).backward(
        {n: losses[n] for n in weights}, list(model.parameters()))
    combined = _flat(_grads(model))
    assert logs["cos/kd_ce"] < 0 and logs["conflicts"] == 2
    for g in originals.values():
        assert float(combined @ g) >= -1e-5
    # The plain sum does conflict with one of them: the projection changed something.
    plain = originals["kd"] + originals["ce"]
    assert min(float(plain @ g) for g in originals.values()) < 0


def test_pcgrad_without_conflict_equals_the_sum():
    model, x = _mlp(), _inputs()
    losses = _losses(model, x)
    weights = {"kd": 0.7, "feature": 0.5}
    # Same target twice: identical directions, no conflict.
    pair = {"kd": losses["kd"], "feature": 2.0 * losses["kd"]}
    originals = _per_term_grads(model, pair, weights)
    logs = Balancer("pcgrad", list(weights), weights).backward(pair, list(model.parameters()), scale=0.5)
    assert logs["conflicts"] == 0
    torch.testing.assert_close(_flat(_grads(model)), 0.5 * (originals["kd"] + originals["feature"]))


def test_pcgrad_deterministic_under_seed_and_adds_to_existing_grad():
    model, x = _mlp(), _inputs()
    results = []
    for _ in range(2):
        _zero(model)
        balancer = Balancer("pcgrad", list(WEIGHTS), WEIGHTS, seed=3)
        for _ in range(2):  # two calls: the second uses the next per-call order
            balancer.backward(_losses(model, x), list(model.parameters()))
        results.append(_flat(_grads(model)))
    assert torch.equal(results[0], results[1])

    _zero(model)
    Balancer("pcgrad", list(WEIGHTS), WEIGHTS, seed=3).backward(_losses(model, x), list(model.parameters()))
    fresh = _grads(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    Balancer("pcgrad", list(WEIGHTS), WEIGHTS, seed=3).backward(_losses(model, x), list(model.parameters()))
    for g, f in zip(_grads(model), fresh):
        torch.testing.assert_close(g, f + 1)


def test_a_step_logs_the_mean_cosine_of_the_micro_batches_that_define_it():
    """A term without gradient (the contrastive term of a one-example micro-batch) has no direction: its cosine
    was logged as 0.0, a claim of orthogonal gradients, and the step logged only its last micro-batch's values."""
    model = _mlp()
    balancer = Balancer("pcgrad", list(WEIGHTS), WEIGHTS)
    calls = []
    for x, feature in ((_inputs(seed=1), 1.0), (_inputs(seed=2), 1.0), (_inputs(seed=3), 0.0)):
        losses = _losses(model, x, factors=(1.0, 1.0, feature))
        calls.append(balancer.backward(losses, list(model.parameters())))
    assert math.isnan(calls[2]["cos/kd_feature"]) and math.isnan(calls[2]["cos/ce_feature"])
    assert math.isfinite(calls[2]["cos/kd_ce"])
    logs = step_logs(calls)
    assert logs["cos/kd_feature"] == pytest.approx((calls[0]["cos/kd_feature"] + calls[1]["cos/kd_feature"]) / 2)
    assert logs["cos/kd_ce"] == pytest.approx(sum(call["cos/kd_ce"] for call in calls) / 3)
    assert logs["conflicts"] == pytest.approx(sum(call["conflicts"] for call in calls) / 3)
    assert {k: v for k, v in logs.items() if k.startswith("weight/")} == {f"weight/{n}": w for n, w in WEIGHTS.items()}
    assert math.isnan(step_logs(calls[2:])["cos/kd_feature"])  # no micro-batch defined it
    assert step_logs(calls[:1]) == calls[0]  # one micro-batch: its own values
    # GradNorm's values are those of its last update that had the term.
    gradnorm = Balancer("gradnorm", list(WEIGHTS), WEIGHTS)
    without_feature = {n: v for n, v in _losses(model, x).items() if n != "feature"}
    calls = [gradnorm.backward(_losses(model, x), list(model.parameters())),
             gradnorm.backward(without_feature, list(model.parameters()))]
    logs = step_logs(calls)
    assert logs["grad_norm/feature"] == calls[0]["grad_norm/feature"]
    assert logs["grad_norm/kd"] == calls[1]["grad_norm/kd"] and logs["weight/kd"] == calls[1]["weight/kd"]


def _gradnorm_run(balancer, model, x, calls, factors):
    logs = []
    for _ in range(calls):
        _zero(model)
        logs.append(balancer.backward(_losses(model, x, factors), list(model.parameters())))
    return logs, _grads(model)


def test_gradnorm_weights_stay_positive_normalised_and_move_against_the_largest_gradient():
    model, x = _mlp(), _inputs()
    weights = {"kd": 1.0, "ce": 1.0, "feature": 0.5}
    balancer = Balancer("gradnorm", list(weights), weights, lr=0.05)
    # feature's raw loss is 10x: the largest gradient norm on the shared (last) layer.
    logs, _ = _gradnorm_run(balancer, model, x, 6, factors=(1.0, 1.0, 10.0))
    assert logs[0]["weight/feature"] == pytest.approx(0.5)
    assert logs[0]["grad_norm/feature"] == max(logs[0][f"grad_norm/{n}"] for n in weights)
    for row in logs:
        used = [row[f"weight/{n}"] for n in weights]
        assert min(used) > 0
        assert sum(used) == pytest.approx(2.5)
        assert row["gradnorm/loss"] >= 0
    assert logs[-1]["weight/feature"] < 0.5 - 0.05
    assert sum(balancer.current_weights().values()) == pytest.approx(2.5)


def test_gradnorm_uses_its_weights_in_the_backward():
    model, x = _mlp(), _inputs()
    weights = {"kd": 1.0, "ce": 2.0, "feature": 0.5}
    balancer = Balancer("gradnorm", list(weights), weights)
    _gradnorm_run(balancer, model, x, 2, factors=(1.0, 1.0, 10.0))
    used = balancer.current_weights()
    logs, grads = _gradnorm_run(balancer, model, x, 1, factors=(1.0, 1.0, 10.0))
    assert logs[0]["weight/ce"] == pytest.approx(used["ce"])
    _zero(model)
    losses = _losses(model, x, (1.0, 1.0, 10.0))
    sum(used[n] * losses[n] for n in losses).backward()
    for g, e in zip(grads, _grads(model)):
        torch.testing.assert_close(g, e)


def test_gradnorm_state_dict_round_trip_resumes_identically():
    model, x = _mlp(), _inputs()
    weights = {"kd": 1.0, "ce": 1.0, "feature": 0.5}
    balancer = Balancer("gradnorm", list(weights), weights)
    _gradnorm_run(balancer, model, x, 3, factors=(1.0, 2.0, 10.0))
    state = copy.deepcopy(balancer.state_dict())
    expected_logs, expected_grads = _gradnorm_run(balancer, model, _inputs(seed=7), 3, factors=(1.0, 2.0, 10.0))

    resumed = Balancer("gradnorm", list(weights), weights)
    resumed.load_state_dict(state)
    logs, grads = _gradnorm_run(resumed, model, _inputs(seed=7), 3, factors=(1.0, 2.0, 10.0))
    assert logs == expected_logs
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))


def test_gradnorm_keeps_its_weights_through_a_micro_batch_whose_gradient_overflows():
    """A finite loss whose gradient at the shared layer is inf (an fp16 step that overflows, which the engine
    skips and the loss scaler backs off from) turned GradNorm's weights NaN, and with them every later step:
    the stage diverged, with advice about its learning rate. The weights are kept; the next step trains."""
    model, x = _mlp(), _inputs()
    weights = {"kd": 1.0, "ce": 1.0, "feature": 0.5}
    balancer = Balancer("gradnorm", list(weights), weights)
    _gradnorm_run(balancer, model, x, 2, factors=(1.0, 1.0, 10.0))
    before = balancer.current_weights()
    _zero(model)
    losses = _losses(model, x, (1.0, 1.0, 10.0))
    # sqrt at 0 on the shared layer (the last parameter): the loss stays finite, its gradient is inf
    losses["feature"] = losses["feature"] + (model[2].bias - model[2].bias.detach()).sqrt().sum()
    logs = balancer.backward(losses, list(model.parameters()))
    assert math.isinf(logs["grad_norm/feature"])
    assert balancer.current_weights() == before
    logs, grads = _gradnorm_run(balancer, model, x, 1, factors=(1.0, 1.0, 10.0))
    assert all(math.isfinite(value) for value in logs[0].values()), logs
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_gradnorm_weights_stay_finite_under_a_large_learning_rate():
    """gradnorm_lr=1000 moved a log weight past exp's range: the rescaling divided inf by inf and the weights
    turned NaN, every later step was skipped and the stage ended as diverged."""
    model, x = _mlp(), _inputs()
    weights = {"kd": 1.0, "ce": 1.0, "feature": 0.5}
    balancer = Balancer("gradnorm", list(weights), weights, lr=1000.0)
    logs, grads = _gradnorm_run(balancer, model, x, 4, factors=(1.0, 1.0, 10.0))
    trained = balancer.current_weights()
    assert all(math.isfinite(w) and w >= 0 for w in trained.values()), trained
    assert sum(trained.values()) == pytest.approx(2.5)
    assert all(math.isfinite(value) for row in logs for value in row.values()), logs


def test_pcgrad_state_dict_round_trip_resumes_identically():
    model, x = _mlp(), _inputs()
    balancer = Balancer("pcgrad", list(WEIGHTS), WEIGHTS, seed=5)
    _gradnorm_run(balancer, model, x, 2, factors=(1.0, 1.0, 1.0))
    state = copy.deepcopy(balancer.state_dict())
    expected_logs, expected_grads = _gradnorm_run(balancer, model, x, 2, factors=(1.0, 1.0, 1.0))
    resumed = Balancer("pcgrad", list(WEIGHTS), WEIGHTS, seed=5)
    resumed.load_state_dict(state)
    logs, grads = _gradnorm_run(resumed, model, x, 2, factors=(1.0, 1.0, 1.0))
    assert logs == expected_logs
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))


def test_balancer_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown gradient balancing method"):
        Balancer("mgda", ["kd"], {"kd": 1.0})
    with pytest.raises(ValueError, match="no weight"):
        Balancer("none", ["kd", "ce"], {"kd": 1.0})
    with pytest.raises(ValueError, match="> 0"):
        Balancer("gradnorm", ["kd", "ce"], {"kd": 1.0, "ce": 0.0})
    model, x = _mlp(), _inputs()
    with pytest.raises(ValueError, match="not among"):
        Balancer("none", ["kd"], {"kd": 1.0}).backward(_losses(model, x), list(model.parameters()))


# ---------------------------------------------------------------- hard-example sampling

def _examples(n=20):
    return [{"id": f"m{i}", "domain": "medical"} for i in range(n)]


def _sampler(n=20, per_step=4, seed=0, **kwargs):
    return HardExampleSampler(_examples(n), examples_per_step=per_step, seed=seed, **kwargs)


def test_higher_scores_are_served_more_often():
    sampler = _sampler(uniform_floor=0.3, temperature=2.0)
    sampler.update_scores(list(range(20)), [float(i) / 2 for i in range(20)])
    counts = [0] * 20
    for _ in range(400):
        served = sampler.next_step()
        assert served.medical_ratio == 1.0 and served.medical_ratio_target == 1.0 and served.num_medical == 4
        assert len(set(sampler.last_indices)) == 4  # without replacement
        assert [e["id"] for e in served.examples] == [f"m{i}" for i in sampler.last_indices]
        for i in sampler.last_indices:
            counts[i] += 1
    assert sum(counts[-5:]) > 2 * sum(counts[:5])
    assert min(counts) > 0  # the floor: nothing starves


def test_every_probability_keeps_the_floor():
    sampler = _sampler(uniform_floor=0.2, temperature=0.1)
    sampler.update_scores([3, 7], [100.0, -100.0])
    probs = sampler.probabilities()
    assert float(probs.sum()) == pytest.approx(1.0)
    assert float(probs.min()) >= 0.2 / 20 - 1e-12
    # Never-scored examples count with the mean score (0 here).
    assert sampler.filled_scores()[0] == 0.0


@pytest.mark.parametrize("temperature", [1e-310, 1e-320])
def test_a_temperature_so_small_that_the_scores_overflow_draws_the_top_scores(temperature):
    """`stage3.sampling.temperature=1e-310` passed validation (> 0), then score / temperature overflowed
    to inf, the softmax was nan, and the first step stopped with torch.multinomial's traceback ("probability
    tensor contains either `inf`, `nan` or element < 0"). The limit of the softmax is kept: all the hard mass
    on the top scores, the floor on every example."""
    sampler = _sampler(uniform_floor=0.2, temperature=temperature)
    sampler.update_scores(list(range(20)), [11.5 if i in (3, 7) else 10.0 + i / 100 for i in range(20)])
    probs = sampler.probabilities()
    assert bool(torch.isfinite(probs).all()) and float(probs.sum()) == pytest.approx(1.0)
    assert float(probs[3]) == float(probs[7]) == pytest.approx(0.2 / 20 + 0.8 / 2)
    assert float(probs.min()) == pytest.approx(0.2 / 20)
    assert len(sampler.next_step().examples) == 4


def test_equal_scores_give_uniform_probabilities():
    sampler = _sampler()
    torch.testing.assert_close(sampler.probabilities(), torch.full((20,), 1 / 20, dtype=torch.float64))
    sampler.update_scores(list(range(20)), [2.5] * 20)
    torch.testing.assert_close(sampler.probabilities(), torch.full((20,), 1 / 20, dtype=torch.float64))


def test_sampling_is_deterministic_under_the_seed():
    def run(seed):
        sampler = _sampler(seed=seed)
        sampler.update_scores(list(range(10)), [float(i) for i in range(10)])
        out = []
        for _ in range(10):
            sampler.next_step()
            out.append(sampler.last_indices)
        return out

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_state_dict_round_trip_continues_identically():
    sampler = _sampler(rescore_every=3)
    sampler.update_scores(list(range(20)), [float(i % 7) for i in range(20)])
    for _ in range(4):
        sampler.next_step()
    sampler.update_scores([1, 2], [9.0, 8.0])
    state = json.loads(json.dumps(sampler.state_dict()))  # plain ints, floats and lists
    expected = []
    for _ in range(6):
        sampler.next_step()
        expected.append((sampler.last_indices, sampler.needs_scores()))
    expected_stats = sampler.stats()

    resumed = _sampler(rescore_every=3)
    resumed.load_state_dict(state)
    got = []
    for _ in range(6):
        resumed.next_step()
        got.append((resumed.last_indices, resumed.needs_scores()))
    assert got == expected
    assert resumed.stats() == expected_stats


def test_needs_scores_schedule():
    sampler = _sampler(rescore_every=3)
    schedule = []
    for _ in range(7):
        schedule.append(sampler.needs_scores())
        if sampler.needs_scores():
            sampler.update_scores([0], [1.0])
            assert not sampler.needs_scores()
        sampler.next_step()
    assert schedule == [True, False, False, True, False, False, True]


def test_stats_summarise_scores_and_the_hard_share():
    sampler = _sampler(uniform_floor=0.1, temperature=0.5)
    sampler.update_scores(list(range(20)), [float(i) for i in range(20)])
    for _ in range(50):
        sampler.next_step()
    stats = sampler.stats()
    assert set(stats) == {"sampler/score_mean", "sampler/score_p50", "sampler/score_p90", "sampler/score_max",
                          "sampler/hard_share"}
    assert stats["sampler/score_mean"] == pytest.approx(9.5)
    assert stats["sampler/score_p50"] == pytest.approx(9.5)
    assert stats["sampler/score_p90"] == pytest.approx(17.1)
    assert stats["sampler/score_max"] == 19.0
    assert stats["sampler/hard_share"] > 0.7
    assert sampler.stats()["sampler/hard_share"] == 0.0  # counts reset by each call


def test_more_examples_per_step_than_examples_are_served_in_rounds():
    sampler = _sampler(n=3, per_step=7)
    served = sampler.next_step()
    assert len(served.examples) == 7 and served.num_medical == 7
    first = sampler.last_indices
    assert sorted(first[:3]) == [0, 1, 2] and sorted(first[3:6]) == [0, 1, 2]


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="uniform_floor"):
        _sampler(uniform_floor=0.0)
    with pytest.raises(ValueError, match="temperature"):
        _sampler(temperature=0.0)
    with pytest.raises(ValueError, match="finite"):
        _sampler().update_scores([0], [float("nan")])
    with pytest.raises(ValueError, match="example"):
        HardExampleSampler([], examples_per_step=2, seed=0)
    state = _sampler(n=20).state_dict()
    with pytest.raises(CheckpointError, match="the medical data has 21 examples but the checkpoint was taken with 20; "
                                              "resume with the data it was taken with, or delete "
                                              "OUTPUT_DIR/stage3/checkpoint-\\*"):
        _sampler(n=21).load_state_dict(state)


def test_score_indices():
    assert score_indices(5, None, step=0, seed=0) == [0, 1, 2, 3, 4]
    assert score_indices(5, 10, step=0, seed=0) == [0, 1, 2, 3, 4]
    subset = score_indices(100, 10, step=50, seed=1)
    assert len(subset) == len(set(subset)) == 10 and subset == sorted(subset)
    assert all(0 <= i < 100 for i in subset)
    assert subset == score_indices(100, 10, step=50, seed=1)
    assert subset != score_indices(100, 10, step=100, seed=1)


def test_a_balancer_over_one_active_term_is_named_as_doing_nothing(tmp_path, capsys):
    """PCGrad (or GradNorm) over a single active loss term balances nothing and still pays for its
    per-term gradients: the stage says so and names the override that turns it off."""
    from conftest import run_cli, tiny_overrides

    code, output = run_cli([*tiny_overrides(tmp_path / "run", steps=1), "end_stage=1",
                            "stage1.loss.balancing.method=pcgrad", "stage1.loss.weights.ce=0"], capsys)
    assert code == 0, output
    assert ("stage1.loss.balancing.method=pcgrad with one active loss term (kd) balances nothing" in output
            and "set stage1.loss.balancing.method=none" in output), output[-3000:]


def test_gradnorm_trains_the_weights_of_the_terms_a_call_gives():
    """A micro-batch without a contrastive pair (the one-example remainder of a token budget) gives its
    contrastive term as exactly 0: as GradNorm's first loss it was the initial loss that every later ratio
    divided (by 1e-12), and later it pulled the term's target to 0. The distiller leaves the term out of
    such a call; the weight of a term left out stays put (but for the renormalisation), and its initial loss
    is its first loss given."""
    model, x = _mlp(), _inputs()
    weights = {"kd": 1.0, "ce": 1.0, "feature": 0.5}
    balancer = Balancer("gradnorm", list(weights), weights, lr=0.05)
    _zero(model)
    losses = _losses(model, x, (1.0, 1.0, 10.0))
    logs = balancer.backward({"kd": losses["kd"], "ce": losses["ce"]}, list(model.parameters()))
    assert math.isnan(logs["grad_norm/feature"]) and math.isfinite(logs["grad_norm/kd"])
    assert balancer.initial_losses[2] is None
    trained = balancer.current_weights()
    assert sum(trained.values()) == pytest.approx(2.5)
    # Adam moved the given log weights by about its lr (0.05); the left-out one moved only with the rescaling.
    assert all(abs(math.log(trained[name] / weights[name])) > 0.04 for name in ("kd", "ce")), trained
    assert abs(math.log(trained["feature"] / 0.5)) < 0.005, trained
    # Its gradient is the given terms' alone, at the weights used.
    _zero(model)
    (logs["weight/kd"] * _losses(model, x, (1.0, 1.0, 10.0))["kd"]
     + logs["weight/ce"] * _losses(model, x, (1.0, 1.0, 10.0))["ce"]).backward()
    expected = _grads(model)
    _zero(model)
    Balancer("gradnorm", list(weights), weights, lr=0.05).backward(
        {k: v for k, v in _losses(model, x, (1.0, 1.0, 10.0)).items() if k != "feature"}, list(model.parameters()))
    for g, e in zip(_grads(model), expected):
        torch.testing.assert_close(g, e)
    # The next calls give every term: feature's initial loss is its first, and no weight runs off.
    later, _ = _gradnorm_run(balancer, model, x, 4, factors=(1.0, 1.0, 10.0))
    assert balancer.initial_losses[2] == pytest.approx(float(losses["feature"].detach()))
    final = balancer.current_weights()
    assert all(0.05 < w < 2.0 for w in final.values()), final
    assert all(math.isfinite(value) for row in later for value in row.values())
    with pytest.raises(ValueError, match="got none of them"):
        balancer.backward({}, list(model.parameters()))


@pytest.mark.parametrize("method", ["pcgrad", "gradnorm"])
def test_a_training_row_logs_the_balancing_values_of_every_micro_batch_of_its_step(tmp_path, monkeypatch, method):
    """With a token budget a step's last micro-batch may hold one example, without a contrastive pair: the row
    logged that micro-batch's values only, PCGrad's cos/*_contrastive as 0.0 and GradNorm without
    grad_norm/contrastive. It logs the step's (balancing.step_logs) over the micro-batches that define them."""
    from conftest import compose_config, tiny_overrides, train_rows
    from qwen_distillation.app import run

    calls, backward = [], Balancer.backward

    def recorded(self, *args, **kwargs):
        calls.append(backward(self, *args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(Balancer, "backward", recorded)
    out = tmp_path / "run"
    # Steps of 3 examples under the budget: micro-batches of 2 and 1 (batch_size 2).
    run(compose_config(tiny_overrides(out, steps=2) + [
        "end_stage=1", "stage1.loss.weights.contrastive=0.5", f"stage1.loss.balancing.method={method}",
        "stage1.tokens_per_step=300"]))
    rows, first = train_rows(out), 0
    key = "cos/kd_contrastive" if method == "pcgrad" else "grad_norm/contrastive"
    for row in rows:
        step = calls[first:first + math.ceil(row["examples"] / 2)]
        first += len(step)
        defined = [call[key] for call in step if not math.isnan(call[key])]
        assert len(step) == 2 and len(defined) == 1, (row, step)  # the case at hand: one micro-batch without a pair
        assert row[key] == defined[0] and row[key] != 0.0
        for name in step[0]:
            defined = [call[name] for call in step if not math.isnan(call[name])]
            expected = sum(defined) / len(defined) if name.startswith(("cos/", "conflicts")) else defined[-1]
            assert row[name] == pytest.approx(expected), (name, row, step)
    assert first == len(calls) and len(rows) == 2
