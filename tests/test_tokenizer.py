"""The offline Qwen2.5 tokenizer matches tiktoken on the same ranks, ids and chat template."""

import json
from pathlib import Path

import pytest
import tiktoken
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qwen_distillation.modeling.tokenizer import (
    QWEN2_PRETOKENIZE_REGEX,
    QWEN25_ADDED_TOKENS,
    build_qwen_tokenizer,
    load_tokenizer,
    qwen_ranks_path,
    read_tiktoken_ranks,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

MIXED_TEXT = (
    "Hello, 世界! 高血压患者应该如何控制血压？每天服用5mg氨氯地平。\n"
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # 半径 r\n\n\n"
    "I'm sure they'LL say it's 1,234,567.89 dollars   (approx.)\t\tend\r\n"
    "Emoji 😀👍🏽 naïve café — «quotes» ١٢٣ Ⅻ"
)


@pytest.fixture(scope="module")
def encoding():
    return tiktoken.Encoding(
        "qwen2.5-reference",
        pat_str=QWEN2_PRETOKENIZE_REGEX,
        mergeable_ranks=read_tiktoken_ranks(qwen_ranks_path()),
        special_tokens={},
    )


def test_ids_match_tiktoken_on_mixed_text(tokenizer, encoding):
    expected = encoding.encode(MIXED_TEXT)
    assert tokenizer(MIXED_TEXT, add_special_tokens=False)["input_ids"] == expected
    assert tokenizer.decode(expected) == MIXED_TEXT


def test_ids_match_tiktoken_on_real_records(tokenizer, encoding):
    files = ["general/alpaca_zh_demo.jsonl", "medical_sft/medicalgpt_medical_sft_zh_1k.jsonl"]
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    texts = []
    for name in files:
        with open(DATA / name, encoding="utf-8") as handle:
            texts += [line for _, line in zip(range(40), handle)]
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert ours == encoding.encode_batch(texts)


def test_added_tokens_have_qwen25_ids(tokenizer):
    assert len(tokenizer) == 151665
    for offset, (content, _) in enumerate(QWEN25_ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(content) == 151643 + offset
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tokenizer.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.padding_side == "right"
    # Special tokens inside text are single ids, not split into characters.
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 151644 and ids[-1] == 151645 and len(ids) == 5


def test_chat_template_renders_qwen25(tokenizer):
    messages = [{"role": "user", "content": "你好"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    text = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    )


def test_build_is_memoised(tokenizer):
    assert build_qwen_tokenizer() is tokenizer
    assert load_tokenizer("qwen-tokenizer") is tokenizer


def test_load_tokenizer_falls_back_to_eos_for_padding(tmp_path):
    vocab = {"</s>": 0, "a": 1, "b": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", padding_side="left"
    ).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()).get("pad_token") is None

    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == 0
    assert loaded.padding_side == "right"
