"""Evaluation during training: held-out NLL, agreement with the teacher, multiple-choice
accuracy, BLEU-4 / ROUGE of greedy answers to held-out prompts, and the quality samples
written at the end of each stage.

:func:`build_evaluator` reads the ``eval`` config node once per run and loads what it names
(MCQ sets, prompts), so a bad file stops the run before any training. The Distiller then
calls :meth:`Evaluator.metrics` before training (teacher and initial student) and at every
evaluation of a stage, and :meth:`Evaluator.student_samples` at the end of each stage.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable

import torch

from qwen_distillation.config.schema import EvalConfig
from qwen_distillation.data.manager import length_grouped_batches
from qwen_distillation.errors import require
from qwen_distillation.evaluation.agreement import response_states, teacher_agreement
from qwen_distillation.evaluation.answers import (LLAMAFACTORY, TEXT_METRICS, heldout_references,
                                                  heldout_text_metrics)
from qwen_distillation.evaluation.mcq import MCQItem, MCQSource, load_mcq_sets, mcq_accuracy
from qwen_distillation.evaluation.nll import heldout_nll
from qwen_distillation.evaluation.samples import load_prompts, quality_samples, score_samples
from qwen_distillation.evaluation.sharding import Shard
from qwen_distillation.modeling.parts import supports_hidden_path
from qwen_distillation.paths import locate

log = logging.getLogger(__name__)

AGREEMENT_METRICS = ("top1_agreement", "topk_overlap", "kl_to_teacher")
EVAL_BATCH_SIZE = 8


class Evaluator:
    """The evaluations of one run, over prepared held-out batches, MCQ items and prompts.

    Args:
        teacher: the frozen teacher (None: no agreement and no teacher samples); a model that
            *is* the teacher gets no agreement metrics (they would be trivially perfect).
        heldout: set name -> collated batches (``length_grouped_batches``) on the device.
        vocab_size: logit columns shared by teacher and student (``len(tokenizer)``).
        agreement, agreement_top_k: teacher agreement on every held-out set, with k of
            ``topk_overlap``.
        mcq_sets: set name -> items, scored by answer-letter log-likelihood.
        text_sets: set name -> encoded held-out examples (``data.encode``) whose last assistant
            turn is the reference of BLEU-4 / ROUGE: the model answers each example's context
            greedily (chat template, ``max_new_tokens``). Empty: no text metrics.
        prompts: rows of a prompts file for the quality samples (empty: no samples).
        max_new_tokens: length limit of every greedy answer (text metrics and samples).
        autocast: returns the run's autocast context (fp32 runs get a disabled one).
        shard: in a launch of several ranks, every evaluation is split over them and put
            together on each (``evaluation.sharding``): all ranks call each method alike.
    """

    def __init__(self, *, teacher: torch.nn.Module | None, tokenizer, vocab_size: int, heldout: dict[str, list[dict]],
                 agreement: bool = False, agreement_top_k: int = 5, mcq_sets: dict[str, list[MCQItem]] | None = None,
                 text_sets: dict[str, list[dict]] | None = None, prompts: list[dict] | None = None,
                 max_new_tokens: int = 64,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 shard: Shard | None = None):
        if agreement and teacher is None:
            raise ValueError("agreement with the teacher needs a teacher")
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.heldout = heldout
        self.agreement = agreement
        self.agreement_top_k = agreement_top_k
        self.mcq_sets = mcq_sets or {}
        self.references = {name: heldout_references(examples, tokenizer)
                           for name, examples in (text_sets or {}).items()}
        self.prompts = prompts or []
        self.max_new_tokens = max_new_tokens
        self.autocast = autocast
        self.shard = shard
        self._teacher_states: dict[str, list[torch.Tensor] | None] = {}

    def _states(self, name: str) -> list[torch.Tensor] | None:
        """The teacher's final hidden states at the response positions of a held-out set, computed
        on first use and kept: the teacher is frozen, so later evaluations run only its lm_head.
        (H floats per response token; a teacher whose logits are not a plain projection of its
        states would need its full logits kept, so it is simply run again: None.)"""
        if name not in self._teacher_states:
            keep = supports_hidden_path(self.teacher)
            self._teacher_states[name] = [response_states(self.teacher.eval(), batch)
                                          for batch in self.heldout[name]] if keep else None
        return self._teacher_states[name]

    def metric_names(self) -> set[str]:
        """The keys :meth:`metrics` returns for a model that is not the teacher, known before any
        model runs (a run checks each stage's ``best_metric`` against them before it clears an
        old output directory)."""
        names = set()
        for name in self.heldout:
            names |= {f"eval/{name}_nll", f"eval/{name}_ppl"}
            if self.agreement:
                names |= {f"eval/{name}_{key}" for key in AGREEMENT_METRICS}
        for name in self.references:
            names |= {f"eval/{name}_{key}" for key in TEXT_METRICS}
            names |= {f"eval/{LLAMAFACTORY}{name}_{key}" for key in TEXT_METRICS}
        return names | {f"eval/mcq/{name}_accuracy" for name in self.mcq_sets}

    def metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """``eval/<set>_nll`` and ``eval/<set>_ppl`` for every held-out set; with agreement on
        (and ``model`` not the teacher) ``eval/<set>_top1_agreement``, ``eval/<set>_topk_overlap``,
        ``eval/<set>_kl_to_teacher``; with text sets, BLEU-4 and ROUGE-1/2/L of the model's greedy
        answers against the references, 0-100: ``eval/<set>_bleu4``, ``eval/<set>_rouge1``,
        ``eval/<set>_rouge2``, ``eval/<set>_rougeL`` (word level) and the same four as
        ``eval/llamafactory/<set>_bleu4`` ... (LLaMA-Factory's conventions, ``text_metrics``);
        ``eval/mcq/<name>_accuracy`` for every MCQ set.

        With agreement on, a student's NLL comes from the agreement pass (the same mean NLL per
        response token as ``heldout_nll``, equal to float rounding), so the student runs once."""
        out: dict[str, float] = {}
        was_training = model.training
        is_teacher = model is self.teacher
        with self.autocast():
            for name, batches in self.heldout.items():
                if self.agreement and not is_teacher:
                    agree = teacher_agreement(model, self.teacher, batches, self.vocab_size,
                                              topk=self.agreement_top_k, teacher_states=self._states(name),
                                              shard=self.shard)
                    nll = agree["nll"]
                else:
                    agree, nll = {}, heldout_nll(model, batches, self.vocab_size, shard=self.shard)["nll"]
                out[f"eval/{name}_nll"] = nll
                out[f"eval/{name}_ppl"] = math.exp(min(nll, 50.0))  # as heldout_nll caps it
                out.update({f"eval/{name}_{key}": agree[key] for key in AGREEMENT_METRICS if key in agree})
            for name, references in self.references.items():
                scores = heldout_text_metrics(model, self.tokenizer, references, self.max_new_tokens, self.shard)
                out.update({f"eval/{name}_{key}": scores[key] for key in TEXT_METRICS})
                out.update({f"eval/{LLAMAFACTORY}{name}_{key}": scores[LLAMAFACTORY + key] for key in TEXT_METRICS})
            for name, items in self.mcq_sets.items():
                accuracy = mcq_accuracy(model, self.tokenizer, items, vocab_size=self.vocab_size, shard=self.shard)
                out[f"eval/mcq/{name}_accuracy"] = accuracy["accuracy"]
        model.train(was_training)
        return out

    def _answers(self, name: str, model: torch.nn.Module) -> list[dict]:
        with self.autocast():
            return quality_samples({name: model}, self.tokenizer, self.prompts, max_new_tokens=self.max_new_tokens,
                                   shard=self.shard)

    def teacher_samples(self) -> list[dict]:
        """Rows ``{lang, domain, prompt, [reference,] teacher}``: the teacher's greedy answers
        (once per run)."""
        return self._answers("teacher", self.teacher)

    def student_samples(self, student: torch.nn.Module, teacher_rows: list[dict] | None) -> list[dict]:
        """The prompts with the teacher's answers from ``teacher_rows`` and the student's greedy
        answers, side by side (``teacher``, ``student``); rows whose prompt has a reference carry
        both answers' BLEU-4 and ROUGE in ``scores`` (``samples.score_samples``). Without
        ``teacher_rows`` (no teacher in the run) the student's answers alone."""
        rows = self._answers("student", student)
        if teacher_rows is None:
            return score_samples(rows, ["student"])
        rows = [{**{k: v for k, v in row.items() if k != "student"}, "teacher": teacher_row["teacher"],
                 "student": row["student"]} for row, teacher_row in zip(rows, teacher_rows, strict=True)]
        return score_samples(rows, ["teacher", "student"])

    def prompts_match(self, rows: list[dict] | None) -> bool:
        """Whether cached sample rows answer exactly the current prompts."""
        return bool(rows) and [row.get("prompt") for row in rows] == [p["prompt"] for p in self.prompts]


