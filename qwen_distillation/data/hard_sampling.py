"""Evaluation-driven sampling for stage 3: serve the examples the student finds hard more often.

Every ``rescore_every`` optimizer steps the trainer runs a scoring pass (the student's
current per-example loss on the examples ``score_indices`` picks) and feeds the scores back
through ``update_scores``. Examples never scored count with the mean of the scored ones.
Each step then draws ``examples_per_step`` distinct examples (or examples up to a token budget,
``tokens_per_step``) from

    p_i = uniform_floor / N + (1 - uniform_floor) * softmax(score / temperature)_i

so every example keeps at least ``uniform_floor / N``: nothing starves, and a stale low
score is eventually revisited.

Like ``StageSampler``, the randomness of step ``t`` comes from a generator seeded with
(seed, t), so the state is the step counter, the scores and a few counters, all plain
ints and floats: a restored sampler serves exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import random

import torch

from qwen_distillation.data.manager import ServedStep, check_sampler_state, sampler_state_error
from qwen_distillation.errors import DataError


def _derived_seed(*parts) -> int:
    return random.Random("/".join(str(p) for p in parts)).getrandbits(63)


def score_indices(num_examples: int, max_scored: int | None, step: int, seed: int) -> list[int]:
    """The examples a scoring pass at optimizer step ``step`` covers, ascending.

    All of them when ``max_scored`` is None or at least ``num_examples``; otherwise a
    random subset of ``max_scored``, the same for the same (seed, step).
    """
    if max_scored is None or max_scored >= num_examples:
        return list(range(num_examples))
    if max_scored < 0:
        raise ValueError(f"max_scored must be >= 0 or None, got {max_scored}")
    return sorted(random.Random(f"{seed}/score/{step}").sample(range(num_examples), max_scored))


class HardExampleSampler:
    """Serves the (medical) examples of each optimizer step of stage 3, favouring hard ones.

    Args:
        examples: tokenized training examples.
        examples_per_step: micro-batch size x gradient accumulation.
        seed: sampling seed; the same seed and scores serve the same examples.
        uniform_floor: share of the probability mass spread uniformly, in (0, 1];
            1 is plain uniform sampling.
        temperature: softmax temperature over the scores (> 0); lower is greedier.
        rescore_every: optimizer steps between scoring passes (``needs_scores``).
        tokens_per_step: a token budget per step (``stageN.tokens_per_step``) instead of
            ``examples_per_step`` examples.

    A step holds distinct examples; when ``examples_per_step`` exceeds the number of
    examples, it is served in rounds, each round without replacement. With ``tokens_per_step``,
    a round is an order of the pool drawn without replacement (favouring high scores; only as
    many as can fit the budget are drawn), and the step takes its examples in that order until
    the next one would bring its input tokens (``len(input_ids)`` summed) past the budget; at
    least one example, so an example longer than the budget is a step of its own.
    """

    def __init__(self, examples: list[dict], *, examples_per_step: int, seed: int, uniform_floor: float = 0.3,
                 temperature: float = 1.0, rescore_every: int = 50, domain: str = "medical",
                 stage: str = "stage3", tokens_per_step: int | None = None):
        if tokens_per_step is not None and tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1 or None, got {tokens_per_step}")
        self.tokens_per_step = tokens_per_step
        self._shortest = min((len(example["input_ids"]) for example in examples), default=1) \
            if tokens_per_step is not None else 1
        if not examples:
            raise DataError(f"{stage} hard-example sampling draws {domain} data but data.{domain} is empty; "
                            f"pass --{domain}_dataset")
        self.domain, self.stage = domain, stage
        if examples_per_step < 1:
            raise ValueError(f"examples_per_step must be >= 1, got {examples_per_step}")
        if not 0 < uniform_floor <= 1:
            raise ValueError(f"uniform_floor must be in (0, 1], got {uniform_floor}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if rescore_every < 1:
            raise ValueError(f"rescore_every must be >= 1, got {rescore_every}")
        self.examples, self.examples_per_step, self.seed = examples, examples_per_step, seed
        self.uniform_floor, self.temperature, self.rescore_every = uniform_floor, temperature, rescore_every
        self.step = 0
        self.scores: list[float | None] = [None] * len(examples)
        self.scored_step = -1  # step of the last update_scores; needs_scores is False after it
        self.served, self.served_hard = 0, 0  # since the last stats()
        self.last_indices: list[int] = []

    def filled_scores(self) -> torch.Tensor:
        """Scores (N,) float64, never-scored examples at the mean of the scored ones (0 if none)."""
        known = [s for s in self.scores if s is not None]
        mean = sum(known) / len(known) if known else 0.0
        return torch.tensor([mean if s is None else s for s in self.scores], dtype=torch.float64)

    def probabilities(self, filled: torch.Tensor | None = None) -> torch.Tensor:
        """Probability (N,) float64 of each example under the current scores."""
        filled = self.filled_scores() if filled is None else filled
        scaled = filled / self.temperature
        if not bool(torch.isfinite(scaled).all()):
            # A temperature so small that score / temperature overflows (stageN.sampling.temperature=1e-310):
            # the softmax of infinities is nan, and the draw failed with a traceback. Shifted by the top score
            # first, the same softmax (the greediest one: all its mass on the top scores) stays finite.
            scaled = (filled - filled.max()) / self.temperature
        hard = torch.softmax(scaled, dim=0)
        return self.uniform_floor / len(self.examples) + (1 - self.uniform_floor) * hard

    def needs_scores(self) -> bool:
        """Whether the trainer should run a scoring pass before serving this step:
        at step 0 and every ``rescore_every`` steps, until ``update_scores`` is called."""
        return self.step % self.rescore_every == 0 and self.scored_step != self.step

    def update_scores(self, indices: list[int], scores: list[float]) -> None:
        """Record the student's per-example loss (higher = harder) of examples ``indices``."""
        if len(indices) != len(scores):
            raise ValueError(f"got {len(indices)} indices but {len(scores)} scores")
        for index, score in zip(indices, scores):
            if not 0 <= index < len(self.examples):
                raise ValueError(f"example index {index} out of range for {len(self.examples)} examples")
            if not math.isfinite(score):
                raise ValueError(f"score of example {index} is {score}; the scoring pass must give finite losses")
            self.scores[index] = float(score)
        self.scored_step = self.step

    def next_step(self) -> ServedStep:
        filled = self.filled_scores()
        probs = self.probabilities(filled)
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, "hard", self.step))
        if self.tokens_per_step is not None:
            indices = self._within_budget(probs, generator)
        else:
            indices: list[int] = []
            while len(indices) < self.examples_per_step:
                take = min(self.examples_per_step - len(indices), len(self.examples))
                indices += torch.multinomial(probs, take, replacement=False, generator=generator).tolist()
        median = float(torch.quantile(filled, 0.5))
        self.served += len(indices)
        self.served_hard += int((filled[indices] > median).sum())
        self.last_indices = indices
        self.step += 1
        ratio = 1.0 if self.domain == "medical" else 0.0
        return ServedStep([self.examples[i] for i in indices], ratio, ratio,
                          len(indices) if self.domain == "medical" else 0)

    def _within_budget(self, probs: torch.Tensor, generator: torch.Generator) -> list[int]:
        """The examples of a ``tokens_per_step`` step: whole-pool rounds drawn by ``probs``, taken
        in order until the next would pass the budget (at least one)."""
        indices: list[int] = []
        tokens = 0
        # More than fit in the budget (every example holds at least the shortest one's tokens), so a
        # second round is drawn only when the budget outlasts the pool.
        draw = min(len(self.examples), self.tokens_per_step // max(self._shortest, 1) + 1)
        while True:
            for i in torch.multinomial(probs, draw, replacement=False, generator=generator).tolist():
                length = len(self.examples[i]["input_ids"])
                if indices and tokens + length > self.tokens_per_step:
                    return indices
                indices.append(i)
                tokens += length

    def stats(self) -> dict[str, float]:
        """Score summary and ``sampler/hard_share``: the share of the examples served since
        the last call whose score (when served) was above the median score; 0 if none served."""
        filled = self.filled_scores()
        p50, p90 = torch.quantile(filled, torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
        out = {"sampler/score_mean": float(filled.mean()), "sampler/score_p50": p50, "sampler/score_p90": p90,
               "sampler/score_max": float(filled.max()),
               "sampler/hard_share": self.served_hard / self.served if self.served else 0.0}
        self.served, self.served_hard = 0, 0
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "scores": list(self.scores), "scored_step": self.scored_step,
                "served": self.served, "served_hard": self.served_hard, "size": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (a :meth:`state_dict`) left off.

        Raises:
            CheckpointError: the state is not this sampler's, or was taken with another number of
                examples (the data changed since the checkpoint), naming it and the fix.
        """
        check_sampler_state(state, ("step", "seed", "scores", "scored_step", "served", "served_hard", "size"),
                            self.stage, "hard-example")
        if state["size"] != len(self.examples):
            raise sampler_state_error(self.stage, f"the {self.domain} data has {len(self.examples)} examples but "
                                                  f"the checkpoint was taken with {state['size']}")
        self.step, self.seed, self.scored_step = state["step"], state["seed"], state["scored_step"]
        self.scores = list(state["scores"])
        self.served, self.served_hard = state["served"], state["served_hard"]
