"""benchmarks/real_run.py's held-out metrics: the CE over the labelled tokens and the forward
KL(teacher || student) at the positions that predict them, each against a direct computation."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import REPO

spec = importlib.util.spec_from_file_location("real_run", REPO / "benchmarks" / "real_run.py")
rr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rr)


def _save(path, seed: int, vocab: int):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def test_heldout_metrics_are_the_labelled_tokens_ce_and_the_forward_kl_at_the_temperature(tmp_path):
    student = _save(tmp_path / "student", 0, 48)
    teacher = _save(tmp_path / "teacher", 1, 56)  # a wider vocabulary: the first 48 logits are compared
    examples = [{"input_ids": [3, 9, 4, 7, 11, 2], "labels": [-100, -100, 4, 7, -100, 2]},
                {"input_ids": [5, 6, 1], "labels": [-100, 6, 1]}]
    ce, kl, count = 0.0, 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"][1:])
            kept = labels != -100
            s = student(input_ids=ids).logits[0, :-1][kept]
            t = teacher(input_ids=ids).logits[0, :-1][kept][:, :48]
            ce += F.cross_entropy(s, labels[kept], reduction="sum").item()
            p_t = torch.softmax(t / 2.0, -1)
            kl += (p_t * (torch.log_softmax(t / 2.0, -1) - torch.log_softmax(s / 2.0, -1))).sum().item()
            count += int(kept.sum())
    assert count == 5
    got = rr.heldout_metrics(tmp_path / "student", examples, tmp_path / "teacher", temperature=2.0)
    assert abs(got["heldout_ce"] - ce / count) < 1e-5
    assert abs(got["heldout_kl"] - kl / count) < 1e-6 and got["heldout_kl"] > 1e-4
    # against itself the KL vanishes; without a teacher only the CE is reported
    assert abs(rr.heldout_metrics(tmp_path / "student", examples, tmp_path / "student")["heldout_kl"]) < 1e-6
    assert set(rr.heldout_metrics(tmp_path / "student", examples)) == {"heldout_ce"}
