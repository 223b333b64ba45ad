"""Reference-based text metrics: BLEU-4 and ROUGE-1/2/L, in two conventions.

Every score is on a 0-100 scale. Two conventions are computed side by side because the
numbers of one cannot be compared with the numbers of the other:

**Ours (word level: ``bleu4``, ``rouge_n``, ``rouge_l``, ``word_scores``).**
Hypothesis and reference are segmented into words by ``segment``: when either text of the
pair contains Han characters both are cut by jieba (default mode, HMM on), whitespace tokens
dropped, punctuation tokens kept; otherwise both are split into ``\\w+`` runs (whitespace and
punctuation are separators). Tokens are lower-cased in both cases.

- BLEU-4: sentence BLEU with uniform weights (0.25 each) over 1..4-grams, clipped n-gram
  counts, brevity penalty ``exp(1 - r/c)`` when the hypothesis is not longer than the
  reference, and NLTK's ``SmoothingFunction().method3`` (NIST geometric smoothing: the k-th
  order whose clipped match count is 0 gets precision ``1 / (2**k * hyp_ngrams)``, where
  ``hyp_ngrams`` is ``max(1, number of hypothesis n-grams of that order)``). No unigram
  match, or an empty hypothesis, gives 0. Re-implemented here; ``nltk`` is not needed and
  gives the same value on the same tokens.
- ROUGE-N: F1 of *clipped n-gram counts* (a repeated n-gram counts as often as it occurs
  in both texts, as in Lin's ROUGE and Google's ``rouge-score``).
- ROUGE-L: F1 (beta = 1) of the longest common subsequence of the two token sequences.

**LLaMA-Factory's (``llamafactory_scores``).** A faithful re-implementation of
``llamafactory.train.sft.metric.ComputeSimilarity`` (the same code is in LLaMA-Factory's
``scripts/eval_bleu_rouge.py``), so our numbers sit next to numbers from papers and runs
that used it:

- BLEU-4 is on CHARACTERS, not words: ``sentence_bleu([list(reference)], list(hypothesis),
  smoothing_function=SmoothingFunction().method3)``. Every character counts, spaces and
  punctuation included, and English text is scored letter by letter, so this BLEU-4 is far
  higher than a word-level one (a Chinese character is roughly a word piece, which is why
  the convention exists).
- ROUGE-1/2/L come from ``rouge_chinese.Rouge().get_scores`` on the space-joined jieba
  tokens of each text. That package scores ROUGE-N on *sets* of distinct n-grams (a
  repeated n-gram counts once), computes ROUGE-L as the LCS of the whole token sequences
  (its sentence splitting only affects the token list, see ``_rouge_chinese_words``),
  keeps case and punctuation tokens, and adds 1e-8 to the F1 denominator. When either side
  has no token at all, all three ROUGE scores are 0 (LLaMA-Factory's guard).
- Each sentence score is ``round(f * 100, 4)``, as LLaMA-Factory logs them; the corpus value
  is the plain mean over sentences.

**Thinking.** ``corpus_scores`` removes ``<think>...</think>`` blocks (``strip_think``) from
hypothesis and reference before scoring, for both conventions. LLaMA-Factory's
``ComputeSimilarity`` scores the decoded text as it is, so its numbers on a reasoning model
include the reasoning; ours are the scores of the final answer only. The single-pair
functions (``bleu4``, ``llamafactory_scores``, ...) do not strip: call ``strip_think`` first
if the texts may hold reasoning.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"\w+")
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_THINK_CLOSE = "</think>"
_THINK_OPEN = "<think>"
METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def strip_think(text: str) -> str:
    """The answer part of a generation: ``<think>...</think>`` blocks removed, then

    - an orphan ``</think>`` (the template opened the block in the prompt, as Qwen3's does)
      drops everything before it;
    - an unterminated ``<think>`` (generation stopped while reasoning) drops everything
      after it.

    Leading and trailing whitespace is removed.
    """
    text = _THINK_BLOCK.sub("", text)
    if _THINK_CLOSE in text:
        text = text[text.rindex(_THINK_CLOSE) + len(_THINK_CLOSE):]
    if _THINK_OPEN in text:
        text = text[: text.index(_THINK_OPEN)]
    return text.strip()


def has_han(text: str) -> bool:
    """Whether ``text`` holds a Han (Chinese) character, i.e. needs word segmentation."""
    return _HAN.search(text) is not None


@lru_cache(maxsize=1)
def _jieba():
    import jieba  # Imported on first use: only the text metrics need it.

    # jieba announces building its prefix dictionary on the root handler at INFO level.
    jieba.setLogLevel(logging.CRITICAL)
    jieba.initialize()
    return jieba


def jieba_cut(text: str) -> list[str]:
    """``list(jieba.cut(text))``: jieba's default mode (accurate, HMM on), whitespace kept."""
    return list(_jieba().cut(text))


def segment(text: str, chinese: bool | None = None) -> list[str]:
    """Lower-cased word tokens of ``text``.

    Args:
        text: the text to split.
        chinese: cut with jieba (whitespace tokens dropped, punctuation tokens kept) when
            True, split into ``\\w+`` runs when False; None decides by ``has_han(text)``.
            The pair metrics pass one decision for both texts, so a Chinese reference and
            an English hypothesis are split the same way.
    """
    if chinese is None:
        chinese = has_han(text)
    if chinese:
        return [token.lower() for token in jieba_cut(text) if token.strip()]
    return _WORD.findall(text.lower())


def _pair_tokens(hypothesis: str, reference: str) -> tuple[list[str], list[str]]:
    chinese = has_han(hypothesis) or has_han(reference)
    return segment(hypothesis, chinese), segment(reference, chinese)


def _ngrams(tokens: Sequence, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(references: Sequence[Sequence], hypothesis: Sequence, max_order: int = 4) -> float:
    """NLTK's ``sentence_bleu(references, hypothesis, weights=(1/max_order,)*max_order,
    smoothing_function=SmoothingFunction().method3)`` on token sequences, in [0, 1].

    The brevity penalty uses the reference length closest to the hypothesis length (the
    shorter one on a tie), as NLTK does.
    """
    hyp_len = len(hypothesis)
    if hyp_len == 0 or not references:
        return 0.0
    log_precisions = []
    smoothing_k = 1  # mteval-v13a's k: the k-th zero-match order gets 1 / 2**k.
    for n in range(1, max_order + 1):
        counts = _ngrams(hypothesis, n)
        max_ref = Counter()
        for reference in references:
            max_ref |= _ngrams(reference, n)
        matches = sum(min(count, max_ref[gram]) for gram, count in counts.items())
        total = max(1, sum(counts.values()))
        if matches == 0:
            if n == 1:
                return 0.0
            precision = 1.0 / (2 ** smoothing_k * total)
            smoothing_k += 1
        else:
            precision = matches / total
        log_precisions.append(math.log(precision))
    ref_len = min((abs(len(r) - hyp_len), len(r)) for r in references)[1]
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(math.fsum(log_precisions) / max_order)


def bleu4(hypothesis: str, reference: str) -> float:
    """Word-level sentence BLEU-4 (method3 smoothing) on ``segment`` tokens, 0-100."""
    hyp, ref = _pair_tokens(hypothesis, reference)
    return 100.0 * sentence_bleu([ref], hyp)


def _f1(overlap: float, hyp_count: int, ref_count: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / hyp_count, overlap / ref_count
    return 2 * precision * recall / (precision + recall)


def _lcs_length(x: Sequence, y: Sequence) -> int:
    if len(x) < len(y):
        x, y = y, x
    previous = [0] * (len(y) + 1)  # One row at a time: O(len(y)) memory.
    for a in x:
        current = [0]
        for j, b in enumerate(y, start=1):
            current.append(previous[j - 1] + 1 if a == b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_n(hypothesis: str, reference: str, n: int) -> float:
    """ROUGE-N F1 on clipped n-gram counts of ``segment`` tokens, 0-100."""
    hyp, ref = (_ngrams(tokens, n) for tokens in _pair_tokens(hypothesis, reference))
    overlap = sum((hyp & ref).values())
    return 100.0 * _f1(overlap, sum(hyp.values()), sum(ref.values()))


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (LCS of the ``segment`` token sequences), 0-100."""
    hyp, ref = _pair_tokens(hypothesis, reference)
    return 100.0 * _f1(_lcs_length(hyp, ref), len(hyp), len(ref))


def word_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """Our word-level ``bleu-4``, ``rouge-1``, ``rouge-2``, ``rouge-l`` of one pair, 0-100."""
    return {"bleu-4": bleu4(hypothesis, reference), "rouge-1": rouge_n(hypothesis, reference, 1),
            "rouge-2": rouge_n(hypothesis, reference, 2), "rouge-l": rouge_l(hypothesis, reference)}


def _rouge_chinese_words(joined: str) -> list[str]:
    """The token list ``rouge_chinese.Rouge`` scores for a space-joined text: its ``cut_sent``
    sentence split, ``" ".join(s.split())`` per sentence, then ``s.split(" ")`` flattened
    (an all-blank sentence between two line breaks becomes one empty-string token there)."""
    para = re.sub(r"([。！？\?])([^”’])", r"\1\n\2", joined)
    para = re.sub(r"(\.{6})([^”’])", r"\1\n\2", para)
    para = re.sub(r"(\…{2})([^”’])", r"\1\n\2", para)
    para = re.sub(r"([。！？\?][”’])([^，。！？\?])", r"\1\n\2", para)
    sentences = [" ".join(s.split()) for s in para.rstrip().split("\n") if len(s) > 0]
    return [word for sentence in sentences for word in sentence.split(" ")]


def _rouge_chinese_f(overlap: int, hyp_count: int, ref_count: int) -> float:
    precision = overlap / hyp_count if hyp_count else 0.0
    recall = overlap / ref_count if ref_count else 0.0
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def llamafactory_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """LLaMA-Factory's ``ComputeSimilarity`` scores of one pair: ``rouge-1``, ``rouge-2``,
    ``rouge-l`` (rouge_chinese on jieba tokens) and ``bleu-4`` (character BLEU, method3),
    each ``round(100 * f, 4)``. See the module docstring for how they differ from ours."""
    hyp_tokens, ref_tokens = jieba_cut(hypothesis), jieba_cut(reference)
    hyp_joined, ref_joined = " ".join(hyp_tokens), " ".join(ref_tokens)
    scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    if hyp_joined.split() and ref_joined.split():
        hyp, ref = _rouge_chinese_words(hyp_joined), _rouge_chinese_words(ref_joined)
        for n in (1, 2):
            hyp_set, ref_set = set(_ngrams(hyp, n)), set(_ngrams(ref, n))
            scores[f"rouge-{n}"] = _rouge_chinese_f(len(hyp_set & ref_set), len(hyp_set), len(ref_set))
        scores["rouge-l"] = _rouge_chinese_f(_lcs_length(hyp, ref), len(hyp), len(ref))
    scores["bleu-4"] = sentence_bleu([list(reference)], list(hypothesis))
    return {name: round(value * 100, 4) for name, value in scores.items()}


def corpus_scores(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """Mean per-pair scores over ``(hypothesis, reference)`` pairs, thinking stripped first.

    Returns ``bleu-4``, ``rouge-1``, ``rouge-2``, ``rouge-l`` (ours, word level), the same four
    prefixed ``llamafactory/`` (LLaMA-Factory's conventions), all 0-100, and ``n`` (pairs).
    With no pairs every score is NaN.
    """
    totals: Counter = Counter()
    count = 0
    for hypothesis, reference in pairs:
        hypothesis, reference = strip_think(hypothesis), strip_think(reference)
        totals.update(word_scores(hypothesis, reference))
        totals.update({f"llamafactory/{name}": value
                       for name, value in llamafactory_scores(hypothesis, reference).items()})
        count += 1
    names = list(METRIC_NAMES) + [f"llamafactory/{name}" for name in METRIC_NAMES]
    result = {name: (totals[name] / count if count else float("nan")) for name in names}
    result["n"] = count
    return result
