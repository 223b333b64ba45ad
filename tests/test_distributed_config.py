"""The options of a multi-GPU launch, checked in one process: the DeepSpeed config a stage gets
from the stage config and a user's JSON, each conflict named, the options an engine refuses, the
launch checks, and the launchers' command-line flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import compose_config
from qwen_distillation.cli import translate
from qwen_distillation.config.validate import validate_config
from qwen_distillation.errors import ConfigError
from qwen_distillation.training import distributed as dist
from qwen_distillation.training.deepspeed_engine import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]


def _config(*overrides: str):
    return validate_config(compose_config(list(overrides)))


def _ds(tmp_path, user: dict | None, *overrides: str, world_size: int = 2, precision: str = "bf16") -> dict:
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        overrides = (*overrides, "distributed.engine=deepspeed", f"distributed.deepspeed_config={path}")
    cfg = _config(*overrides)
    return deepspeed_config(cfg.distributed, stage=cfg.stage2, stage_key="stage2", world_size=world_size,
                            precision=precision)


def test_stage_config_fills_the_deepspeed_config(tmp_path):
    config = _ds(tmp_path, None, "distributed=zero3", "stage2.batch_size=3", "stage2.grad_accum=5",
                 "stage2.max_grad_norm=0.5", world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 5
    assert config["train_batch_size"] == 3 * 5 * 4 and config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage"] == 3
    # bf16 is torch.autocast through DeepSpeed's own section, with fp32 gradient reduction.
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in config and "fp16" not in config
    assert "torch_autocast" not in _ds(tmp_path, None, "distributed=zero2", precision="fp32")


def test_a_users_json_keeps_its_own_settings_and_defers_on_auto(tmp_path):
    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "reduce_bucket_size": 12345},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "scheduler": {"type": "WarmupLR"}}
    config = _ds(tmp_path, user, "stage2.batch_size=2")
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345}
    assert "optimizer" not in config and "scheduler" not in config  # the stage's AdamW and schedule are used


@pytest.mark.parametrize("user,names", [
    ({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}},
     ["train_micro_batch_size_per_gpu=4", "stage2.batch_size=8"]),
    ({"gradient_accumulation_steps": 3, "zero_optimization": {"stage": 2}},
     ["gradient_accumulation_steps=3", "stage2.grad_accum=1"]),
    ({"train_batch_size": 64, "zero_optimization": {"stage": 2}}, ["train_batch_size=64", "stage2.batch_size"]),
    ({"gradient_clipping": 0.3, "zero_optimization": {"stage": 2}}, ["gradient_clipping=0.3", "stage2.max_grad_norm"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 2}},
     ["optimizer.params.lr=0.1", "stage2.lr"]),
    ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, ["fp16.enabled=True", "train.precision=bf16"]),
    ({"zero_optimization": {"stage": 0}}, ["zero_optimization.stage is 0"]),
])
def test_a_conflict_in_the_json_names_both_sides(tmp_path, user, names):
    with pytest.raises(ConfigError) as err:
        _ds(tmp_path, user, "stage2.batch_size=8", "stage2.grad_accum=1")
    assert all(name in str(err.value) for name in names) and "ds.json" in str(err.value)


def test_the_json_and_the_distributed_option_must_agree_on_the_stage(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = _config("distributed=zero3", f"distributed.deepspeed_config={path}")
    with pytest.raises(ConfigError, match=r"zero_optimization.stage=2 differs from distributed.zero_stage=3"):
        deepspeed_config(cfg.distributed, stage=cfg.stage2, stage_key="stage2", world_size=2, precision="fp32")


def test_an_unreadable_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2},\n "bad" }')
    cfg = _config("distributed.engine=deepspeed", f"distributed.deepspeed_config={path}")
    with pytest.raises(ConfigError, match=r"ds.json \(--deepspeed\): not valid JSON \(line 2"):
        deepspeed_config(cfg.distributed, stage=cfg.stage2, stage_key="stage2", world_size=2, precision="fp32")
    cfg = _config("distributed.engine=deepspeed", f"distributed.deepspeed_config={tmp_path / 'missing.json'}")
    with pytest.raises(ConfigError, match="missing.json .*no such file"):
        deepspeed_config(cfg.distributed, stage=cfg.stage2, stage_key="stage2", world_size=2, precision="fp32")


@pytest.mark.parametrize("user,names", [
    ({"zero_optimization": {"stage": 2, "reduce_bucket_sizee": 5}},
     ["DeepSpeed refuses it", "zero_optimization.reduce_bucket_sizee=5", "correct or remove"]),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memoryy": True}}},
     ["zero_optimization.offload_param.pin_memoryy=true"]),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}, ['zero_optimization.reduce_bucket_size="big"']),
])
def test_an_entry_deepspeed_refuses_is_named_before_the_run_starts(tmp_path, user, names):
    """A misspelt or ill-typed entry of the JSON's sections used to reach deepspeed.initialize, a
    pydantic traceback after the output directory had been prepared (an old run cleared)."""
    pytest.importorskip("deepspeed")
    with pytest.raises(ConfigError) as err:
        _ds(tmp_path, user)
    assert all(name in str(err.value) for name in names) and "ds.json (--deepspeed)" in str(err.value), str(err.value)


@pytest.mark.parametrize("user,names", [
    ({"zero_optimization": "2"}, ['zero_optimization must be a JSON object', 'not "2"']),
    ({"zero_optimization": [2]}, ["zero_optimization must be a JSON object", "not [2]"]),
    ({"torch_autocast": "yes", "zero_optimization": {"stage": 2}}, ["torch_autocast must be a JSON object"]),
    ({"optimizer": {"params": "x"}, "zero_optimization": {"stage": 2}}, ["optimizer.params must be a JSON object"]),
    ({"bf16": True, "zero_optimization": {"stage": 2}}, ["bf16 must be a JSON object", '"bf16": {"enabled": true}']),
])
def test_a_section_that_is_not_a_json_object_is_named(tmp_path, user, names):
    """These raised a bare ValueError / AttributeError (``dict("2")``, ``"x".get``), or were ignored."""
    with pytest.raises(ConfigError) as err:
        _ds(tmp_path, user)
    assert all(name in str(err.value) for name in names), str(err.value)


@pytest.mark.parametrize("user,names", [
    ({"train_micro_batch_size_per_gpu": "8", "zero_optimization": {"stage": 2}},
     ['train_micro_batch_size_per_gpu="8" is a string', "without quotes", "stage2.batch_size=8"]),
    ({"gradient_clipping": "1.0", "zero_optimization": {"stage": 2}}, ['gradient_clipping="1.0" is a string']),
    ({"zero_optimization": {"stage": "2"}}, ['zero_optimization.stage is "2"; set it to the number 1, 2 or 3']),
    ({"zero_optimization": {"stage": True}}, ["zero_optimization.stage is true"]),
    ({"zero_optimization": {}}, ["zero_optimization.stage is missing"]),
    ({"zero_optimisation": {"stage": 2}},
     ["zero_optimization.stage is missing (the JSON has zero_optimisation: did you mean zero_optimization?)"]),
])
def test_a_quoted_number_is_named_as_a_string(tmp_path, user, names):
    """A quoted number used to give a message that contradicted itself: `train_micro_batch_size_per_gpu=8
    differs from stage2.batch_size=8`, `zero_optimization.stage is 2; set it to 1, 2 or 3`."""
    with pytest.raises(ConfigError) as err:
        _ds(tmp_path, user, "stage2.batch_size=8", "stage2.grad_accum=1")
    assert all(name in str(err.value) for name in names), str(err.value)


def test_a_directory_given_as_the_json_says_to_pass_a_file(tmp_path):
    cfg = _config("distributed.engine=deepspeed", f"distributed.deepspeed_config={tmp_path}")
    with pytest.raises(ConfigError, match=r"cannot read it \(.*\); pass the path of a DeepSpeed JSON file"):
        deepspeed_config(cfg.distributed, stage=cfg.stage2, stage_key="stage2", world_size=2, precision="fp32")


@pytest.mark.parametrize("user,expected", [
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2},
     "train_micro_batch_size_per_gpu=2 differs from stage2.batch_size=4"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_sizee": 5}}, "zero_optimization.reduce_bucket_sizee=5"),
])
def test_a_json_a_stage_refuses_stops_the_run_before_an_old_run_is_cleared(finished_run, tmp_path, user, expected):
    """One CPU process, --deepspeed, overwrite_output_dir=true over a finished run: a conflict with
    stage 2's batch size used to stop the run only after the old run was cleared and stage 1 had
    trained; an entry DeepSpeed refuses, with a traceback after the old run was cleared."""
    import os
    import subprocess
    import sys

    from conftest import REPO, snapshot, tiny_overrides

    pytest.importorskip("deepspeed")
    before = snapshot(finished_run)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    result = subprocess.run([sys.executable, str(REPO / "run_distillation.py"), *tiny_overrides(finished_run, steps=1),
                             "end_stage=2", "stage2.batch_size=4", "stage2.grad_accum=1", "overwrite_output_dir=true",
                             "--deepspeed", str(path)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and errors and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and snapshot(finished_run) == before


@pytest.mark.parametrize("overrides,names", [
    (["distributed=zero2", "stage2.loss.balancing.method=gradnorm"],
     ["stage2.loss.balancing.method=gradnorm", "distributed=zero2"]),
    (["distributed=zero3", "train.precision=fp16"], ["train.precision=fp16", "distributed=zero3"]),
    (["distributed=zero2", "lora.enabled=true", "lora.quantize_4bit=true"], ["lora.quantize_4bit", "QLoRA"]),
    (["distributed=zero3", "lora.enabled=true", "lora.merge_on_export=true"], ["lora.merge_on_export"]),
    (["distributed=zero2", "distributed.offload=true"], ["distributed.offload", "zero3_offload"]),
    (["distributed.engine=deepspeed"], ["distributed.zero_stage", "--deepspeed"]),
])
def test_options_an_engine_cannot_work_with_stop_at_start_up(overrides, names):
    with pytest.raises(ConfigError) as err:
        _config(*overrides)
    assert all(name in str(err.value) for name in names), str(err.value)


def test_balancing_outside_the_stages_that_run_is_not_refused():
    assert _config("distributed=zero2", "stage3.loss.balancing.method=pcgrad", "end_stage=2")


def test_several_processes_need_an_engine(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"distributed=none, but the launcher started 2 processes.*distributed=zero2"):
        dist.setup(_config().distributed, "cpu")


def test_more_processes_than_gpus_stop_at_start_up(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"distributed=zero3: the launcher started 4 processes on this machine but "
                                          r"2 GPU\(s\) are visible; launch at most 2 \(--nproc_per_node 2"):
        dist.setup(_config("distributed=zero3").distributed, "cuda")


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_the_nccl_backend_without_a_gpu_is_named_at_start_up(engine):
    """distributed.backend=nccl on the CPU: a ConfigError naming the option and the backends that work there,
    not torch's `RuntimeError: Distributed package doesn't have NCCL built in` from init_process_group."""
    import torch.distributed

    with pytest.raises(ConfigError, match=rf"^distributed.backend=nccl \(distributed={engine}\): NCCL runs on CUDA "
                                          r"GPUs only, and this run's device is cpu; use distributed.backend=auto "
                                          r"\(gloo on the CPU\) or distributed.backend=gloo$"):
        dist.setup(_config(f"distributed={engine}", "distributed.backend=nccl").distributed, "cpu")
    assert not torch.distributed.is_initialized()


def test_a_launch_of_one_needs_no_collectives():
    topo = dist.SINGLE
    assert dist.all_reduce_sum(topo, [1.5, 2.0]) == [1.5, 2.0]
    assert dist.broadcast_object(topo, {"a": 1}) == {"a": 1}
    assert dist.all_gather_object(topo, 3) == [3]
    assert dist.rank_share([0, 1, 2, 3, 4], dist.Topology(rank=1, world_size=2)) == [1, 3]


def test_launcher_flags():
    assert translate(["--local_rank=1", "--local-rank", "0"]) == []
    assert translate(["--deepspeed", "my ds.json", "distributed=zero3"]) == [
        "distributed.engine=deepspeed", "distributed.deepspeed_config='my ds.json'", "distributed=zero3"]


@pytest.mark.parametrize("overrides,user", [
    (["distributed=zero3_offload"], None),
    ([], {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "stage3_max_live_parameters": 5}}),
])
def test_offload_moves_the_student_not_the_teacher(tmp_path, overrides, user):
    """docs/distributed.md: under zero3_offload "the teacher is partitioned on the GPUs as under zero3 and not
    offloaded" (and the memory table counts it there); the teacher's inference engine was given the student's
    offload_param, so its partitions lived in CPU memory and crossed to the GPU for every layer it ran."""
    from qwen_distillation.training.deepspeed_engine import teacher_config

    student = _ds(tmp_path, user, *overrides)
    assert student["zero_optimization"]["offload_param"] == {"device": "cpu"}
    teacher = teacher_config(student)["zero_optimization"]
    assert teacher["stage"] == 3 and "offload_param" not in teacher and "offload_optimizer" not in teacher
    if user is not None:  # the JSON's ZeRO-3 tuning still reaches the teacher
        assert teacher["stage3_max_live_parameters"] == 5


@pytest.mark.parametrize("engine,written,option", [
    ("FSDP2Engine", "deepspeed-zero3", "resume it with distributed=zero3 (or zero3_offload) (and the same launch)"),
    ("DeepSpeedEngine", "fsdp2", "resume it with distributed=fsdp2 (and the same launch)"),
    ("DeepSpeedEngine", "single-device", "resume it with distributed=none (and the same launch)"),
    ("SingleDeviceEngine", "deepspeed-zero2", "resume it with distributed=zero2 (and the same launch)"),
])
def test_a_checkpoint_of_another_engine_names_the_option_that_resumes_it(tmp_path, engine, written, option):
    """The refusal said "resume it with the same distributed option" without naming it, while the failed
    resume had already rewritten config.yaml with the new engine: nothing on disk said which one it was."""
    import types

    from qwen_distillation.errors import CheckpointError
    from qwen_distillation.training import deepspeed_engine, engine as single, fsdp_engine

    cls = getattr({"FSDP2Engine": fsdp_engine, "DeepSpeedEngine": deepspeed_engine}.get(engine, single), engine)
    this = types.SimpleNamespace(kind="deepspeed-zero3" if engine == "DeepSpeedEngine" else cls.kind)
    with pytest.raises(CheckpointError, match=rf"another engine \({written}, this run: {this.kind}\); "
                                              + re.escape(option) + ", or delete it"):
        cls.load_state(this, tmp_path, {"kind": written})


def test_the_teacher_zero3_config_is_read_once(tmp_path, monkeypatch):
    """The teacher's DeepSpeed config comes from one reading of the user's JSON however often it is
    asked for (the set-up and every _sharded() ask), and each caller gets its own copy."""
    from qwen_distillation.training import deepspeed_engine
    from qwen_distillation.training.distiller import Distiller

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 7}}))
    reads = []
    read = deepspeed_engine.read_deepspeed_json
    monkeypatch.setattr(deepspeed_engine, "read_deepspeed_json", lambda p: reads.append(p) or read(p))
    distiller = Distiller(_config("distributed.engine=deepspeed", f"distributed.deepspeed_config={path}",
                                  "stage1.batch_size=3", "stage1.grad_accum=5"))
    first = distiller._teacher_zero3()
    assert distiller._sharded() and distiller._sharded()
    first["zero_optimization"]["stage"] = 0  # a caller's copy, not the cached config
    assert distiller._teacher_zero3() == {
        "train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5, "steps_per_print": 2**62,
        "wall_clock_breakdown": False, "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 7}}
    assert len(reads) == 1
    assert not Distiller(_config("distributed=zero2"))._sharded()
    assert Distiller(_config("distributed=fsdp2"))._teacher_zero3() is None


@pytest.mark.parametrize("user,batch,names,not_said", [
    # `true` equals 1 in Python: with stage2.batch_size=1 it passed; else the fix was `set stage2.batch_size=True`.
    ({"train_micro_batch_size_per_gpu": True}, 1, ["train_micro_batch_size_per_gpu=true is not a number"], []),
    ({"gradient_accumulation_steps": None}, 8,
     ["gradient_accumulation_steps=null is not a number", "stage2.grad_accum=1"], ["set stage2.grad_accum=None"]),
    ({"train_batch_size": 7}, 8, ["train_batch_size=7 differs", "choose stage2.batch_size and stage2.grad_accum whose "
                                  "product x 2 ranks is 7"], ["set stage2.batch_size x"]),
    ({"bf16": {"enabled": True}}, 8, ["bf16.enabled=True differs from train.precision=fp32",
                                      "set train.precision=bf16"], ["set train.precision=True"]),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, 8, ["set train.precision=bf16"],
     ["set train.precision={", '(or write "auto")']),
])
def test_a_conflict_in_the_json_says_what_to_change(tmp_path, user, batch, names, not_said):
    """The fix of a conflict named an override that cannot be written (`set train.precision=True`,
    `set stage2.batch_size x stage2.grad_accum x 2 ranks=7`, `set train.precision={"enabled": ...}`)."""
    with pytest.raises(ConfigError) as err:
        _ds(tmp_path, {"zero_optimization": {"stage": 2}, **user}, f"stage2.batch_size={batch}", "stage2.grad_accum=1",
            "stage2.loss.weights.contrastive=0", precision="fp32")
    message = str(err.value)
    assert all(name in message for name in names) and not any(bad in message for bad in not_said), message


def test_the_optimizer_blocks_weight_decay_must_agree_with_the_stage(tmp_path):
    """optimizer.params.weight_decay was dropped with the block without a word (the stage's AdamW ran
    with stage2.weight_decay), as lr is not."""
    user = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"weight_decay": 0.3}}}
    with pytest.raises(ConfigError, match=r"optimizer.params.weight_decay=0.3 differs from stage2.weight_decay=0.0.*"
                                          r"set stage2.weight_decay=0.3"):
        _ds(tmp_path, user)
    assert _ds(tmp_path, user, "stage2.weight_decay=0.3")["zero_optimization"] == {"stage": 2}


def test_json_entries_the_run_does_not_use_are_warned_of(tmp_path, caplog):
    """A misspelt top-level key (DeepSpeed passes over it) and the optimizer and scheduler entries that
    would have changed the run were dropped with at most an info line; each is now a warning naming it.
    An all-"auto" Hugging Face block is not warned of."""
    pytest.importorskip("deepspeed")
    user = {"zero_optimization": {"stage": 2}, "gradient_accumulation_step": 4, "zero_optimisation": {"stage": 3},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.8, 0.9], "eps": "auto"}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100, "warmup_max_lr": "auto"}}}
    (tmp_path / "ds.json").write_text(json.dumps(user))
    cfg = _config("distributed.engine=deepspeed", f"distributed.deepspeed_config={tmp_path / 'ds.json'}")
    with caplog.at_level("WARNING", logger="qwen_distillation.training.deepspeed_engine"):
        for _ in range(2):  # once a run, however many stages ask
            deepspeed_config(cfg.distributed, stage=cfg.stage2, stage_key="stage2", world_size=2, precision="bf16")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings
    unread, optimizer, scheduler = warnings
    assert "gradient_accumulation_step (did you mean gradient_accumulation_steps?)" in unread
    assert "zero_optimisation (did you mean zero_optimization?)" in unread and "not a DeepSpeed setting" in unread
    assert "optimizer.params.betas=[0.8, 0.9]: ignored, the stage runs torch AdamW" in optimizer
    assert "eps" not in optimizer.split(":")[1] and "ds.json (--deepspeed)" in optimizer
    assert 'scheduler.type="WarmupLR", scheduler.params.warmup_num_steps=100: ignored' in scheduler
    assert "stageN.lr_scheduler" in scheduler and "warmup_max_lr" not in scheduler
    caplog.clear()
    auto = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
            "scheduler": {"type": "auto", "params": {"warmup_num_steps": "auto"}}}
    with caplog.at_level("WARNING", logger="qwen_distillation.training.deepspeed_engine"):
        (tmp_path / "auto").mkdir()
        _ds(tmp_path / "auto", auto)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_json_warnings_are_logged_once_a_run_not_once_a_process(tmp_path, caplog):
    """The jobs of a Hydra multirun run in one process, each with a config of its own: a job after the first,
    with the same DeepSpeed JSON, logged none of its warnings (they were remembered for the process)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}))
    with caplog.at_level("WARNING", logger="qwen_distillation.training.deepspeed_engine"):
        for _job in range(2):
            cfg = _config("distributed.engine=deepspeed", f"distributed.deepspeed_config={path}")
            for _stage in range(2):  # each stage of a job asks: once a job
                deepspeed_config(cfg.distributed, stage=cfg.stage2, stage_key="stage2", world_size=2,
                                 precision="bf16")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all('scheduler.type="WarmupLR": ignored' in w for w in warnings), warnings


def test_engine_options_without_an_engine_are_warned_of():
    """`distributed=none distributed.offload=true` (a sweep over distributed=none,zero3 that sets it for both)
    ran on one device without a word; it is a warning, not an error, so the sweep runs."""
    from qwen_distillation.config.validate import ignored_settings

    cfg = _config("distributed=none", "distributed.offload=true", "distributed.zero_stage=3")
    lines = [line for line in ignored_settings(cfg) if "distributed." in line]
    assert len(lines) == 1 and lines[0].startswith("distributed.zero_stage=3, distributed.offload=True: ignored"), lines
    assert "distributed=zero2" in lines[0]
    assert not [line for line in ignored_settings(_config("distributed=zero3", "distributed.offload=true"))
                if "distributed." in line]


@pytest.mark.parametrize("overrides,label", [
    (["distributed=zero2", "distributed.zero_stage=3"], "under distributed=zero2 distributed.zero_stage=3,"),
    (["distributed.engine=deepspeed", "distributed.zero_stage=3"],
     "under distributed=none distributed.engine=deepspeed distributed.zero_stage=3,"),
    (["distributed.engine=fsdp2"], "under distributed=none distributed.engine=fsdp2,"),
])
def test_a_message_names_the_engine_as_the_overrides_set_it(overrides, label):
    """The FP8 teacher under `distributed=zero2 distributed.zero_stage=3` was refused as 'not supported under
    distributed=zero2 ...; use distributed=zero2', and under `distributed.engine=fsdp2` as under distributed=none."""
    with pytest.raises(ConfigError) as err:
        _config(*overrides, "model.teacher.fp8=true")
    assert label in str(err.value), str(err.value)


@pytest.mark.parametrize("option", sorted(p.stem for p in (ROOT / "conf" / "distributed").glob("*.yaml")))
def test_each_engine_option_as_written_is_named_by_its_name_alone(option):
    """engine_label holds what each conf/distributed option sets: an option it does not know, or one whose
    values moved, would be named with its own values as overrides."""
    from qwen_distillation.config.validate import engine_label

    assert engine_label(compose_config([f"distributed={option}"]).distributed) == f"distributed={option}"


@pytest.mark.parametrize("argv,key", [
    (["--deepspeed", "a.json", "--deepspeed=b.json"], "distributed.deepspeed_config"),
    (["--deepspeed", "a.json", "distributed.deepspeed_config=b.json"], "distributed.deepspeed_config"),
    (["--use_qlora", "lora.quantize_4bit=false"], "lora.quantize_4bit"),
])
def test_a_flag_and_another_setting_of_the_same_key_are_refused(argv, key):
    """Only the first override a classic flag sets was checked: the second --deepspeed JSON, or
    lora.quantize_4bit=false after --use_qlora (plain LoRA), won without a word."""
    from qwen_distillation.cli import UsageError

    with pytest.raises(UsageError, match=f"{key} is set twice"):
        translate(argv)
    assert translate(["--teacher_model", "x", "model.teacher.tokenizer=y"])[-1] == "model.teacher.tokenizer=y"
    assert translate(["--deepspeed", "a.json", "--deepspeed", "a.json"])


@pytest.mark.parametrize("rank,shown", [(None, True), ("0", True), ("1", False)])
def test_a_launch_logs_the_package_lines_once_not_once_a_rank(monkeypatch, caplog, rank, shown):
    """Every rank holds the same config and data, and each logged the same warnings and info lines: N
    copies under N processes. Under a launcher a rank other than 0 keeps only the lines that tell what
    it did itself (``extra=ALL_RANKS``), the package's errors, and other libraries' lines."""
    import logging

    from qwen_distillation.app import warn_ignored_settings
    from qwen_distillation.training.distributed import ALL_RANKS, log_from_main_rank

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    with caplog.at_level("INFO"):
        installed = log_from_main_rank()
        try:
            assert log_from_main_rank() is installed  # once, however often a process runs a job
            assert sum(len(h.filters) for h in logging.getLogger().handlers) <= len(logging.getLogger().handlers)
            warn_ignored_settings(_config("lora.r=4"))
            logging.getLogger("qwen_distillation.data.sources").info("data.medical: 10 train, 2 held out")
            logging.getLogger("qwen_distillation.training.fsdp_engine").info("rank 1: held 0", extra=ALL_RANKS)
            logging.getLogger("qwen_distillation.training.distiller").error("stage1: a rank's own failure")
            logging.getLogger("another_library").warning("another library's line")
        finally:
            for handler in logging.getLogger().handlers:
                if installed is not None:
                    handler.removeFilter(installed)
    assert ("lora.r=4: ignored, LoRA is off" in caplog.text) is shown
    assert ("10 train, 2 held out" in caplog.text) is shown
    assert all(line in caplog.text for line in ("rank 1: held 0", "a rank's own failure", "another library's line"))
