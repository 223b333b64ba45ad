"""The single-device engine on its own: accumulation invariance, clipping, the non-finite
policy, the fp16 loss scaler, and a state round-trip that continues exactly."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from qwen_distillation.training.balancing import Balancer
from qwen_distillation.training.engine import SingleDeviceEngine
from qwen_distillation.training.module import per_step_mean
from qwen_distillation.training.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.usefixtures("single_thread")


class Toy(nn.Module):
    """Stands for the trainable module: a student and a head, each one small linear map."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.student = nn.Linear(4, 3)
        self.heads = nn.Linear(3, 2)

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token-level sums of two terms over the rows of ``x``, like the module's terms."""
        hidden = self.student(x)
        return {"a": ((hidden - y) ** 2).sum(), "b": self.heads(hidden).abs().sum()}


def _engine(module: nn.Module, *, method: str = "none", max_grad_norm: float = 0.0, lr: float = 0.1,
            precision: str = "fp32", total_steps: int = 10, optimizer: str = "adamw") -> SingleDeviceEngine:
    params = [p for p in module.parameters() if p.requires_grad]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    else:
        opt = build_optimizer(params, lr=lr, weight_decay=0.0)
    scheduler = build_scheduler(opt, total_steps=total_steps, warmup_ratio=0.2, scheduler="cosine", min_lr_ratio=0.1)
    weights = {"a": 1.0, "b": 0.5}
    balancer = Balancer(method, list(weights), weights, seed=3)
    return SingleDeviceEngine(module, optimizer=opt, scheduler=scheduler, balancer=balancer,
                              shared=list(module.student.parameters()), precision=precision,
                              max_grad_norm=max_grad_norm)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 4, generator=generator), torch.randn(8, 3, generator=generator)


def _train(engine: SingleDeviceEngine, module: Toy, steps: range, micro_batches: int) -> list:
    outcomes = []
    for step in steps:
        x, y = _data(step)
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            assert engine.backward(per_step_mean(module.terms(xs, ys), tokens=8, micro_batches=micro_batches))
        outcomes.append(engine.step())
    return outcomes


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_one_micro_batch_of_8_equals_4_of_2():
    """The step's gradient and update do not depend on how its examples are split. (GradNorm
    and PCGrad work per micro-batch, so they are not split-invariant: training/balancing.py.)"""
    results = {}
    for micro_batches in (1, 4):
        module = Toy()
        engine = _engine(module)
        outcomes = _train(engine, module, range(3), micro_batches)
        results[micro_batches] = (outcomes, _weights(module))
    (outcomes_1, weights_1), (outcomes_4, weights_4) = results[1], results[4]
    for a, b in zip(outcomes_1, outcomes_4):
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6) and a.lr == b.lr
    for name in weights_1:
        torch.testing.assert_close(weights_1[name], weights_4[name], rtol=1e-6, atol=1e-7)


def test_clipping_scales_the_update_and_reports_the_norm_before_it():
    module = Toy()
    engine = _engine(module, max_grad_norm=0.05, lr=1.0, optimizer="sgd")
    before = _weights(module)
    x, y = _data(0)
    engine.backward(per_step_mean(module.terms(x, y), tokens=8, micro_batches=1))
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    outcome = engine.step()
    assert outcome.grad_norm == pytest.approx(norm, rel=1e-6) and norm > 0.05
    lr = outcome.lr
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - lr * grads[name] * (0.05 / norm), rtol=1e-5,
                                   atol=1e-7)
    assert all(p.grad is None for p in module.parameters())  # zeroed after the step


def test_a_non_finite_term_skips_the_step_and_is_counted():
    module = Toy()
    engine = _engine(module)
    _train(engine, module, range(1), 1)
    before, lr_before = _weights(module), engine.scheduler.get_last_lr()[0]
    x, y = _data(1)
    terms = module.terms(x, y)
    assert engine.backward({"a": terms["a"] * float("inf"), "b": terms["b"]}) is None
    skipped = engine.step()
    assert skipped.skipped and math.isnan(skipped.grad_norm) and skipped.nonfinite == "loss/a=inf"
    assert (skipped.bad_in_row, skipped.bad_total) == (1, 1)
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert engine.scheduler.get_last_lr()[0] == lr_before == skipped.lr  # the schedule did not advance
    good = _train(engine, module, range(2, 3), 1)[0]
    assert not good.skipped and (good.bad_in_row, good.bad_total) == (0, 1) and good.lr == lr_before


def test_a_non_finite_gradient_skips_the_step():
    module = Toy()
    engine = _engine(module)
    with torch.no_grad():
        module.student.bias.zero_()
    before = _weights(module)
    # A finite loss whose gradient is not: d sqrt(|w|) / dw at w = 0.
    assert engine.backward({"a": module.student.bias.abs().sqrt().sum(), "b": torch.zeros((), requires_grad=True)})
    outcome = engine.step()
    assert outcome.skipped and outcome.nonfinite.startswith("grad_norm=") and outcome.bad_in_row == 1
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_fp16_scaler_backs_off_after_an_overflow_and_then_steps():
    module = Toy()
    engine = _engine(module, precision="fp16")
    scale = engine.scaler.get_scale()
    with torch.no_grad():
        module.student.bias.zero_()
    engine.backward({"a": module.student.bias.abs().sqrt().sum(), "b": torch.zeros((), requires_grad=True)})
    assert engine.step().skipped and engine.scaler.get_scale() == scale / 2
    outcome = _train(engine, module, range(1), 2)[0]
    assert not outcome.skipped and math.isfinite(outcome.grad_norm)


@pytest.mark.parametrize("method", ["none", "gradnorm", "pcgrad"])
def test_state_round_trip_continues_exactly(method):
    module = Toy()
    engine = _engine(module, method=method, max_grad_norm=1.0)
    _train(engine, module, range(2), 2)
    buffer = io.BytesIO()  # as a checkpoint holds it: a copy, not the live optimizer tensors
    torch.save(engine.state_dict(), buffer)
    later = _train(engine, module, range(2, 5), 2)
    expected = _weights(module)

    restored = Toy(seed=9)  # other initial weights: everything must come from the state
    engine_2 = _engine(restored, method=method, max_grad_norm=1.0)
    buffer.seek(0)
    engine_2.load_state_dict(torch.load(buffer, weights_only=False))
    again = _train(engine_2, restored, range(2, 5), 2)
    assert [o.grad_norm for o in again] == [o.grad_norm for o in later]
    assert [o.lr for o in again] == [o.lr for o in later]
    for name, value in expected.items():
        assert torch.equal(dict(restored.named_parameters())[name].detach(), value), name
