"""A damaged file the run reads (model weights, tokenizer files, heads, run state, metrics, sampler
state) stops it with a CheckpointError naming the file, what is wrong with it and the fix, exit
status 2 on the command line; never a SafetensorError, JSONDecodeError or torch traceback."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO, compose_config, tiny_overrides
from qwen_distillation.app import run
from qwen_distillation.config.schema import ModelSpec, WandbConfig
from qwen_distillation.errors import CheckpointError, ConfigError
from qwen_distillation.evaluate import main as evaluate_main
from qwen_distillation.modeling.loading import load_causal_lm, load_student_checkpoint
from qwen_distillation.modeling.pair import tokenizer_for
from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer
from qwen_distillation.training.checkpoint import export_model, load_heads, save_heads
from qwen_distillation.training.metrics import MetricsLogger
from qwen_distillation.training.outputs import check_output_dir

DEMO_MEDICAL = "package:qwen_distillation/data/demo/medical.jsonl"


def _tiny_student():
    """The student of `model=tiny_qwen2`, so a run with that teacher can start from it."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=151936, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                  max_position_embeddings=2048, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def saved_stage(tmp_path_factory) -> Path:
    """``stage1/final`` and ``stage1/best`` as a stage exports them (safetensors and tokenizer)."""
    stage = tmp_path_factory.mktemp("saved") / "stage1"
    export_model(_tiny_student(), build_qwen_tokenizer(), stage / "final")
    shutil.copytree(stage / "final", stage / "best")
    return stage


def damage(path: Path, how: str) -> Path:
    """Cut ``path`` to half its size, or replace it with bytes that are not its format."""
    if how == "truncated":
        with open(path, "r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
    else:
        path.write_bytes(b"\x00\xffnot what this file should hold\n" * 8)
    return path


def damaged_copy(saved_stage: Path, tmp_path: Path, name: str, how: str) -> tuple[Path, Path]:
    """A copy of ``stage1/final`` (and ``best`` beside it) with file ``name`` damaged."""
    stage = tmp_path / "run" / "stage1"
    shutil.copytree(saved_stage, stage)
    return stage / "final", damage(stage / "final" / name, how)


# ------------------------------------------------------------------------------ model weights
@pytest.mark.parametrize("name,how,problem", [
    ("model.safetensors", "truncated", "truncated or not a safetensors file (Error while deserializing header"),
    ("model.safetensors", "garbage", "truncated or not a safetensors file (Error while deserializing header"),
    ("config.json", "truncated", "unreadable JSON, the file is truncated or damaged"),
])
def test_a_damaged_checkpoint_names_the_file_and_another_checkpoint(saved_stage, tmp_path, name, how, problem):
    final, bad = damaged_copy(saved_stage, tmp_path, name, how)
    with pytest.raises(CheckpointError) as err:
        load_student_checkpoint(str(final), dtype=torch.float32)
    message = str(err.value)
    assert message.startswith(f"{bad}: {problem}"), message
    assert f"export or copy {final} again, or pass another saved stage, e.g. checkpoint_path={final.parent / 'best'}" \
        in message


def _edit_config(final: Path, **changes) -> None:
    config = json.loads((final / "config.json").read_text())
    (final / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("changes,problem", [
    # another model's config.json beside the weights: transformers raised a bare RuntimeError
    ({"hidden_size": 48}, "model.embed_tokens.weight has shape (151936, 32) in the weights, (151936, 48) by "
                          "config.json; model.layers.0.input_layernorm.weight has shape (32,) in the weights"),
    # one layer more than the weights hold: transformers drew it at random with a warning only
    ({"num_hidden_layers": 3, "layer_types": ["full_attention"] * 3},
     "model.layers.2.input_layernorm.weight missing; model.layers.2.mlp.down_proj.weight missing, and 10 more"),
], ids=["other-shapes", "a-layer-more"])
def test_a_checkpoint_whose_config_does_not_fit_its_weights_names_the_tensors(saved_stage, tmp_path, changes,
                                                                              problem):
    stage = tmp_path / "run" / "stage1"
    shutil.copytree(saved_stage, stage)
    _edit_config(stage / "final", **changes)
    for load in (lambda: load_student_checkpoint(str(stage / "final"), dtype=torch.float32),
                 lambda: load_causal_lm(ModelSpec(path=str(stage / "final")), dtype=torch.float32, role="student")):
        with pytest.raises(CheckpointError) as err:
            load()
        assert f"its weights do not fit the model its config.json describes ({problem}" in str(err.value)
    assert str(err.value).startswith(f"model.student.path={stage / 'final'}: ")


def test_a_checkpoint_whose_config_contradicts_itself_is_a_checkpoint_error(saved_stage, tmp_path):
    """transformers' own check of the config's sizes raised a StrictDataclassError traceback."""
    stage = tmp_path / "run" / "stage1"
    shutil.copytree(saved_stage, stage)
    _edit_config(stage / "final", num_hidden_layers=3)  # layer_types still lists 2
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint_path={stage / 'final'}: cannot load the student: "
                                                        "`num_hidden_layers` (3) must be equal to the number of "
                                                        "`layer_types` (2)")):
        load_student_checkpoint(str(stage / "final"), dtype=torch.float32)


