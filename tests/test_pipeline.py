"""End-to-end runs on tiny random Qwen2 models with the real Qwen tokenizer (CPU, fp32):
exported models load, accumulation is invariant, a killed run resumes exactly,
--start_stage 2 continues from a checkpoint, and LoRA adapters keep training."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import compose_config, kill_in_stages, tiny_overrides, train_rows
from qwen_distillation.app import run
from qwen_distillation.training.metrics import MetricsLogger


def _run(overrides: list[str]) -> dict:
    return run(compose_config(overrides))


def _weights(path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    out = {}
    for file in files:
        out.update(load_file(file))
    return out


def test_three_stages_write_loadable_models_and_metrics(tmp_path):
    out = tmp_path / "run"
    summary = _run(tiny_overrides(out, steps=2) + ["stage2.max_steps=6"])
    assert summary["stages"] == [1, 2, 3]
    assert summary["teacher_stream"] is False  # train.teacher_stream defaults to true; CUDA only
    assert summary["cuda_alloc_conf"] is None  # train.cuda_alloc_conf: CUDA only
    for stage in (1, 2, 3):
        for kind in ("best", "final"):
            model = AutoModelForCausalLM.from_pretrained(out / f"stage{stage}" / kind)
            assert model.config.num_hidden_layers == 2
            assert (out / f"stage{stage}" / kind / "tokenizer.json").exists()
    rows = train_rows(out)
    assert [(r["stage"], r["step"]) for r in rows] == [(1, 1), (1, 2)] + [(2, s) for s in range(1, 7)] + [
        (3, 1), (3, 2)]
    for row in rows:
        for key in ("loss", "loss/ce", "loss/kd", "lr", "medical_ratio", "tokens_per_s"):
            assert key in row
    assert all(r["medical_ratio"] == 0 for r in rows if r["stage"] == 1)
    assert all(r["medical_ratio"] == 1 for r in rows if r["stage"] == 3)
    stage2 = [r["medical_ratio"] for r in rows if r["stage"] == 2]
    assert stage2[0] <= 0.5 and stage2[-1] >= 0.5 and stage2[0] < stage2[-1]
    assert (out / "config.yaml").exists() and json.loads((out / "run_state.json").read_text())["finished"]
    # The run report: before/after table and readable plots.
    report = (out / "report.md").read_text()
    assert "eval/medical_nll" in report and "after stage 3" in report
    for plot in ("losses", "learning_rate", "medical_ratio", "eval"):
        png = out / "report" / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"report/{plot}.png" in report
    assert summary["report"] == str(out / "report.md")
    # What the run cost by phase, besides its training steps (also in summary.json).
    timings = json.loads((out / "summary.json").read_text())["timings"]
    assert timings == summary["timings"]
    assert set(timings["stages"]) == {"stage1", "stage2", "stage3"}
    assert all(times["train_s"] > 0 and times["eval_s"] > 0 and times["finish_s"] > 0
               for times in timings["stages"].values())
    phases = (timings["build_s"] + timings["initial_eval_s"] + timings["report_s"]
              + sum(sum(times.values()) for times in timings["stages"].values()))
    assert 0 < phases <= timings["total_s"] + 1e-3
    train = sum(times["train_s"] for times in timings["stages"].values())
    assert timings["fixed_s"] == pytest.approx(timings["total_s"] - train, abs=2e-3)


def test_gradient_accumulation_is_invariant(tmp_path):
    """Micro-batch 8 x accumulation 1 and 2 x 4 serve the same 8 examples per step and
    must give the same gradient (logged before clipping) and the same weights."""
    runs = {}
    for batch, accum in ((8, 1), (2, 4)):
        out = tmp_path / f"b{batch}a{accum}"
        _run(tiny_overrides(out, steps=2) + ["end_stage=1", f"stage1.batch_size={batch}",
                                             f"stage1.grad_accum={accum}"])
        runs[(batch, accum)] = (train_rows(out), _weights(out / "stage1" / "final"))
    (rows_a, weights_a), (rows_b, weights_b) = runs.values()
    for a, b in zip(rows_a, rows_b):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-4, atol=1e-6)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs."""


