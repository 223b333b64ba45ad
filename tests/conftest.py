"""Shared helpers: compose the project's Hydra config and a tiny, fast run on the CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter; the flag is read when triton is
# imported, so it is set here, before any test module imports the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qwen_distillation.app import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def compose_config(overrides: list[str]):
    """The config that `python run_distillation.py OVERRIDES` would run with."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def tiny_overrides(output_dir, *, steps: int = 2, evaluation: bool = False) -> list[str]:
    """Tiny random Qwen2 pair (real Qwen tokenizer) on the demo set, a few steps a stage.

    ``evaluation=False`` turns off the demo preset's agreement, MCQ and quality samples
    (held-out NLL stays): they would add about 10 s to every tiny run."""
    out = [
        "model=tiny_qwen2", "data=demo", f"output_dir={output_dir}", "data.max_length=96",
        "data.max_eval_examples=4", "logging.progress_bar=false", "logging.tensorboard=false",
    ]
    if not evaluation:
        out += ["eval.agreement=false", "eval.mcq=[]", "eval.samples=false"]
    for stage in ("stage1", "stage2", "stage3"):
        out += [f"{stage}.max_steps={steps}", f"{stage}.batch_size=2", f"{stage}.grad_accum=2", f"{stage}.lr=1e-3"]
    return out


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(output_dir) -> list[dict]:
    return [row for row in read_metrics(output_dir) if "loss" in row]


@pytest.fixture(autouse=True)
def _few_threads():
    """Two threads keep the CPU tests fast and repeatable on small machines."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors: intra-op threads only add contention (3-5x slower on a
    busy machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
