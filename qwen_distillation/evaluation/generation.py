"""Sampling answers from a teacher in batches: plain transformers ``generate`` (left padding),
or vLLM when it is installed and the model is one it serves.

A backend is a function ``generate(prompts, rows, sampling) -> completions``: ``prompts`` are
token ids (chat template applied), ``rows`` one integer per prompt that, with
``sampling.seed``, fixes its draws (the source row), and the result holds
``sampling.num_samples`` :class:`Completion` per prompt, in prompt order.

Determinism: transformers draws a batch from one generator seeded by ``(seed, rows[0])``, so the
same batch of prompts gives the same samples (on the same hardware and library versions); vLLM
seeds every prompt by ``(seed, row)``, so a prompt's samples do not depend on its batch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from qwen_distillation.data.generated import Sampling
from qwen_distillation.errors import ConfigError, first_line
from qwen_distillation.evaluation.answers import sampling_config
from qwen_distillation.evaluation.prompting import model_device

log = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "transformers")


@dataclass(frozen=True)
class Completion:
    """One sampled answer: the new tokens decoded (special tokens skipped, whitespace stripped),
    and whether it ended with an eos token (``False``: cut at ``max_new_tokens``)."""

    text: str
    finished: bool


Generate = Callable[[list[list[int]], list[int], Sampling], list[list[Completion]]]


def draw_seed(seed: int, row: int) -> int:
    """A 31-bit seed for the draws of ``row`` under the run's ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (batch, longest prompt), prompts padded on the left
    so that every prompt's last token sits in the last column, where generation continues."""
    length = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, ids in enumerate(prompts):
        input_ids[b, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, length - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def transformers_generate(model: nn.Module, tokenizer) -> Generate:
    """The backend of a loaded causal LM: one ``model.generate`` call per batch,
    ``num_return_sequences=num_samples``, from the global RNG forked and seeded per batch
    (the caller's RNG state is left as it was)."""

    @torch.no_grad()
    def generate(prompts: list[list[int]], rows: list[int], sampling: Sampling) -> list[list[Completion]]:
        model.eval()
        device = model_device(model)
        config = sampling_config(model, tokenizer, sampling.max_new_tokens, temperature=sampling.temperature,
                                 top_p=sampling.top_p)
        config.num_return_sequences = sampling.num_samples
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        input_ids, attention_mask = left_padded(prompts, config.pad_token_id, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(draw_seed(sampling.seed, rows[0]))
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        new_tokens = output[:, input_ids.shape[1]:].tolist()
        completions = []
        for ids in new_tokens:
            # generate() pads finished sequences with pad_token_id, which may be eos itself.
            stop = next((t for t, token in enumerate(ids) if token in eos_ids), None)
            text = tokenizer.decode(ids[:stop], skip_special_tokens=True).strip()
            completions.append(Completion(text=text, finished=stop is not None))
        n = sampling.num_samples
        return [completions[b * n:(b + 1) * n] for b in range(len(prompts))]

    return generate


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_supports(path: str) -> tuple[bool, str]:
    """Whether vLLM serves the model at ``path`` (a model directory or hub id), and why not."""
    if not vllm_available():
        return False, "vLLM is not installed (pip install vllm)"
    if path.endswith(".gguf"):
        return False, "the teacher is a .gguf file, which this command loads only through transformers"
    if not torch.cuda.is_available():
        return False, "vLLM needs a GPU and none is visible"
    try:
        from transformers import AutoConfig
        from vllm import ModelRegistry

        architectures = AutoConfig.from_pretrained(path).architectures or []
        supported = set(ModelRegistry.get_supported_archs())
    except Exception as err:  # a model vLLM cannot read is one it does not serve
        return False, f"cannot read the model's architecture ({first_line(err)})"
    if not any(arch in supported for arch in architectures):
        return False, f"vLLM does not serve the architecture(s) {architectures}"
    return True, ""


def choose_backend(backend: str, path: str) -> str:
    """``vllm`` or ``transformers`` for ``--backend`` (auto: vLLM when it serves the model);
    an explicit ``vllm`` that cannot serve it is a ConfigError saying why."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: must be one of {', '.join(BACKENDS)}")
    if backend == "transformers":
        return backend
    ok, why = vllm_supports(path)
    if backend == "vllm" and not ok:
        raise ConfigError(f"--backend vllm: {why}; use `--backend transformers` (or auto, which falls back to it)")
    if not ok:
        log.info("generating with transformers: %s", why)
    return "vllm" if ok else "transformers"


def vllm_generate(path: str, *, dtype: str = "auto", seed: int = 0, **engine_args) -> Generate:
    """The vLLM backend for the model at ``path`` (its own tokenizer): one ``LLM.generate``
    call per batch, each prompt with its own seed (``draw_seed(seed, row)``)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        raise ConfigError(f"--backend vllm: cannot import vLLM ({first_line(err)}); install it (pip install vllm) "
                          "or use `--backend transformers`") from err
    llm = LLM(model=path, dtype=dtype, seed=seed, **engine_args)

    def generate(prompts: list[list[int]], rows: list[int], sampling: Sampling) -> list[list[Completion]]:
        params = [SamplingParams(n=sampling.num_samples, temperature=sampling.temperature,
                                 top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                                 max_tokens=sampling.max_new_tokens, seed=draw_seed(sampling.seed, row),
                                 skip_special_tokens=True)
                  for row in rows]
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [[Completion(text=sample.text.strip(), finished=sample.finish_reason == "stop")
                 for sample in output.outputs] for output in outputs]

    return generate