@pytest.mark.parametrize("background", [False, True], ids=["saves_in_step", "async_checkpoint"])
def test_killed_run_resumes_with_the_same_loss_trajectory(tmp_path, monkeypatch, background):
    """Killed in stage 2 (feature/attention/contrastive heads and GradNorm weights in
    flight) and again in stage 3 (hard-example sampler scores in flight), the same command
    resumes each time, and every logged number equals the uninterrupted run's; the same with the
    checkpoints written in the background (train.async_checkpoint)."""
    common = tiny_overrides(tmp_path / "x", steps=4) + [
        "stage2.save_every=2", "stage2.eval_every=2", "stage2.loss.balancing.method=gradnorm",
        "stage3.save_every=2", "stage3.sampling.mode=hard", "stage3.sampling.rescore_every=3",
        "stage3.sampling.max_scored=8", f"train.async_checkpoint={str(background).lower()}"]
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    _run(common + [f"output_dir={reference_dir}"])

    def saved(stage):
        assert (resumed_dir / f"stage{stage}" / "checkpoint-2" / "state.pt").exists()

    # The same command, killed in stage 2, again in stage 3, then run to the end.
    kill_in_stages(monkeypatch, lambda: _run(common + [f"output_dir={resumed_dir}"]), after_each=saved)

    reference, resumed = train_rows(reference_dir), train_rows(resumed_dir)
    assert [(r["stage"], r["step"]) for r in resumed] == [(r["stage"], r["step"]) for r in reference]
    logged = [k for k in reference[-1] if k.startswith(("loss", "weight/", "sampler/"))] + ["grad_norm"]
    assert "loss/feature" in reference[4] and "weight/feature" in reference[4] and "sampler/score_mean" in logged
    for a, b in zip(reference, resumed):
        for key in set(a) | set(b):
            if key.startswith(("loss", "weight/", "sampler/", "grad_norm", "medical_ratio", "global_step")):
                assert a.get(key) == b.get(key), (key, a, b)
    for name, value in _weights(reference_dir / "stage3" / "final").items():
        torch.testing.assert_close(value, _weights(resumed_dir / "stage3" / "final")[name], rtol=0, atol=0)
    torch.testing.assert_close(torch.load(reference_dir / "stage3" / "heads.pt"),
                               torch.load(resumed_dir / "stage3" / "heads.pt"), rtol=0, atol=0)
    assert not list((resumed_dir / "stage2").glob("*checkpoint*"))


def test_a_run_killed_after_a_background_save_resumes_from_it_with_the_same_losses(tmp_path, monkeypatch):
    """train.async_checkpoint=true: the kill after step 3 lets the background save of step 2 finish,
    the same command resumes from it, and every logged number and the final weights equal those of a
    run that saved in step and was never killed."""
    common = tiny_overrides(tmp_path / "x", steps=4) + ["end_stage=1", "stage1.save_every=2",
                                                         "train.save_every_minutes=0"]
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    _run(common + [f"output_dir={reference_dir}"])
    background = common + [f"output_dir={resumed_dir}", "train.async_checkpoint=true"]

    def saved(stage):
        assert [p.name for p in (resumed_dir / "stage1").iterdir() if "checkpoint" in p.name] == ["checkpoint-2"]

    kill_in_stages(monkeypatch, lambda: _run(background), stages=(1,), after_each=saved)
    reference, resumed = train_rows(reference_dir), train_rows(resumed_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [1, 2, 3, 4]
    for a, b in zip(reference, resumed):
        for key in a:
            if key.startswith(("loss", "grad_norm", "lr")) or key == "tokens":
                assert a[key] == b[key], (key, a, b)
    for name, value in _weights(reference_dir / "stage1" / "final").items():
        torch.testing.assert_close(value, _weights(resumed_dir / "stage1" / "final")[name], rtol=0, atol=0)
    assert not list((resumed_dir / "stage1").glob("*checkpoint*"))


def test_background_saves_are_refused_for_a_launch_over_several_processes():
    from qwen_distillation.cli import compose_run_config
    from qwen_distillation.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.async_checkpoint=True: .*distributed\.engine=deepspeed.*"
                                          r"`train\.async_checkpoint=false`"):
        compose_run_config(["distributed=zero2", "train.async_checkpoint=true"])


def test_finished_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(out, steps=1) + ["end_stage=1"]
    _run(overrides)
    before = (out / "stage1" / "final" / "model.safetensors").read_bytes()
    from qwen_distillation.errors import ConfigError

    with pytest.raises(ConfigError, match="holds a finished run.*overwrite_output_dir=true"):
        _run(overrides)
    assert (out / "stage1" / "final" / "model.safetensors").read_bytes() == before
    _run(overrides + ["overwrite_output_dir=true", "seed=3"])
    assert (out / "stage1" / "final" / "model.safetensors").read_bytes() != before


