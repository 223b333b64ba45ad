"""The data manager: which examples each optimizer step of a stage is served.

Stage 1 serves general data, stage 3 medical data, and stage 2 a per-step mix whose
medical share follows a schedule (linear, cosine or step) from ``start`` to ``end``.
The share actually served is returned with every step so it can be logged.

All state is a few integers (per-pool epoch and cursor, the rounding carry) plus the
seed: each pool is reshuffled per epoch by a generator seeded with (seed, pool, epoch),
so a restored sampler continues with exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from qwen_distillation.data.encode import IGNORE_INDEX
from qwen_distillation.errors import CheckpointError, DataError


def medical_ratio_at(step: int, total_steps: int, schedule: str, start: float, end: float,
                     plateaus: int = 5) -> float:
    """Target medical share for optimizer step ``step`` (0-based) of ``total_steps``.

    linear/cosine go from ``start`` at the first step to ``end`` at the last one;
    step holds ``plateaus`` equal plateaus from start to end.
    """
    if schedule == "constant" or total_steps <= 1:
        return start
    progress = min(max(step / (total_steps - 1), 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return start + (end - start) * (1 - math.cos(math.pi * progress)) / 2
    if schedule == "step":
        if plateaus == 1:
            return start
        plateau = min(int(progress * plateaus), plateaus - 1)
        return start + (end - start) * plateau / (plateaus - 1)
    raise ValueError(f"unknown medical ratio schedule {schedule!r}")


def schedule_end(schedule: str, start: float, end: float, plateaus: int = 5) -> float:
    """The medical ratio a schedule from ``start`` to ``end`` reaches at its last step: ``start`` for a
    ``constant`` schedule or a ``step`` one of one plateau (their ``end`` is ignored, as
    :func:`medical_ratio_at` ignores it), else ``end``."""
    return start if schedule == "constant" or (schedule == "step" and plateaus == 1) else end


def stage_domains(schedule: str, start: float, end: float, plateaus: int = 5) -> tuple[str, ...]:
    """The domains a stage serves when its medical ratio goes from ``start`` to ``end``:
    general data while the ratio is below 1, medical data while it is above 0 (:func:`schedule_end`
    says where a schedule really ends)."""
    end = schedule_end(schedule, start, end, plateaus)
    return tuple(domain for domain, serves in (("general", min(start, end) < 1), ("medical", max(start, end) > 0))
                 if serves)


def check_stage_pools(stage: str, domains: tuple[str, ...], general: list, medical: list) -> None:
    """Refuse a stage that serves a domain (``stage_domains``) whose training data is empty."""
    if "general" in domains and not general:
        raise DataError(f"{stage} serves general data (medical_ratio below 1) but data.general is empty; "
                        f"pass --general_dataset or set {stage}.medical_ratio.start/end=1")
    if "medical" in domains and not medical:
        raise DataError(f"{stage} serves medical data (medical_ratio above 0) but data.medical is empty; "
                        f"pass --medical_dataset or set {stage}.medical_ratio.start/end=0")


def sampler_state_error(stage: str, what: str) -> CheckpointError:
    """A saved sampler state that does not fit this run's data: ``what`` differs, and the fix."""
    return CheckpointError(f"{stage}'s training checkpoint: {what}; resume with the data it was taken with, or "
                           f"delete OUTPUT_DIR/{stage}/checkpoint-* to restart {stage} from its beginning")


