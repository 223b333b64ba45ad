"""Triton kernels with their ``torch.autograd.Function``s. Each has a pure-torch reference in
:mod:`qwen_distillation.losses` (the numbers it must reproduce) and a dispatcher there that
chooses between them; kernels know nothing of models, configs or the rest of the project."""