def test_start_stage_2_from_a_checkpoint(tmp_path, caplog):
    first, second = tmp_path / "first", tmp_path / "second"
    summary1 = _run(tiny_overrides(first, steps=2) + ["end_stage=1"])
    checkpoint = first / "stage1" / "final"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qwen_distillation"):
        # With the pruning options of a run that built its student from the teacher (the command of the first
        # run with the flags added): the checkpoint gives the student, and the log says they are not applied.
        summary2 = _run(tiny_overrides(second, steps=2) + ["start_stage=2", "end_stage=2",
                                                           f"checkpoint_path={checkpoint}",
                                                           "model.student.random_init=null",
                                                           "model.student.keep_layers=3"])
    # Stage 2's feature projections are new: the log says so (they are not read from first/stage1/heads.pt).
    assert f"heads start from random weights: checkpoint_path gives the student only ({checkpoint}" in caplog.text
    assert f"the student is checkpoint_path={checkpoint}, with the shape it was saved with: keep_layers not " \
        "applied" in caplog.text
    # The second run's student starts where the first one's stage 1 ended.
    assert summary2["student_before"] == pytest.approx(summary1["student_after_stage"]["1"])
    assert summary2["stages"] == [2]
    assert [r["stage"] for r in train_rows(second)] == [2, 2]
    assert AutoModelForCausalLM.from_pretrained(second / "stage2" / "final")


def test_the_summary_names_no_log_the_run_did_not_write_and_the_export_stops_at_eos(tmp_path):
    """summary.json named output_dir/metrics.jsonl and output_dir/tensorboard with logging.jsonl=false and
    logging.tensorboard=false, though neither existed."""
    out = tmp_path / "run"
    summary = _run(tiny_overrides(out, steps=1) + ["end_stage=1", "logging.jsonl=false"])
    assert not (out / "metrics.jsonl").exists() and not (out / "tensorboard").exists()
    assert summary["metrics"] is None and summary["tensorboard"] is None
    assert json.loads((out / "summary.json").read_text())["metrics"] is None
    # The random-init student's export stops where the run's answers stop: at the tokenizer's eos (it had none).
    from transformers import AutoTokenizer, GenerationConfig

    eos = AutoTokenizer.from_pretrained(out / "stage1" / "final").eos_token_id
    assert eos is not None and GenerationConfig.from_pretrained(out / "stage1" / "final").eos_token_id == eos


def test_lora_adapters_train_and_continue_across_stages(tmp_path):
    out = tmp_path / "lora"
    _run(tiny_overrides(out, steps=2) + ["end_stage=2", "lora.enabled=true", "lora.r=4",
                                         "lora.target_modules=[q_proj,v_proj]", "lora.merge_on_export=true"])
    stage1, stage2 = out / "stage1" / "final", out / "stage2" / "final"
    assert (stage1 / "adapter_config.json").exists() and (stage1 / "merged" / "config.json").exists()
    a1, a2 = _weights(stage1), _weights(stage2)
    assert a1 and all("lora_" in name for name in a1)
    assert any(not torch.equal(a1[n], a2[n]) for n in a1), "stage 2 did not train the adapters"
    # The adapter export loads as a causal LM (peft resolves the saved base) and so does the merge.
    assert AutoModelForCausalLM.from_pretrained(stage2)
    assert AutoModelForCausalLM.from_pretrained(stage1 / "merged")
    # A new run continuing from the stage-1 adapter keeps training it (its lora.* must be the adapter's).
    cont = tmp_path / "continued"
    _run(tiny_overrides(cont, steps=2) + ["start_stage=2", "end_stage=2", "lora.enabled=true", "lora.r=4",
                                          "lora.target_modules=[v_proj,q_proj]", f"checkpoint_path={stage1}"])
    a3 = _weights(cont / "stage2" / "final")
    assert set(a3) == set(a1) and any(not torch.equal(a1[n], a3[n]) for n in a1)