def test_a_model_folder_whose_config_contradicts_itself_fails_its_tokenizer_with_a_checkpoint_error(saved_stage,
                                                                                                   tmp_path):
    """`--student_model DIR` read the folder's tokenizer first, and AutoTokenizer's read of config.json raised
    transformers' StrictDataclassError as a traceback."""
    from qwen_distillation.modeling.tokenizer import load_tokenizer

    shutil.copytree(saved_stage / "final", tmp_path / "model")
    _edit_config(tmp_path / "model", num_hidden_layers=3)  # layer_types still lists 2
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'model'}: its config.json contradicts itself "
                                                        "(`num_hidden_layers` (3) must be equal to the number of "
                                                        "`layer_types` (2)); download, copy or export")):
        load_tokenizer(str(tmp_path / "model"))


def test_a_weights_file_given_as_checkpoint_names_its_folder(saved_stage):
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint_path={saved_stage / 'best' / 'model.safetensors'}: is a file, not the directory of a saved "
            f"stage (its config.json and weights); pass the folder that holds it, e.g. "
            f"checkpoint_path={saved_stage / 'best'}")):
        load_student_checkpoint(str(saved_stage / "best" / "model.safetensors"), dtype=torch.float32)


def test_a_stage_folders_file_given_as_checkpoint_names_an_export(saved_stage):
    """`--checkpoint_path out/stage1/heads.pt` was told to pass `out/stage1`, which is refused in turn (a stage
    folder holds no model): the hint names the stage's export."""
    (saved_stage / "heads.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint_path={saved_stage / 'heads.pt'}: is a file, not the directory of a saved stage (its "
            f"config.json and weights); its folder {saved_stage} holds no saved model either: it is a stage folder: "
            f"pass one of its exports, e.g. {saved_stage / 'best'}")):
        load_student_checkpoint(str(saved_stage / "heads.pt"), dtype=torch.float32)


@pytest.mark.parametrize("start_stage,named", [(2, "stage1"), (3, "stage2"), (1, "stage3"), (None, "stage3")])
def test_a_runs_output_dir_given_as_checkpoint_names_the_stage_before_the_first_it_starts(tmp_path, start_stage, named):
    """`--start_stage 2 --checkpoint_path OUT` was told to pass OUT/stage3/best, the last stage's export: followed,
    stage 2 trained on from the model that stage 3 had finished. The hint names the stage before start_stage."""
    from qwen_distillation.modeling.loading import check_student_checkpoint

    for stage in ("stage1", "stage2", "stage3"):
        (tmp_path / stage / "best").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint_path={tmp_path}: holds no config.json or adapter_config.json; it is a run's output_dir: pass "
            f"a stage's export, e.g. {tmp_path / named / 'best'}")):
        check_student_checkpoint(str(tmp_path), start_stage=start_stage)
    if start_stage == 3:  # as a run names it
        out = tmp_path.parent / f"{tmp_path.name}_next"
        with pytest.raises(CheckpointError, match=re.escape(f"e.g. {tmp_path / 'stage2' / 'best'}")):
            run(compose_config(tiny_overrides(out, steps=1) + ["start_stage=3", f"checkpoint_path={tmp_path}"]))
        assert not out.exists()


