"""The engine: the mechanics of optimising the trainable module, behind a small interface.

The stage loop (``training.distiller``) tells the story of a stage: which examples, which
loss terms, when to evaluate and save. An engine owns the three jobs that change when the
work is spread over devices: the backward pass of the trainable module's loss terms, the
optimizer step, and the state those need to resume. Its surface is::

    engine.forward(batch, teacher)   # the trainable module's forward -> (terms, info)
    engine.gathered()          # context: weights read outside their module held whole (ZeRO-3)
    engine.backward(terms)     # once per micro-batch; None when a term is non-finite
    engine.step()              # once per optimizer step -> StepOutcome (then zero_grad)
    engine.zero_grad()
    engine.save_state(dir) -> dict / engine.load_state(dir, dict)   # a mid-stage checkpoint
    engine.save_pretrained(dir, tokenizer, ...)   engine.save_heads(path)

:class:`SingleDeviceEngine` is the engine for one device (CPU or one GPU): gradient
accumulation (micro-batch gradients add up until ``step``), gradient balancing between the
terms (``training.balancing``), clipping, the fp16 loss scaler, and the non-finite policy: a
step with a non-finite loss term or gradient norm is skipped (no update, the schedule does not
advance) and counted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qwen_distillation.errors import CheckpointError
from qwen_distillation.training import checkpoint as ckpt
from qwen_distillation.training.balancing import Balancer


# The option that runs each engine (the ``kind`` a checkpoint records), for the error that names it.
ENGINE_OPTIONS = {"single-device": "distributed=none", "fsdp2": "distributed=fsdp2",
                  "deepspeed-zero1": "--deepspeed with a JSON of ZeRO stage 1", "deepspeed-zero2": "distributed=zero2",
                  "deepspeed-zero3": "distributed=zero3 (or zero3_offload)"}


def other_engine(kind: str, this_kind: str) -> CheckpointError:
    """The error for a training checkpoint written by another engine (``kind``) than this run's: it
    names the option that resumes it (the run's config.yaml already holds this run's options)."""
    option = ENGINE_OPTIONS.get(kind, "the distributed option it was written with")
    return CheckpointError(f"it was written by a run on another engine ({kind}, this run: {this_kind}); resume it "
                           f"with {option} (and the same launch), or delete it to restart the stage")


@dataclass
class StepOutcome:
    """What one optimizer step did.

    lr: the learning rate the step ran at (before the scheduler advanced).
    grad_norm: the gradient norm before clipping; NaN when a loss term was non-finite.
    skipped: no update was made (a non-finite loss term or gradient norm).
    bad_in_row, bad_total: skipped steps in a row up to this one, and in the stage so far.
    nonfinite: what was non-finite, e.g. ``loss/kd=inf`` or ``grad_norm=nan``; "" if nothing.
    """

    lr: float
    grad_norm: float
    skipped: bool
    bad_in_row: int
    bad_total: int
    nonfinite: str = ""


def nonfinite_terms(terms: dict[str, torch.Tensor]) -> str:
    """What is non-finite among a micro-batch's loss terms (``loss/kd=inf, ...``), "" if nothing;
    the terms are checked together, one read of the device for all of them."""
    values = [value.detach().float() for value in terms.values()]
    if not values or bool(torch.isfinite(torch.stack(values)).all()):
        return ""
    return ", ".join(f"loss/{name}={float(value.detach())}" for name, value in terms.items()
                     if not torch.isfinite(value))


def weighted_loss(terms: dict[str, torch.Tensor], weights: dict[str, float],
                  world_size: int) -> tuple[torch.Tensor, str]:
    """The loss an engine over ``world_size`` ranks backpropagates for one micro-batch: the
    weighted sum of this rank's share of the terms, times the world size (the engines average
    gradients over the ranks); and what was non-finite (``loss/kd=inf``), "" if nothing. A
    non-finite term poisons the loss with NaN, so the gradient norm of the whole step is NaN on
    every rank and every rank skips the step."""
    bad = nonfinite_terms(terms)
    loss = sum(weights[name] * value for name, value in terms.items()) * world_size
    if bad:
        loss = loss * float("nan")
    return loss, bad


class ConsolidatedExports:
    """``save_pretrained`` and ``save_heads`` of an engine over several ranks: every rank takes
    part in gathering the weights (``_full_state``), rank 0 writes them, the others wait."""

    def _full_state(self, prefix: str) -> dict[str, torch.Tensor] | None:
        """The whole weights under ``prefix`` (``student.``, ``heads.``) on rank 0, None on the others."""
        raise NotImplementedError

    def save_pretrained(self, target: Path, tokenizer, *, base_model_dir: str | None = None,
                        merge: bool = False) -> None:
        """Export the student, consolidated, as a Hugging Face directory (rank 0 writes it)."""
        from qwen_distillation.training.distributed import barrier

        state = self._full_state("student.")
        if self.topo.is_main:
            ckpt.export_model(self.module.student, tokenizer, target, base_model_dir=base_model_dir, merge=merge,
                              state_dict=state)
        barrier(self.topo)

    def save_heads(self, path: Path) -> None:
        from qwen_distillation.training.distributed import barrier

        state = self._full_state("heads.")
        if self.topo.is_main:
            ckpt.save_state_dict(path, state)
        barrier(self.topo)


class SingleDeviceEngine:
    """Optimises ``module``'s trainable parameters on one device.

    Args:
        module: the trainable module (``training.module.DistillationModule``: ``.student`` and
            ``.heads``), whose state the engine saves and restores.
        optimizer, scheduler: built over the module's trainable parameters (``training.optim``);
            the optimizer's parameters are the ones the engine backpropagates into and clips.
        balancer: turns a micro-batch's loss terms into gradients (``none``: the weighted sum).
        shared: GradNorm's shared parameters (``training.plan.shared_parameter``).
        precision: ``fp16`` adds a loss scaler for the module's device; others need none.
        max_grad_norm: clip threshold; 0 disables clipping (the norm is still measured).
    """

    kind = "single-device"

    def __init__(self, module: nn.Module, *, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, balancer: Balancer,
                 shared: list[torch.Tensor] | None = None, precision: str = "fp32", max_grad_norm: float = 1.0):
        self.module = module
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.optimizer, self.scheduler, self.balancer, self.shared = optimizer, scheduler, balancer, shared
        device = self.params[0].device if self.params else torch.device("cpu")
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.max_grad_norm = max_grad_norm
        self.bad_in_row = 0
        self.bad_total = 0
        self._nonfinite = ""

    def forward(self, *args):
        return self.module(*args)

    def gathered(self):
        """Nothing to gather on one device."""
        return contextlib.nullcontext()

    def backward(self, terms: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """Add the gradient of one micro-batch's loss terms to the parameters' ``.grad``.

        ``terms`` are the micro-batch's share of the step's per-token means
        (``training.module.per_step_mean``), so the micro-batches of a step add up to the
        step's gradient however the step is split. Returns the balancer's values to log, or
        None when a term is non-finite: nothing is added, the step will be skipped, and the
        caller runs no further micro-batch of it.
        """
        bad = nonfinite_terms(terms)
        if bad:
            self._nonfinite = bad
            return None
        if self.scaler is not None:
            terms = {name: self.scaler.scale(value) for name, value in terms.items()}
        return self.balancer.backward(terms, self.params, shared=self.shared)

    def step(self) -> StepOutcome:
        """Clip and apply the accumulated gradient (or skip the step, see the module
        docstring), advance the schedule, and zero the gradients."""
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = float("nan")
        if not self._nonfinite:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, limit))
            if not math.isfinite(grad_norm):
                self._nonfinite = f"grad_norm={grad_norm}"
        skipped, nonfinite = bool(self._nonfinite), self._nonfinite
        if not skipped:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.bad_in_row = 0
        else:
            if self.scaler is not None and nonfinite.startswith("grad_norm"):
                # An fp16 overflow: the scaler backs off so the next step can run.
                self.scaler.update()
            self.bad_in_row += 1
            self.bad_total += 1
        self.zero_grad()
        return StepOutcome(lr=lr, grad_norm=grad_norm, skipped=skipped, bad_in_row=self.bad_in_row,
                           bad_total=self.bad_total, nonfinite=nonfinite)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite = ""

    def state_dict(self) -> dict:
        """Everything the engine needs to continue exactly: trainable weights, optimizer,
        schedule, loss scaler, balancer, and the skipped-step count."""
        return {"module": ckpt.trainable_state(self.module), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "balancer": self.balancer.state_dict(), "bad_total": self.bad_total}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.module.named_parameters())
        missing = [name for name in state["module"] if name not in params]
        if missing:
            raise CheckpointError(f"the checkpoint holds parameters the model lacks ({missing[:3]}); was it "
                                  f"written with another model, loss or LoRA setting?")
        with torch.no_grad():
            for name, value in state["module"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.balancer.load_state_dict(state["balancer"])
        self.bad_total = state["bad_total"]

    def save_state(self, directory: Path) -> dict:
        """A mid-stage checkpoint's engine state: all of it in the returned dict (``directory``,
        where an engine over several ranks writes its per-rank files, stays empty)."""
        return {"kind": self.kind, **self.state_dict()}

    def load_state(self, directory: Path, state: dict) -> None:
        kind = state.get("kind", self.kind)
        if kind != self.kind:
            raise other_engine(kind, self.kind)
        self.load_state_dict(state)

    def save_pretrained(self, target: Path, tokenizer, *, base_model_dir: str | None = None,
                        merge: bool = False) -> None:
        """Export the student as a Hugging Face directory (``checkpoint.export_model``)."""
        ckpt.export_model(self.module.student, tokenizer, target, base_model_dir=base_model_dir, merge=merge)

    def save_heads(self, path: Path) -> None:
        """The distillation heads beside a stage's model, for the stages after it."""
        ckpt.save_heads(path, self.module.heads)
