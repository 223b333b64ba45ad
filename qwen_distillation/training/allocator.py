"""The CUDA caching allocator's settings for a run (``train.cuda_alloc_conf``).

PyTorch's caching allocator keeps freed blocks for reuse. ``expandable_segments:True`` makes it
reserve memory in segments that can later grow, which PyTorch documents for "cases where a job
changes allocation sizes frequently, such as having a changing batch size", as a packed step's
row of a new length every step does. The default is PyTorch's own allocator: an A/B on the
real-run workload (docs/performance.md, "Host time per step") did not show expandable segments
changing the step time once the Triton kernels were compiled.

The settings use ``PYTORCH_CUDA_ALLOC_CONF``'s syntax. A ``PYTORCH_CUDA_ALLOC_CONF`` in the
environment is the user's own choice and wins; otherwise the config's value is applied to this
process's allocator before the models load (each process of a launch applies its own). The
settings are the process's: a later run in the same process (a sweep's next job) that asks for
PyTorch's default (``null``) keeps the earlier run's, and its summary says so.
"""

from __future__ import annotations

import logging
import os

import torch

from qwen_distillation.errors import ConfigError, first_line

log = logging.getLogger(__name__)

ENV = "PYTORCH_CUDA_ALLOC_CONF"
KEY = "train.cuda_alloc_conf"


def _setter():
    """PyTorch's runtime setter of the allocator settings (the same parser as the environment
    variable's; it takes effect for the segments reserved after it)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    return setter if setter is not None else torch.cuda.memory._set_allocator_settings


_applied: str | None = None  # what this process's allocator was last given here


def set_cuda_allocator(conf: str | None) -> str | None:
    """Apply ``conf`` (``train.cuda_alloc_conf``) to the CUDA caching allocator unless the
    environment sets ``PYTORCH_CUDA_ALLOC_CONF``. Returns the settings in force (the environment's,
    ``conf``, an earlier run's in this process, or ``None`` for PyTorch's default), for the summary."""
    global _applied
    own = os.environ.get(ENV)
    if own is not None:
        if conf is not None and own != conf:
            log.info("%s=%s is not applied: %s=%s in the environment wins", KEY, conf, ENV, own)
        return own
    if conf is None:
        if _applied is not None:
            log.info("%s=null: this process's allocator keeps the settings an earlier run gave it (%s)", KEY, _applied)
        return _applied
    try:
        _setter()(conf)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{KEY}={conf}: PyTorch refused it ({first_line(err)}); use PYTORCH_CUDA_ALLOC_CONF's "
                          f"option:value pairs, e.g. `{KEY}=expandable_segments:True`, or `{KEY}=null`") from err
    _applied = conf
    return conf