@pytest.mark.parametrize("start_stage,named", [(3, "stage2"), (None, "stage1")])
def test_a_sweeps_folder_given_as_checkpoint_names_a_jobs_export(tmp_path, start_stage, named):
    """A multirun's output_dir (job0/, job1/, ... and multirun.yaml) as checkpoint_path or `evaluate --model` was
    met with "is it a stage directory such as OUTPUT_DIR/stage1/final?"."""
    from qwen_distillation.modeling.loading import check_student_checkpoint

    for job in ("job0", "job1", "job10"):
        (tmp_path / job / "stage1" / "best").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=re.escape(
            f"checkpoint_path={tmp_path}: holds no config.json or adapter_config.json; it is a sweep's folder: pass a "
            f"stage's export of one of its jobs, e.g. {tmp_path / 'job0' / named / 'best'}")):
        check_student_checkpoint(str(tmp_path), start_stage=start_stage)


def test_a_damaged_lora_adapter_or_its_base_names_the_file(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir, adapter_dir = tmp_path / "student_base", tmp_path / "stage1" / "final"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    base.save_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    assert hasattr(load_student_checkpoint(str(adapter_dir), dtype=torch.float32), "peft_config")

    damage(base_dir / "model.safetensors", "truncated")
    with pytest.raises(CheckpointError, match=f"{base_dir / 'model.safetensors'}: truncated or not a safetensors "
                                              f"file .*; {base_dir} is the base model of the LoRA adapter in "
                                              f"{adapter_dir}"):
        load_student_checkpoint(str(adapter_dir), dtype=torch.float32)
    damage(adapter_dir / "adapter_model.safetensors", "garbage")
    with pytest.raises(CheckpointError, match=f"{adapter_dir / 'adapter_model.safetensors'}: truncated or not a "
                                              f"safetensors file .*; export or copy {adapter_dir} again"):
        load_student_checkpoint(str(adapter_dir), dtype=torch.float32)


def test_a_lora_run_moved_after_training_names_its_base_and_where_it_went(tmp_path):
    """The adapter records its base model's absolute path: after the run's folder moved, the error
    names that path and the student_base now beside the stage (it was the hub's 'Repo id ...')."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    base.save_pretrained(run / "student_base")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = str(run / "student_base")
    model.save_pretrained(run / "stage1" / "final")
    shutil.move(run, tmp_path / "moved")
    adapter = tmp_path / "moved" / "stage1" / "final"
    with pytest.raises(CheckpointError, match=re.escape(f"the LoRA adapter's base model {run / 'student_base'} ") +
                       ".* does not exist; " + re.escape(f"set it to {tmp_path / 'moved' / 'student_base'}")):
        load_student_checkpoint(str(adapter), dtype=torch.float32)


def test_a_damaged_local_teacher_names_the_file_and_the_option(saved_stage, tmp_path):
    final, bad = damaged_copy(saved_stage, tmp_path, "model.safetensors", "truncated")
    with pytest.raises(CheckpointError) as err:
        load_causal_lm(ModelSpec(path=str(final)), dtype=torch.float32, role="teacher")
    assert str(err.value).startswith(f"{bad}: truncated or not a safetensors file")
    assert f"download, copy or export {final} again, or point model.teacher.path to an intact copy" in str(err.value)


def test_a_damaged_checkpoint_on_the_command_line_exits_2_before_writing(saved_stage, tmp_path):
    final, bad = damaged_copy(saved_stage, tmp_path, "model.safetensors", "truncated")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(REPO / "run_distillation.py"), *tiny_overrides(out, steps=1),
                             "--start_stage", "2", "--end_stage", "2", "--checkpoint_path", str(final)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith(f"error: {bad}: truncated or not a safetensors file"), result.stderr
    assert f"checkpoint_path={final.parent / 'best'}" in errors[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_a_damaged_model_in_evaluate_exits_2_naming_the_file(saved_stage, tmp_path, capsys):
    final, bad = damaged_copy(saved_stage, tmp_path, "model.safetensors", "garbage")
    code = evaluate_main(["--model", f"stage1={final}", "--nll", f"medical={DEMO_MEDICAL}", "--max_examples", "2",
                          "--max_length", "64", "--out", str(tmp_path / "eval"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {bad}: truncated or not a safetensors file"), err
    assert f"e.g. --model stage1={final.parent / 'best'}" in err


# ------------------------------------------------------------------------------ tokenizer files
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_damaged_tokenizer_file_names_the_file(saved_stage, tmp_path, capsys, name):
    final, bad = damaged_copy(saved_stage, tmp_path, name, "truncated")
    with pytest.raises(CheckpointError) as err:
        tokenizer_for(ModelSpec(path=str(final)), "teacher")
    assert str(err.value).startswith(f"{bad}: unreadable JSON, the file is truncated or damaged")
    assert "or take it from an intact copy with model.teacher.tokenizer=PATH" in str(err.value)
    code = evaluate_main(["--model", f"stage1={final}", "--nll", "m=package:qwen_distillation/data/demo/medical.jsonl",
                          "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err.startswith(f"error: {bad}: unreadable JSON")


def test_a_model_folder_without_its_vocabulary_is_refused_naming_it(saved_stage, tmp_path, capsys):
    """transformers builds a tokenizer of a token or two from a folder whose tokenizer.json is gone: evaluate
    reported an NLL of 0 (every text became no token), and as a teacher it was called another family."""
    shutil.copytree(saved_stage, tmp_path / "run" / "stage1")
    final = tmp_path / "run" / "stage1" / "final"
    (final / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as err:
        tokenizer_for(ModelSpec(path=str(final)), "teacher")
    assert re.match(rf"{re.escape(str(final))}: the tokenizer loaded from it has [0-9] token\(s\): no vocabulary "
                    rf"file \(tokenizer\.json, vocab\.json and merges\.txt, tokenizer\.model\) is there; ",
                    str(err.value))
    assert str(err.value).endswith("or take it from an intact copy with model.teacher.tokenizer=PATH")
    code = evaluate_main(["--model", f"stage1={final}", "--nll", "m=package:qwen_distillation/data/demo/medical.jsonl",
                          "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err.startswith(f"error: {final}: the tokenizer loaded from it has ")
    assert not (tmp_path / "eval").exists()


def test_a_checkpoint_with_fewer_logit_columns_than_the_tokenizer_is_named(tmp_path):
    """The error named no model: "the student has 5000 logit columns", while model.student described
    one of 151,936 and the student came from checkpoint_path."""
    small = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2", vocab_size=5000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    small.save_pretrained(tmp_path / "small")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=re.escape(f"the student (checkpoint_path={tmp_path / 'small'}) has 5000 "
                                                    f"logit columns but its tokenizer has 151665 tokens")):
        run(compose_config(tiny_overrides(out, steps=1) + ["start_stage=2", "end_stage=2",
                                                           f"checkpoint_path={tmp_path / 'small'}"]))
    assert not out.exists()


# ------------------------------------------------------------------------------ heads
@pytest.mark.parametrize("how", ["truncated", "garbage", "other heads"])
def test_damaged_or_mismatched_heads_name_the_file_and_the_fix(tmp_path, how):
    path = tmp_path / "stage1" / "heads.pt"
    path.parent.mkdir()
    save_heads(path, torch.nn.Linear(4, 4))
    if how == "other heads":
        heads, problem = torch.nn.Linear(4, 8), "holds heads that do not match this run's (bias has shape (4,)"
    else:
        heads, problem = torch.nn.Linear(4, 4), "truncated or damaged, torch cannot load it"
        damage(path, how)
    with pytest.raises(CheckpointError) as err:
        load_heads(path, heads)
    assert str(err.value).startswith(f"{path}: {problem}"), str(err.value)
    assert f"delete {path} to go on with new heads" in str(err.value)
    assert "overwrite_output_dir=true" in str(err.value)


# ------------------------------------------------------------------------------ run state
@pytest.mark.parametrize("text", ['{"run_hash": "abc", "completed_st', "[1, 2]", "\xff\xfe"])
def test_a_damaged_run_state_names_the_file_and_overwriting_clears_it(tmp_path, text):
    path = tmp_path / "run_state.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError) as err:
        check_output_dir(tmp_path, run_id="abc", resume=True, overwrite=False)
    assert str(err.value).startswith(f"{path}: "), str(err.value)
    assert "start over with overwrite_output_dir=true" in str(err.value)
    # The fix it names works: overwriting treats the directory as a run to clear.
    assert check_output_dir(tmp_path, run_id="abc", resume=True, overwrite=True) is None


def test_an_unfinished_run_of_another_configuration_names_the_keys_that_differ(tmp_path):
    from omegaconf import OmegaConf

    from qwen_distillation.training.outputs import RUN_IDENTITY, run_hash

    old = {"seed": 42, "stage1": {"max_steps": 4, "loss": {"weights": {"kd": 0.9, "ce": 0.1}}}, "output_dir": "a"}
    new = {**old, "stage1": {"max_steps": 5, "loss": {"weights": {"kd": 0.5, "ce": 0.1}}}, "output_dir": "b"}
    full = {key: None for key in RUN_IDENTITY}
    old, new = {**full, **old}, {**full, **new}
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    (tmp_path / "run_state.json").write_text(json.dumps({"run_hash": run_hash(old), "finished": False,
                                                         "completed_stages": []}))
    with pytest.raises(ConfigError) as err:
        check_output_dir(tmp_path, run_id=run_hash(new), resume=True, overwrite=False, run_config=new)
    assert "(changed: stage1.loss.weights.kd: 0.9 -> 0.5, stage1.max_steps: 4 -> 5)" in str(err.value)
    assert "output_dir: 'a'" not in str(err.value)  # not part of the run's identity


# ------------------------------------------------------------------------------ metrics
def _logger(output_dir: Path) -> MetricsLogger:
    return MetricsLogger(output_dir, jsonl=True, tensorboard=False, wandb_cfg=WandbConfig(), run_config={})


def _rows(*steps: int) -> str:
    return "".join(json.dumps({"stage": 1, "step": s, "global_step": s, "loss": 1.0}) + "\n" for s in steps)


def test_a_damaged_metrics_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(1) + '{"stage": 1, "step": 2, "lo\n' + _rows(3))
    with pytest.raises(CheckpointError) as err:
        _logger(tmp_path).truncate(1, 3)
    assert str(err.value).startswith(f"{path} line 2: not a metrics row")
    assert "delete or repair that line, or start over with overwrite_output_dir=true" in str(err.value)


def test_a_metrics_row_whose_stage_is_not_an_integer_names_the_file_line_and_field_on_resume(tmp_path):
    """`"stage": null` in a row made the resume's truncation fail with a TypeError traceback (None > 1)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(1) + '{"stage": null, "step": 2, "global_step": 2, "loss": 1.0}\n' + _rows(3))
    with pytest.raises(CheckpointError) as err:
        _logger(tmp_path).truncate(1, 3)
    assert str(err.value) == (f'{path} line 2: not a metrics row (field "stage" is null, not an integer stage '
                              f"number); delete or repair that line, or start over with overwrite_output_dir=true")


def test_a_metrics_row_cut_short_by_the_kill_is_dropped_on_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(1, 2) + '{"stage": 1, "step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        _logger(tmp_path).truncate(1, 2)
    assert path.read_text() == _rows(1, 2)
    assert f"{path} line 3: a row cut short" in caplog.text


def test_the_report_skips_a_damaged_metrics_line_with_a_warning(tmp_path, caplog):
    from qwen_distillation.evaluation.report import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_rows(1).encode() + b"\xff\xfe garbage\n" + b"[1, 2]\n" + _rows(4).encode())
    with caplog.at_level(logging.WARNING):
        assert [row["step"] for row in read_metrics(path)] == [1, 4]
    assert f"{path} line 2 is not a JSON object; skipped in the report" in caplog.text
    assert f"{path} line 3 is not a JSON object" in caplog.text


