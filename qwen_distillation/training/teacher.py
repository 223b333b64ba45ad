"""What the teacher computes for a micro-batch, produced in one place.

:class:`TeacherRunner` runs the frozen teacher (no gradients) over a collated batch and returns
what the stage's :class:`~qwen_distillation.training.plan.LossPlan` reads: its final hidden
states and lm_head weight (or its logits) and the layers the feature/attention terms match.
A run with a teacher cache or a sharded teacher replaces this one object; the trainable
module only ever sees a :class:`Launched` result.

On a CUDA device with ``concurrent`` (``train.teacher_stream``), the teacher's forward is
launched on a side stream before the student's forward is launched on the current one, so the
GPU fills the gaps while the host launches one model's kernels with the other's (7B -> 1.5B step
374.5 -> 358.9 ms on an H100, docs/performance.md); :meth:`Launched.result` makes the current
stream wait for the side stream, so everything after it reads finished teacher outputs. The
side stream first waits for the current one, so a block the teacher frees is reused by the
next teacher pass only after every kernel queued before that pass (the ones that read the
teacher's outputs included) has run. The arithmetic is unchanged.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

import torch
from torch import nn

from qwen_distillation.modeling.capture import CapturedForward, forward_captured
from qwen_distillation.modeling.fp8 import FP8Head
from qwen_distillation.modeling.parts import model_inputs
from qwen_distillation.training.plan import LossPlan

T = TypeVar("T")
_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


class Launched(Generic[T]):
    """A value whose computation may still be running on a side CUDA stream."""

    def __init__(self, value: T, stream: "torch.cuda.Stream | None" = None):
        self._value, self._stream = value, stream

    def result(self) -> T:
        """The value, once the current stream has been made to wait for its side stream."""
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
            self._stream = None
        return self._value


def launch(fn: Callable[[], T], *, concurrent: bool) -> Launched[T]:
    """``fn()``, queued on a side CUDA stream when ``concurrent`` (see the module docstring),
    else run here and now."""
    if not concurrent:
        return Launched(fn())
    main = torch.cuda.current_stream()
    side = _SIDE_STREAMS.get(main.device)
    if side is None:
        side = _SIDE_STREAMS[main.device] = torch.cuda.Stream(device=main.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        value = fn()
    return Launched(value, side)


class TeacherRunner:
    """Runs the frozen ``teacher`` for the terms of a plan.

    Args:
        teacher: the frozen teacher (``requires_grad_(False)``, eval mode), or None.
        concurrent: launch it on a side stream when the batch is on a CUDA device.
        fp8_head: on the hidden-state path, give the loss an FP8 copy of the teacher's lm_head
            (``model.teacher.fp8_head``; :class:`~qwen_distillation.modeling.fp8.FP8Head`, made once
            and kept while the weight is unchanged); ``fast_accum``: its GEMMs with ``use_fast_accum``.
    """

    def __init__(self, teacher: nn.Module | None, *, concurrent: bool = False, fp8_head: bool = False,
                 fast_accum: bool = False):
        self.teacher = teacher
        self.concurrent = concurrent
        self.fp8_head, self.fast_accum = fp8_head, fast_accum
        self._head: FP8Head | None = None

    def __call__(self, batch: dict[str, torch.Tensor], plan: LossPlan) -> Launched[CapturedForward] | None:
        """The teacher's pass over ``batch`` as ``plan`` needs it; None when no active term
        reads the teacher (or there is none)."""
        if self.teacher is None or not plan.needs_teacher:
            return None
        hidden_layers, qkv_layers = plan.captured_layers(side=1)

        def run() -> CapturedForward:
            with torch.no_grad():
                out = forward_captured(self.teacher, model_inputs(batch), hidden_path=plan.hidden_path,
                                       hidden_layers=hidden_layers, qkv_layers=qkv_layers,
                                       output_hidden_states=plan.active("contrastive"))
                if self.fp8_head and out.head_weight is not None:
                    self._head = out.head_fp8 = FP8Head.of(out.head_weight, self._head, self.fast_accum)
            return out

        return launch(run, concurrent=self.concurrent and batch["input_ids"].is_cuda)
