"""Evaluation: teacher agreement, multiple-choice accuracy, BLEU/ROUGE and sample tables.

The modules know nothing of each other's internals; each takes models, a tokenizer and
data, and returns plain dicts of numbers (or rows of text).
"""

from qwen_distillation.evaluation.agreement import teacher_agreement
from qwen_distillation.evaluation.mcq import (
    MCQItem,
    accuracy_from_scores,
    mcq_accuracy,
    mcq_items,
    option_scores,
    predict,
)
from qwen_distillation.evaluation.samples import quality_samples, samples_markdown
from qwen_distillation.evaluation.text_metrics import (
    bleu4,
    corpus_scores,
    llamafactory_scores,
    rouge_l,
    rouge_n,
    segment,
    sentence_bleu,
    strip_think,
    word_scores,
)

__all__ = [
    "MCQItem",
    "accuracy_from_scores",
    "bleu4",
    "corpus_scores",
    "llamafactory_scores",
    "mcq_accuracy",
    "mcq_items",
    "option_scores",
    "predict",
    "quality_samples",
    "rouge_l",
    "rouge_n",
    "samples_markdown",
    "segment",
    "sentence_bleu",
    "strip_think",
    "teacher_agreement",
    "word_scores",
]