def test_a_lora_run_overwriting_a_lora_run_keeps_the_base_it_wrote(tmp_path):
    """Overwriting clears an old run's student_base/, but not the one this LoRA run wrote while it built
    its student: its adapters name that base, and the export must load."""
    out = tmp_path / "lora"
    lora = ["end_stage=1", "lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj,v_proj]"]
    _run(tiny_overrides(out, steps=1) + lora)
    _run(tiny_overrides(out, steps=1) + lora + ["overwrite_output_dir=true", "seed=3"])
    assert (out / "student_base" / "config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out / "stage1" / "final")


def test_a_lora_overwrite_refused_after_its_models_load_leaves_the_old_lora_run_as_it_was(tmp_path):
    """overwrite_output_dir=true promises the old run untouched when a refusal comes after the models load
    (here stage1.best_metric); a LoRA run had already written its new student_base over the old run's, so the
    old adapters loaded with plain transformers on another student's weights (and the package refused them)."""
    from conftest import snapshot
    from qwen_distillation.errors import ConfigError

    out = tmp_path / "lora"
    lora = ["end_stage=1", "lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj,v_proj]"]
    _run(tiny_overrides(out, steps=1) + lora)
    before = snapshot(out)
    with pytest.raises(ConfigError, match="stage1.best_metric=eval/nope_nll"):
        _run(tiny_overrides(out, steps=1) + lora + ["overwrite_output_dir=true", "seed=3",
                                                    "stage1.best_metric=eval/nope_nll"])
    assert snapshot(out) == before and not (out / ".student_base.tmp").exists()
    # The overwrite that goes through trains on the new base, in place of the old one.
    _run(tiny_overrides(out, steps=1) + lora + ["overwrite_output_dir=true", "seed=3"])
    assert snapshot(out)["student_base/model.safetensors"] != before["student_base/model.safetensors"]
    assert not (out / ".student_base.tmp").exists()
    assert AutoModelForCausalLM.from_pretrained(out / "stage1" / "final")
    assert json.loads((out / "stage1" / "final" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str((out / "student_base").resolve())


def _tensorboard_points(run_dir) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()  # applies the purge a resumed run's writer records
    return {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_each_step_once_after_a_resume(tmp_path, monkeypatch):
    """Killed at stage 3 step 4 (after the scoring pass for step 4, with the checkpoint at step
    2), the same command resumes; TensorBoard then shows every step once, as an uninterrupted run."""
    common = tiny_overrides(tmp_path / "x", steps=4) + [
        "start_stage=3", "logging.tensorboard=true", "stage3.save_every=2", "stage3.eval_every=2",
        "stage3.sampling.mode=hard", "stage3.sampling.rescore_every=3", "stage3.sampling.max_scored=8"]
    _run(common + [f"output_dir={tmp_path / 'reference'}"])
    original_log = MetricsLogger.log

    def dying_log(self, row, **kwargs):
        original_log(self, row, **kwargs)
        if row.get("stage") == 3 and row.get("step") == 4 and "loss" in row:
            raise _Killed()

    monkeypatch.setattr(MetricsLogger, "log", dying_log)
    with pytest.raises(_Killed):
        _run(common + [f"output_dir={tmp_path / 'resumed'}"])
    monkeypatch.setattr(MetricsLogger, "log", original_log)
    _run(common + [f"output_dir={tmp_path / 'resumed'}"])
    reference, resumed = _tensorboard_points(tmp_path / "reference"), _tensorboard_points(tmp_path / "resumed")
    assert reference["loss"] == [1, 2, 3, 4] and "eval/medical_nll" in reference
    assert resumed == reference


def test_tensorboard_holds_each_step_once_after_a_resume_of_stage_one_without_a_checkpoint(tmp_path):
    """A run killed in its first stage before the stage's first save restarts it from step 1 at global
    step 0; TensorBoard used to be purged only after a global step above 0, so it showed the killed
    run's steps twice."""
    def logger() -> MetricsLogger:
        from qwen_distillation.config.schema import WandbConfig

        return MetricsLogger(tmp_path, jsonl=True, tensorboard=True, wandb_cfg=WandbConfig(), run_config={})

    def steps(metrics: MetricsLogger, *global_steps: int) -> None:
        for step in global_steps:
            metrics.log({"stage": 1, "step": step, "global_step": step, "loss": 1.0 / step})

    killed = logger()
    killed.truncate(1, 0, 0)
    steps(killed, 1, 2)
    killed.close()  # the kill: no checkpoint was saved
    resumed = logger()
    resumed.truncate(1, 0, 0)
    steps(resumed, 1, 2, 3)
    resumed.close()
    assert _tensorboard_points(tmp_path)["loss"] == [1, 2, 3]
    assert [row["step"] for row in train_rows(tmp_path)] == [1, 2, 3]


def test_a_run_killed_while_writing_its_report_writes_it_when_run_again(tmp_path, monkeypatch):
    """Killed after its last stage, while its report was written: the run was already marked finished,
    so the same command was refused ("holds a finished run") and the run kept no report (or, killed a
    moment earlier, no summary.json). It is marked finished once both are written: the same command
    resumes it and writes them."""
    from qwen_distillation.evaluation import report

    out = tmp_path / "run"
    overrides = tiny_overrides(out, steps=1) + ["end_stage=1", "data.max_eval_examples=2", "data.max_length=64",
                                                "stage1.grad_accum=1"]

    def killed(*args, **kwargs):
        raise _Killed()

    monkeypatch.setattr(report, "write_report", killed)
    with pytest.raises(_Killed):
        _run(overrides)
    assert not json.loads((out / "run_state.json").read_text())["finished"]
    monkeypatch.undo()
    summary = _run(overrides)
    assert summary["report"] == str(out / "report.md") and (out / "report" / "losses.png").exists()
    assert json.loads((out / "summary.json").read_text())["report"] == str(out / "report.md")
    assert json.loads((out / "run_state.json").read_text())["finished"]
    assert [row["step"] for row in train_rows(out)] == [1]


def test_a_run_killed_before_it_removed_a_completed_stages_checkpoints_removes_them_when_run_again(tmp_path,
                                                                                                    monkeypatch):
    """Killed after stage 1 was recorded complete, before its mid-stage checkpoints were deleted: the same
    command went on with stage 2 and finished with stage1/checkpoint-* (full training states) left for good.
    A resume removes the checkpoints of the stages it finds complete."""
    from qwen_distillation.training import distiller

    out = tmp_path / "run"
    overrides = tiny_overrides(out, steps=2) + ["end_stage=2", "stage1.save_every=1", "stage2.max_steps=1",
                                                "data.max_eval_examples=2", "data.max_length=64",
                                                "stage1.grad_accum=1", "stage2.grad_accum=1"]

    def killed(stage_dir):
        raise _Killed()

    monkeypatch.setattr(distiller.ckpt, "remove_stage_checkpoints", killed)
    with pytest.raises(_Killed):
        _run(overrides)
    assert json.loads((out / "run_state.json").read_text())["completed_stages"] == [1]
    assert sorted(p.name for p in (out / "stage1").glob("checkpoint-*")) == ["checkpoint-1"]
    monkeypatch.undo()
    assert _run(overrides)["stages"] == [1, 2]
    assert not list((out / "stage1").glob("*checkpoint-*")) and not list((out / "stage2").glob("*checkpoint-*"))


def test_time_based_saves_follow_the_clock(tmp_path, monkeypatch):
    """stage1.save_every=0 with train.save_every_minutes: a checkpoint after every step whose clock
    reading (taken at the step's reduction) is past the interval, none after the last step (the
    stage's export follows it). (The same over 2 ranks: tests/test_distributed.py, fsdp2 from disk.)"""
    from qwen_distillation.training import distiller

    saved = []
    save = distiller.ckpt.save_stage_checkpoint
    monkeypatch.setattr(distiller.ckpt, "save_stage_checkpoint",
                        lambda *a, **k: saved.append(k["step"]) or save(*a, **k))
    _run(tiny_overrides(tmp_path / "run", steps=2) + ["end_stage=1", "stage1.save_every=0",
                                                      "train.save_every_minutes=1e-9", "data.max_eval_examples=2",
                                                      "data.max_length=64", "stage1.grad_accum=1"])
    assert saved == [1]


def test_a_lora_export_over_a_full_checkpoint_stops_where_the_trained_student_stops(tmp_path):
    """A full-model checkpoint_path whose generation config lacks the tokenizer's eos (<|im_end|>, which ends
    every assistant turn trained on) gets it added in memory; it served as the adapters' base as it was on disk,
    so the adapter export (its generation config is the base's) never stopped at <|im_end|>, while the run's
    samples and the merged export did."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token_id == im_end
    base = tmp_path / "base"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, eos_token_id=endoftext,
                                 tie_word_embeddings=True)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    assert GenerationConfig.from_pretrained(base).eos_token_id == endoftext
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    out = tmp_path / "lora"
    _run(tiny_overrides(out, steps=1) + ["end_stage=1", "lora.enabled=true", "lora.r=4",
                                         "lora.target_modules=[q_proj,v_proj]", "lora.merge_on_export=true",
                                         f"checkpoint_path={base}"])
    final = out / "stage1" / "final"
    for export in (final, final / "merged"):
        eos = AutoModelForCausalLM.from_pretrained(export).generation_config.eos_token_id
        assert im_end in (eos if isinstance(eos, list) else [eos]), (export, eos)
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before  # the checkpoint is untouched