def check_sampler_state(state, keys: tuple[str, ...], stage: str, sampling: str) -> None:
    """``state`` must be a dict with ``keys``, the state of a ``sampling`` sampler."""
    missing = [key for key in keys if key not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise sampler_state_error(stage, f"its sampler state lacks {', '.join(missing)}; it is not the state of "
                                         f"{sampling} sampling")


@dataclass
class ServedStep:
    """What one optimizer step was served."""

    examples: list[dict]
    medical_ratio: float
    medical_ratio_target: float
    num_medical: int


class _Pool:
    """Endless, epoch-wise reshuffled iteration over one list of examples."""

    def __init__(self, name: str, examples: list[dict], seed: int):
        self.name, self.examples, self.seed = name, examples, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        rng = random.Random(f"{self.seed}/{self.name}/{self.epoch}")
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        return order

    def peek(self) -> dict:
        """The example :meth:`take` serves next, not consumed."""
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        return self.examples[self._order[self.cursor]]

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            out.append(self.peek())
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "size": len(self.examples)}

    def load_state_dict(self, state: dict, stage: str) -> None:
        check_sampler_state(state, ("epoch", "cursor", "size"), stage, "uniform")
        if state["size"] != len(self.examples):
            raise sampler_state_error(stage, f"the {self.name} data has {len(self.examples)} examples but the "
                                             f"checkpoint was taken with {state['size']}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation()


class StageSampler:
    """Serves the examples of each optimizer step of one stage.

    Args:
        general, medical: tokenized training examples of each domain.
        examples_per_step: micro-batch size x gradient accumulation.
        total_steps: optimizer steps of the stage (the schedule spans them).
        schedule, start, end, plateaus: the medical ratio schedule.
        seed: sampling seed; the same seed serves the same examples.
        stage: stage name, for error messages.
        tokens_per_step: a token budget per step (``stageN.tokens_per_step``) instead of
            ``examples_per_step`` examples: see :meth:`next_step`.

    The number of medical examples in a step is the target share times
    ``examples_per_step``, rounded with error diffusion (the rounding remainder carries
    to the next step), so the served share tracks the schedule on average even when a
    step holds only a few examples.
    """

    def __init__(self, general: list[dict], medical: list[dict], *, examples_per_step: int, total_steps: int,
                 schedule: str, start: float, end: float, plateaus: int, seed: int, stage: str,
                 tokens_per_step: int | None = None):
        if tokens_per_step is not None and tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1 or None, got {tokens_per_step}")
        self.examples_per_step, self.total_steps, self.tokens_per_step = examples_per_step, total_steps, tokens_per_step
        self.schedule, self.start, self.end, self.plateaus = schedule, start, end, plateaus
        self.seed, self.stage = seed, stage
        check_stage_pools(stage, stage_domains(schedule, start, end, plateaus), general, medical)
        self.general = _Pool("general", general, seed)
        self.medical = _Pool("medical", medical, seed)
        self.carry = 0.0
        self.step = 0

    def target(self, step: int) -> float:
        return medical_ratio_at(step, self.total_steps, self.schedule, self.start, self.end, self.plateaus)

    def next_step(self) -> ServedStep:
        """The examples of the next step.

        With ``tokens_per_step``, the step takes examples one at a time until the next one would
        bring the step's input tokens (``len(input_ids)`` summed) past the budget; it holds at
        least one example, so an example longer than the budget is a step of its own. Each
        example's domain follows the target share by the same error diffusion as a fixed-size
        step (the k-th example is medical when the rounded ``target * k + carry`` says one more
        medical example is due), so the served share tracks the schedule per step. An example
        that does not fit stays first in its pool for the next step: nothing is skipped.
        """
        if self.tokens_per_step is not None:
            return self._next_budget_step()
        target = self.target(self.step)
        wanted = target * self.examples_per_step + self.carry
        num_medical = min(max(int(math.floor(wanted + 0.5)), 0), self.examples_per_step)
        self.carry = wanted - num_medical
        examples = self.medical.take(num_medical) + self.general.take(self.examples_per_step - num_medical)
        # Mix the domains across the micro-batches of the step.
        random.Random(f"{self.seed}/mix/{self.step}").shuffle(examples)
        self.step += 1
        return ServedStep(examples, num_medical / self.examples_per_step, target, num_medical)

    def _next_budget_step(self) -> ServedStep:
        target = self.target(self.step)
        examples: list[dict] = []
        num_medical, tokens = 0, 0
        while True:
            due = int(math.floor(target * (len(examples) + 1) + self.carry + 0.5)) > num_medical
            pool = self.medical if due else self.general
            if not pool.examples:  # a domain the stage does not serve (its share rounds up at an end)
                pool = self.general if due else self.medical
            length = len(pool.peek()["input_ids"])
            if examples and tokens + length > self.tokens_per_step:
                break
            examples += pool.take(1)
            num_medical += pool is self.medical
            tokens += length
        self.carry += target * len(examples) - num_medical
        random.Random(f"{self.seed}/mix/{self.step}").shuffle(examples)
        self.step += 1
        return ServedStep(examples, num_medical / len(examples), target, num_medical)

    def state_dict(self) -> dict:
        return {"step": self.step, "carry": self.carry, "seed": self.seed,
                "general": self.general.state_dict(), "medical": self.medical.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (a :meth:`state_dict`) left off.

        Raises:
            CheckpointError: the state is not this sampler's, or a pool's size differs from the
                data's (the data changed since the checkpoint), naming it and the fix.
        """
        check_sampler_state(state, ("step", "carry", "seed", "general", "medical"), self.stage, "uniform")
        self.step, self.carry, self.seed = state["step"], state["carry"], state["seed"]
        self.general.seed = self.medical.seed = self.seed
        self.general.load_state_dict(state["general"], self.stage)
        self.medical.load_state_dict(state["medical"], self.stage)


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch.

    Returns input_ids (B, L) int64, attention_mask (B, L) int64 and labels (B, L) int64 with
    IGNORE_INDEX on prompt and padding positions, plus domain (B,) int64 (0 general,
    1 medical) and example_id (B,) int64 when every example carries them. Labels are not shifted: position t's
    label is the token at t, predicted from position t-1.
    """
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if all("domain" in e for e in examples):
        batch["domain"] = torch.tensor([e["domain"] for e in examples], dtype=torch.long)
    if all("example_id" in e for e in examples):  # a run reading a teacher cache numbers its examples
        batch["example_id"] = torch.tensor([e["example_id"] for e in examples], dtype=torch.long)
    return batch


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of at most ``capacity`` tokens (an example longer than that gets a row of its own):
    longest first, ties in the given order, each example into the first row it fits in, else a
    new row. Returns the indices into ``lengths`` of each row, in the order they were placed."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # sorted() is stable
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for r, total in enumerate(used):
            if total + lengths[i] <= capacity:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Which examples of a micro-batch share a row, no example split: :func:`first_fit_decreasing`
    with the row capacity (at most ``max_length``) that leaves the fewest padded positions once the
    rows are padded to the longest one. The capacities tried are ``max_length`` and, for every row
    count r, the longest example or total / r if larger; the longest example alone is the unpacked
    layout's bound, so packing never pads more than one example per row would. Deterministic: ties
    go to the larger capacity."""
    if not lengths:
        return []
    longest, total = max(lengths), sum(lengths)
    capacities = {max_length} | {min(max_length, max(longest, -(-total // r))) for r in range(1, len(lengths) + 1)}
    best, best_cost = [], None
    for capacity in sorted(capacities, reverse=True):
        rows = first_fit_decreasing(lengths, capacity)
        cost = len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        if best_cost is None or cost < best_cost:
            best, best_cost = rows, cost
    return best


# How a packed micro-batch lies (``train.pack_layout``): ``rows`` packs its examples into rows of at
# most data.max_length tokens, padded to the longest row; ``padding_free`` lays them all back to back
# in one row with no padding (TRL's ``padding_free``), for attention that reads cu_seq_lens.
PACK_LAYOUTS = ("rows", "padding_free")


def collate_packed(examples: list[dict], pad_token_id: int, max_length: int,
                   layout: str = "rows") -> dict[str, torch.Tensor]:
    """Pack a micro-batch: several examples per row (:func:`pack_rows`), right-padded to the longest
    row; with ``layout="padding_free"``, all of them in one row (R = 1, L = their tokens), no padding.

    Returns input_ids (R, L), labels (R, L), position_ids (R, L) and segments (R, L), all int64,
    cu_seq_lens (S + 1,) int32 and its host copy sequence_starts (S + 1,) int64, and no attention_mask:

    * ``position_ids`` restart at 0 at each example (and at the padding), which is how
      transformers 5 keeps attention inside each example (``masking_utils.find_packed_sequence_indices``
      for sdpa/eager/flex);
    * ``segments`` number the examples 0 .. N-1 in the order they lie in the rows (row by row,
      left to right), -1 on padding, for the loss terms taken per example;
    * ``cu_seq_lens`` are where the S sequences of the rows flattened one after the other start
      (every example, and each row's padding as one more), ending at R * L: flash attention and the
      varlen attention (``modeling.varlen``) read them instead of a mask (transformers finds packing
      from the position ids for flash attention only in a single row); ``sequence_starts`` holds the
      same values and stays on the host (:data:`HOST_KEYS`), where the attention's longest sequence
      and the attention term's key windows are read from it without waiting for the device;
    * each example's first label is IGNORE_INDEX, so no next-token target crosses an example
      boundary (the unpacked collate never reads a first label either);
    * domain and example_id are (N,) int64 per example in the segments' order, which is the order
      of their response positions under ``modeling.parts.position_mask`` (a cached teacher's rows
      are looked up in it).
    """
    if layout not in PACK_LAYOUTS:
        raise ValueError(f"layout must be one of {PACK_LAYOUTS}, got {layout!r}")
    lengths = [len(e["input_ids"]) for e in examples]
    rows = pack_rows(lengths, max_length) if layout == "rows" else [list(range(len(examples)))]
    length = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    segments = torch.full((len(rows), length), -1, dtype=torch.long)
    placed: list[dict] = []
    starts: list[int] = []  # where every sequence of the flattened rows starts, then where they end
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            example, n = examples[i], lengths[i]
            starts.append(r * length + start)
            input_ids[r, start:start + n] = torch.tensor(example["input_ids"])
            labels[r, start + 1:start + n] = torch.tensor(example["labels"][1:])
            position_ids[r, start:start + n] = torch.arange(n)
            segments[r, start:start + n] = len(placed)
            start += n
            placed.append(example)
        position_ids[r, start:] = torch.arange(length - start)  # the padding is a sequence of its own
        if start < length:
            starts.append(r * length + start)
    starts.append(len(rows) * length)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segments": segments,
             "cu_seq_lens": torch.tensor(starts, dtype=torch.int32), "sequence_starts": torch.tensor(starts)}
    if all("domain" in e for e in placed):
        batch["domain"] = torch.tensor([e["domain"] for e in placed], dtype=torch.long)
    if all("example_id" in e for e in placed):
        batch["example_id"] = torch.tensor([e["example_id"] for e in placed], dtype=torch.long)
    return batch


def micro_batches(examples: list[dict], batch_size: int) -> list[list[dict]]:
    return [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]


def token_micro_batches(examples: list[dict], max_tokens: int, row_length: int | None = None) -> list[list[dict]]:
    """Consecutive runs of ``examples`` of at most ``max_tokens`` input tokens each (an example
    longer than that alone), cut greedily in the given order. With ``row_length`` (packed
    micro-batches), a run also packs into at most ``max_tokens // row_length`` rows of
    ``row_length`` tokens (:func:`first_fit_decreasing`, the layout :func:`pack_rows` starts from), so
    its packed positions stay within ``max_tokens`` however the lengths fall."""
    max_rows = None if row_length is None else max(1, max_tokens // row_length)
    out: list[list[dict]] = []
    lengths: list[int] = []
    used = 0
    for example in examples:
        n = len(example["input_ids"])
        fits = bool(out) and used + n <= max_tokens
        # First fit leaves no two rows that could be merged, so it needs at most 2 * tokens / row + 1
        # rows: below that the rows are not counted.
        if fits and max_rows is not None and 2 * (used + n) / row_length + 1 > max_rows:
            fits = len(first_fit_decreasing(lengths + [n], row_length)) <= max_rows
        if not fits:
            out.append([])
            lengths, used = [], 0
        out[-1].append(example)
        lengths.append(n)
        used += n
    return out


# Batch keys read only by the host (a cached teacher looks its rows up by ``example_id``; a packed
# batch's attention reads its longest sequence from ``sequence_starts``): they stay there, since
# reading them back from a GPU would wait for it.
HOST_KEYS = ("example_id", "sequence_starts")


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``, but for :data:`HOST_KEYS`. To a GPU the tensors go from pinned host
    memory without blocking the host, so it can launch the next kernels while they are copied (the
    copy is ordered before them on the current stream)."""
    cuda = torch.device(device).type == "cuda"
    return {k: v if k in HOST_KEYS else v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)
            for k, v in batch.items()}


def length_grouped_batches(examples: list[dict], batch_size: int, pad_token_id: int,
                           device: torch.device | str = "cpu", *, pack_length: int | None = None,
                           by_tokens: bool = False, layout: str = "rows") -> list[dict[str, torch.Tensor]]:
    """Collated micro-batches of examples sorted by length (less padding), on ``device``.

    Sorting does not change a step's update or an evaluation's result: losses are sums
    over valid tokens, normalised over the whole step or set, not per micro-batch.
    With ``pack_length`` (``train.packing``), each micro-batch holds the same examples as
    without, packed into rows of at most ``pack_length`` tokens (:func:`collate_packed`): the
    step's micro-batches, tokens and per-micro-batch example sets are unchanged, only padding goes.
    With ``pack_length`` and ``by_tokens`` (a step of ``stageN.tokens_per_step``), micro-batches
    are cut by tokens instead: each holds at most ``pack_length * batch_size`` input tokens and
    fits ``batch_size`` rows of ``pack_length``, so its packed positions are at most those of
    ``batch_size`` full rows (:func:`pack_rows` may lay it out in more, shorter rows where that pads
    less), however many examples that is. With ``layout="padding_free"`` each micro-batch is one
    row of its examples back to back (:func:`collate_packed`): cut by tokens, a micro-batch then
    holds at most ``pack_length * batch_size`` tokens and positions alike.
    """
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))
    if pack_length is None:
        return [{k: v.to(device) for k, v in collate(mb, pad_token_id).items()}
                for mb in micro_batches(by_length, batch_size)]
    row_length = pack_length if layout == "rows" else None  # one row of no padding: its tokens are its positions
    groups = token_micro_batches(by_length, pack_length * batch_size, row_length) if by_tokens else \
        micro_batches(by_length, batch_size)
    return [to_device(collate_packed(mb, pad_token_id, pack_length, layout), device) for mb in groups]
