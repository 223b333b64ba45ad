"""Triton kernels with their ``torch.autograd.Function``s. Each has a pure-torch reference in
:mod:`qwen_distillation.losses` (the numbers it must reproduce) and a dispatcher there that
chooses between them; kernels know nothing of models, configs or the rest of the project."""

import os


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported): the
    kernels then run on CPU tensors (numpy), slowly, which lets the CPU test suite execute their code."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