def heldout_batches(eval_sets: dict[str, list[dict]], pad_token_id: int,
                    device: torch.device) -> dict[str, list[dict]]:
    """Encoded held-out sets -> collated batches of EVAL_BATCH_SIZE on ``device``."""
    return {name: length_grouped_batches(examples, EVAL_BATCH_SIZE, pad_token_id, device)
            for name, examples in eval_sets.items()}


def build_evaluator(cfg: EvalConfig, *, mcq_sources: list[MCQSource], teacher: torch.nn.Module | None, tokenizer,
                    vocab_size: int, eval_sets: dict[str, list[dict]], pad_token_id: int, device: torch.device,
                    autocast: Callable[[], contextlib.AbstractContextManager], shard: Shard | None = None) -> Evaluator:
    """The run's :class:`Evaluator` from the ``eval`` node (its MCQ entries already parsed by
    ``normalise_mcq_sources``) and the encoded held-out sets."""
    heldout = heldout_batches(eval_sets, pad_token_id, device)
    agreement = cfg.agreement and teacher is not None
    if cfg.agreement and teacher is None:
        log.info("eval.agreement: no agreement with the teacher during this run (its teacher is not loaded: every "
                 "stage reads the teacher's cache); python -m qwen_distillation.evaluate --teacher gives it for the "
                 "saved stages")
    # Known once the tokenizer is: refused here, before a run clears an old output_dir, not at the first evaluation.
    require(not agreement or cfg.agreement_top_k <= vocab_size, "eval.agreement_top_k", cfg.agreement_top_k,
            f"topk_overlap compares the top k of the {vocab_size} tokens both models share, so k must be at most "
            f"{vocab_size}", "eval.agreement_top_k=5")
    mcq_sets = load_mcq_sets(mcq_sources, cfg.mcq_max_items)
    log.info("evaluation sets: %s", ", ".join([f"{name} {len(examples)} examples" for name, examples in
                                               eval_sets.items()] + [f"{name} {len(items)} MCQ items" for name, items
                                                                     in mcq_sets.items()]) or "none")
    prompts = load_prompts(locate(cfg.prompts), cfg.samples_max_prompts) if cfg.samples else []
    # The first examples of each set, in the order of the held-out split (not the batches').
    text_sets = ({name: examples[:cfg.text_metrics_max_examples] for name, examples in eval_sets.items()}
                 if cfg.text_metrics else {})
    return Evaluator(teacher=teacher, tokenizer=tokenizer, vocab_size=vocab_size, heldout=heldout,
                     agreement=agreement, agreement_top_k=cfg.agreement_top_k, mcq_sets=mcq_sets,
                     text_sets=text_sets, prompts=prompts, max_new_tokens=cfg.max_new_tokens, autocast=autocast,
                     shard=shard)