# ------------------------------------------------------------------------------ a resume
@pytest.fixture(scope="module")
def stopped_after_stage_1(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run of stages 1-2 as it stands after stage 1 completed (stage 2 not begun)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    overrides = tiny_overrides(out, steps=1) + ["end_stage=2"]
    run(compose_config(overrides))
    state = json.loads((out / "run_state.json").read_text())
    state.update(finished=False, completed_stages=[1])
    state["stage_eval"].pop("2")
    (out / "run_state.json").write_text(json.dumps(state))
    shutil.rmtree(out / "stage2")
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["stage"] < 2]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in metrics))
    return out, overrides


def _resume_copy(stopped, tmp_path) -> tuple[Path, list[str]]:
    out, overrides = stopped
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return copy, [o if not o.startswith("output_dir=") else f"output_dir={copy}" for o in overrides]


def test_a_resume_over_a_damaged_final_model_names_it_and_the_way_on(stopped_after_stage_1, tmp_path):
    out, overrides = _resume_copy(stopped_after_stage_1, tmp_path)
    bad = damage(out / "stage1" / "final" / "model.safetensors", "truncated")
    with pytest.raises(CheckpointError) as err:
        run(compose_config(overrides))
    message = str(err.value)
    assert message.startswith(f"{bad}: truncated or not a safetensors file"), message
    assert (f"stage 1 of this run is complete but its final model is damaged or missing: start over with "
            f"overwrite_output_dir=true, or continue in a new output_dir from {out / 'stage1' / 'best'} "
            f"(start_stage=2 checkpoint_path={out / 'stage1' / 'best'})") in message


