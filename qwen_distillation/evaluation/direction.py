"""Which way is better for a logged evaluation metric, and whether a value improves on the best.

One rule for the whole project (``stageN.best_mode: auto``, the run report's and the final
printout's "better" column): a metric whose last word (after its last ``_``) contains
``accuracy``, ``agreement``, ``overlap``, ``bleu`` or ``rouge`` (``eval/mcq/<set>_accuracy``,
``eval/<set>_top1_agreement``, ``eval/<set>_topk_overlap``, ``eval/<set>_bleu4``,
``eval/<set>_rougeL``, ...) is better when higher; every other metric (``eval/<set>_nll``,
``eval/<set>_ppl``, ``eval/<set>_kl_to_teacher``) is better when lower. Only the last word counts:
the set's name (a ``data.eval`` file's stem, ``consent_agreement``) may hold any of these words.
"""

from __future__ import annotations

import math

HIGHER_IS_BETTER = ("accuracy", "agreement", "overlap", "bleu", "rouge")


def higher_is_better(metric: str) -> bool:
    """Whether larger values of ``metric`` are better (the naming rule above)."""
    last = metric.rsplit("/", 1)[-1].rsplit("_", 1)[-1]
    return any(word in last for word in HIGHER_IS_BETTER)


def best_direction(metric: str, mode: str = "auto") -> str:
    """``"max"`` or ``"min"``: ``mode`` itself unless it is ``auto``, which follows
    :func:`higher_is_better`."""
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"best mode must be auto, min or max, got {mode!r}")
    if mode != "auto":
        return mode
    return "max" if higher_is_better(metric) else "min"


def improves(value: float, best: float | None, direction: str) -> bool:
    """Whether ``value`` replaces ``best`` (``None``: nothing recorded yet). A non-finite
    value (an evaluation that produced NaN) never replaces a finite best, and any finite
    value replaces a non-finite one; ties keep the earlier best."""
    if best is None:
        return True
    if not math.isfinite(value):
        return False
    if not math.isfinite(best):
        return True
    return value > best if direction == "max" else value < best
