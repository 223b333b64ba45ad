"""Teacher/student vocabulary checks and the number of logit columns to distil over."""

from __future__ import annotations

from qwen_distillation.errors import ConfigError


def shared_vocab_size(teacher_tokenizer, student_tokenizer, teacher_columns: int, student_columns: int,
                      teacher_name: str, student_name: str) -> int:
    """Return how many leading logit columns teacher and student share.

    Logit distillation compares the two distributions column by column, so token id ``i``
    must mean the same string for both. Models often pad their lm_head beyond the
    tokenizer (Qwen2.5: 151,936 columns for 0.5B-3B, 152,064 for 7B and up, with 151,665
    real tokens); the padded columns are no tokens at all, so KD runs over the real
    tokens only, ``len(tokenizer)`` columns, and the padded columns are dropped on both sides.

    Raises ConfigError naming both models when the vocabularies differ.
    """
    check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_name, student_name)
    size = len(student_tokenizer)
    for who, name, columns in (("teacher", teacher_name, teacher_columns), ("student", student_name, student_columns)):
        if columns < size:
            raise ConfigError(f"the {who} ({name}) has {columns} logit columns but its tokenizer has {size} tokens; "
                              f"the model and tokenizer do not belong together")
    return size


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher_name: str, student_name: str) -> None:
    """Raise ConfigError naming both models when their tokenizers' vocabularies differ."""
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        only_teacher = sorted(set(teacher_vocab.items()) - set(student_vocab.items()), key=lambda kv: kv[1])[:3]
        only_student = sorted(set(student_vocab.items()) - set(teacher_vocab.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"the teacher ({teacher_name}, {len(teacher_vocab)} tokens) and the student ({student_name}, "
            f"{len(student_vocab)} tokens) use different tokenizers (e.g. teacher {only_teacher} vs student "
            f"{only_student}); logit distillation needs one shared vocabulary: pick a student of the "
            f"teacher's family (e.g. Qwen2.5-7B -> Qwen2.5-1.5B)")
