"""The Qwen2.5 shapes the benchmarks build (random weights: speed and memory do not depend on them):
``Qwen2Config`` keyword arguments of 0.5B, 1.5B, 7B (their config.json) and 72B, the teacher/student
pairs the step and run benchmarks time, and :func:`save_random_pair`, which writes such a pair."""

from __future__ import annotations

from pathlib import Path

QWEN = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "72b": dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}

# teacher -> student, as the step and run benchmarks name them
PAIRS = {"1.5b-0.5b": ("1.5b", "0.5b"), "7b-1.5b": ("7b", "1.5b")}


def save_random_pair(models: Path, shapes: tuple[dict, dict], tokenizer) -> None:
    """A random-init teacher (bf16) and student (fp32) of ``shapes`` (``Qwen2Config`` keyword
    arguments, teacher first), built on the GPU when there is one and saved with ``tokenizer``
    under ``models/teacher`` and ``models/student``; a role already saved there is kept. Seeded."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    for role, shape, dtype in zip(("teacher", "student"), shapes, (torch.bfloat16, torch.float32)):
        target = models / role
        if (target / "config.json").exists():
            continue
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(Qwen2Config(**shape, max_position_embeddings=4096)).to(dtype)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        del model