def test_a_resume_over_a_final_model_whose_weights_are_gone_names_the_way_on(stopped_after_stage_1, tmp_path):
    out, overrides = _resume_copy(stopped_after_stage_1, tmp_path)
    (out / "stage1" / "final" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        run(compose_config(overrides))
    message = str(err.value)
    assert f"{out / 'stage1' / 'final'}: holds no weights file (*.safetensors or *.bin); stage 1 of this run is " \
           f"complete but its final model is damaged or missing" in message, message


def test_a_resume_over_a_damaged_final_that_shares_best_s_weights_offers_only_the_start_over(
        stopped_after_stage_1, tmp_path):
    from qwen_distillation.training.checkpoint import link_export

    out, overrides = _resume_copy(stopped_after_stage_1, tmp_path)
    link_export(out / "stage1" / "best", out / "stage1" / "final")  # as the stage left them (the copy broke the links)
    damage(out / "stage1" / "final" / "model.safetensors", "truncated")
    with pytest.raises(CheckpointError) as err:
        run(compose_config(overrides))
    assert (f"its final model is damaged or missing: start over with overwrite_output_dir=true "
            f"({out / 'stage1' / 'best'} shares its weight files, exported at the stage's last step)") in str(err.value)


def test_a_resume_over_damaged_heads_names_them(stopped_after_stage_1, tmp_path):
    out, overrides = _resume_copy(stopped_after_stage_1, tmp_path)
    bad = damage(out / "stage1" / "heads.pt", "truncated")
    with pytest.raises(CheckpointError, match=f"{bad}: truncated or damaged, torch cannot load it"):
        run(compose_config(overrides))


def test_a_resume_over_a_damaged_metrics_file_names_the_line(stopped_after_stage_1, tmp_path):
    out, overrides = _resume_copy(stopped_after_stage_1, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(CheckpointError, match=f"{out / 'metrics.jsonl'} line 2: not a metrics row"):
        run(compose_config(overrides))
    assert os.path.exists(out / "stage1" / "final")


def test_a_damaged_final_that_shares_best_s_weight_files_does_not_send_the_user_to_best(saved_stage, tmp_path):
    """stageN/final linked to a best exported at the last step (training.checkpoint.link_export):
    the weight file damaged under one name is damaged under both, so best is not offered."""
    from qwen_distillation.modeling.loading import shares_weights
    from qwen_distillation.training.checkpoint import link_export

    stage = tmp_path / "run" / "stage1"
    shutil.copytree(saved_stage / "best", stage / "best")
    link_export(stage / "best", stage / "final")
    assert shares_weights(str(stage / "final"), str(stage / "best"))
    assert not shares_weights(str(saved_stage / "final"), str(saved_stage / "best"))  # copies
    bad = damage(stage / "final" / "model.safetensors", "truncated")
    with pytest.raises(CheckpointError) as err:
        load_student_checkpoint(str(stage / "final"), dtype=torch.float32)
    message = str(err.value)
    assert message.startswith(f"{bad}: truncated") and "checkpoint_path=OUTPUT_DIR/stage1/final" in message
    assert str(stage / "best") not in message


def test_a_directory_without_a_saved_model_is_named_for_what_it_holds(tmp_path):
    """--checkpoint_path at a run's output_dir, at a stage folder or at a mid-stage checkpoint: the
    error says which export to pass instead (checked before any model loads)."""
    from qwen_distillation.modeling.loading import check_student_checkpoint

    run = tmp_path / "run"
    (run / "stage1" / "best").mkdir(parents=True)
    (run / "stage2" / "checkpoint-4").mkdir(parents=True)
    (run / "stage2" / "final").mkdir()
    cases = {run: f"output_dir: pass a stage's export, e.g. {run / 'stage2' / 'best'}",
             run / "stage1": f"stage folder: pass one of its exports, e.g. {run / 'stage1' / 'best'}",
             run / "stage2" / "checkpoint-4": "mid-stage checkpoint",
             tmp_path: "is it a stage directory such as OUTPUT_DIR/stage1/final?"}
    for path, hint in cases.items():
        with pytest.raises(CheckpointError, match="holds no config.json or adapter_config.json") as err:
            check_student_checkpoint(str(path))
        assert hint in str(err.value) and f"checkpoint_path={path}" in str(err.value)


def test_a_model_folder_saved_without_its_tokenizer_is_refused_naming_it(tmp_path, capsys):
    """A Llama model saved with save_pretrained alone (no tokenizer files): transformers tried the tokenizer class its
    config.json names and the run stopped with "You need to have sentencepiece or tiktoken installed"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    with pytest.raises(CheckpointError) as err:
        tokenizer_for(ModelSpec(path=str(folder)), "teacher")
    assert str(err.value).startswith(f"{folder}: holds no tokenizer (no tokenizer.json, tokenizer_config.json, ")
    assert str(err.value).endswith("or take it from an intact copy with model.teacher.tokenizer=PATH")
    capsys.readouterr()  # save_pretrained's progress bar
    code = evaluate_main(["--model", f"m={folder}", "--nll", "m=package:qwen_distillation/data/demo/medical.jsonl",
                          "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert code == 2 and capsys.readouterr().err.startswith(f"error: {folder}: holds no tokenizer"), code
