"""An evaluation spread over the ranks of a launch: each rank computes every ``world_size``-th
item and the results are put together in item order on every rank, so every rank holds the same
numbers, equal to one process's (sums are taken in the same order)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Shard:
    """This rank's part of the evaluations.

    rank, world_size: this process's place in the launch (0 of 1: one process, nothing split).
    all_gather: every rank's object, in rank order (a collective the launch provides).
    synced: the models' weights are partitioned over the ranks (ZeRO-3), so a forward is a
        collective: every rank runs as many, and ``generate`` keeps the ranks in step
        (``synced_gpus``) until all have finished.
    """

    rank: int = 0
    world_size: int = 1
    all_gather: Callable[[object], list] | None = None
    synced: bool = False


ONE_PROCESS = Shard()


def map_shared(fn: Callable[[T], R], items: Sequence[T], shard: Shard | None = None) -> list[R]:
    """``[fn(item) for item in items]``, the items split over the ranks of ``shard``. Every rank
    makes the same number of calls (a rank short of one repeats its last item and drops the
    result: under ZeRO-3 a forward is a collective) and gets every result, in item order."""
    shard = shard or ONE_PROCESS
    if shard.world_size == 1:
        return [fn(item) for item in items]
    mine = list(range(shard.rank, len(items), shard.world_size))
    results: dict[int, R] = {}
    for call in range(math.ceil(len(items) / shard.world_size)):
        index = mine[min(call, len(mine) - 1)] if mine else 0
        value = fn(items[index])
        if call < len(mine):
            results[index] = value
    for part in shard.all_gather(results):
        results.update(part)
    return [results[index] for index in range(len(items))]
