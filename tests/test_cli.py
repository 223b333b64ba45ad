"""The classic flags map onto the config and mix with Hydra overrides."""

from __future__ import annotations

import os
import re

import pytest

from conftest import compose_config
from qwen_distillation.cli import CLASSIC_FLAGS, UsageError, classic_help, translate
from qwen_distillation.config.validate import validate_config
from qwen_distillation.data.sources import normalise_sources


def _config(argv: list[str]):
    return validate_config(compose_config(translate(argv)))


def test_value_flags_map_onto_the_config(tmp_path):
    config = _config([
        "--teacher_model", "Qwen/Qwen2.5-7B-Instruct", "--student_model", str(tmp_path / "student"),
        "--output_dir", str(tmp_path / "out"), "--general_dataset", "a.jsonl,b.json",
        "--medical_dataset", "FreedomIntelligence/medical-o1-reasoning-SFT", "--eval_dataset", "c.csv",
        "--start_stage", "2", "--end_stage", "3", "--checkpoint_path", str(tmp_path / "out/stage1/best"),
        "--seed", "7",
    ])
    assert config.model.teacher.path == "Qwen/Qwen2.5-7B-Instruct" and config.model.teacher.random_init is None
    assert config.model.student.path == str(tmp_path / "student") and config.model.student.keep_layers is None
    assert config.output_dir == str(tmp_path / "out")
    assert [s.path for s in normalise_sources("g", config.data.general)] == ["a.jsonl", "b.json"]
    assert config.data.medical == ["FreedomIntelligence/medical-o1-reasoning-SFT"]
    assert config.data.eval == ["c.csv"]
    assert (config.start_stage, config.end_stage, config.seed) == (2, 3, 7)
    assert config.checkpoint_path == str(tmp_path / "out/stage1/best")


@pytest.mark.parametrize("order", ["override first", "flag first"])
def test_a_key_a_flag_clears_keeps_the_value_an_override_gives_it_wherever_it_stands(order):
    """--teacher_model clears the teacher's tokenizer; `model.teacher.tokenizer=Y --teacher_model X` lost Y."""
    argv = ["model.teacher.tokenizer=./tok", "--teacher_model", "./teacher"]
    config = _config(argv if order == "override first" else argv[1:] + argv[:1])
    assert (config.model.teacher.path, config.model.teacher.tokenizer) == ("./teacher", "./tok")
    assert config.model.teacher.random_init is None and config.model.teacher.gguf_file is None


@pytest.mark.parametrize("flag,check", [
    ("--fp16", lambda c: c.train.precision == "fp16"),
    ("--bf16", lambda c: c.train.precision == "bf16"),
    ("--use_lora", lambda c: c.lora.enabled and not c.lora.quantize_4bit),
    ("--use_qlora", lambda c: c.lora.enabled and c.lora.quantize_4bit),
    ("--use_wandb", lambda c: c.logging.wandb.enabled),
])
def test_switch_flags(flag, check):
    assert check(_config([flag]))


def test_every_documented_flag_is_handled():
    documented = ("--teacher_model --student_model --output_dir --general_dataset --medical_dataset --eval_dataset "
                  "--fp16 --bf16 --use_lora --use_qlora --use_wandb --start_stage --end_stage --checkpoint_path "
                  "--seed --deepspeed --local_rank").split()
    assert sorted(CLASSIC_FLAGS) == sorted(documented)
    text = classic_help()
    assert all(flag in text for flag in documented) and "stage2.loss.weights.kd" in text


def test_flags_mix_with_hydra_overrides_and_equals_form():
    config = _config(["--start_stage=2", "--checkpoint_path", "out/stage1/best", "stage2.temperature=3",
                      "stage2.loss.weights.kd=0.5"])
    assert config.start_stage == 2 and config.checkpoint_path == "out/stage1/best"
    assert config.stage2.temperature == 3 and config.stage2.loss.weights.kd == 0.5


def test_paths_with_special_characters_are_quoted():
    config = _config(["--output_dir", "runs/a=b,c d"])
    assert config.output_dir == "runs/a=b,c d"
    assert _config(["--output_dir=stage1.lr=1e-3"]).output_dir == "stage1.lr=1e-3"  # the = form takes any value


@pytest.mark.parametrize("path", ["data/医疗数据.jsonl", "data/données.jsonl", "data/a#1.jsonl", "data/a&b.jsonl",
                                  "data/a!.jsonl", "data/a;b.jsonl", "data/a<b>.jsonl", "data/a^b.jsonl",
                                  "data/a`b`.jsonl", "data/a|b.jsonl", "data/a%b.jsonl"])
def test_paths_with_characters_outside_hydras_unquoted_grammar_are_quoted(path):
    """A Chinese file name (or `é # & ! ; < ^` and a backtick) through a classic flag failed with Hydra's
    `LexerNoViableAltException` on an override the user never typed; every value-taking flag quotes it."""
    config = _config(["--general_dataset", f"{path},b.jsonl", "--output_dir", f"runs/{path}",
                      "--teacher_model", path, "--checkpoint_path", path])
    assert [s.path for s in normalise_sources("g", config.data.general)] == [path, "b.jsonl"]
    assert (config.output_dir, config.model.teacher.path, config.checkpoint_path) == (f"runs/{path}", path, path)


@pytest.mark.parametrize("argv,message", [
    (["--start_stage"], "needs a value"),
    (["--use_lora=yes"], "takes no value"),
    (["--learning_rate", "1e-4"], "unknown flag --learning_rate"),
    (["--general_dataset", ",,"], re.escape("--general_dataset ',,' names no file or dataset")),
    (["--seed", "1", "--seed", "2"], "seed is set twice, by --seed 1 and by --seed 2; keep one"),
    (["--fp16", "--bf16"], "train.precision is set twice, by --fp16 and by --bf16"),
    (["--start_stage", "2", "start_stage=3"], "start_stage is set twice, by --start_stage 2 and by start_stage=3"),
    (["start_stage=3", "--start_stage", "2"], "start_stage is set twice, by start_stage=3 and by --start_stage 2"),
    # An empty shell variable (`--output_dir $UNSET stage1.lr=1e-3`) made the override the flag's value: the run
    # wrote into ./stage1.lr=1e-3/ at the default learning rate.
    (["--output_dir", "stage1.lr=1e-3"], re.escape("--output_dir needs a value: the word after it, stage1.lr=1e-3, "
                                                   "is a config override")),
    (["--seed", "+experiment=smoke"], "--seed needs a value: the word after it, \\+experiment=smoke"),
    (["--checkpoint_path", "~stage1.max_steps"], "--checkpoint_path needs a value"),
    (["-m", "--seed", "1,2"], re.escape("--seed takes one value, not '1,2'; to sweep it, write the config key with "
                                        "-m: seed=1,2")),
    (["--end_stage=1,2"], re.escape("--end_stage takes one value, not '1,2'")),
])
def test_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        translate(argv)


def test_the_same_value_twice_and_overrides_among_themselves_pass():
    assert translate(["--seed", "1", "seed=1", "stage1.lr=1", "stage1.lr=2", "--use_lora", "--use_qlora"])[:4] == [
        "seed=1", "seed=1", "stage1.lr=1", "stage1.lr=2"]


def test_multirun_flag_passes_through():
    assert translate(["stage2.loss.weights.kd=0.3,0.7", "--seed", "1", "-m"]) == [
        "-m", "stage2.loss.weights.kd=0.3,0.7", "seed=1"]


def test_hydras_flags_go_first_wherever_they_stand():
    """Hydra reads its flags only before the overrides: `model=x --cfg job end_stage=1` was refused as
    "unrecognized arguments: end_stage=1", naming the override instead of the flag's place."""
    assert translate(["model=tiny_qwen2", "--cfg", "job", "end_stage=1", "--config-dir", "my_conf", "-m",
                      "--info", "defaults", "--resolve"]) == [
        "-m", "--cfg", "job", "--config-dir", "my_conf", "--info", "defaults", "--resolve", "model=tiny_qwen2",
        "end_stage=1"]
    assert translate(["seed=1", "--info", "seed=2", "-cn=config"]) == ["--info", "-cn=config", "seed=1", "seed=2"]


def test_a_preset_is_chosen_with_or_without_the_plus():
    """The default config selects experiment=demo; `+experiment=smoke`, as older commands
    wrote it, picks smoke instead (Hydra itself cannot append a group already selected)."""
    assert translate(["+experiment=smoke", "seed=3"]) == ["experiment=smoke", "seed=3"]
    for argv in (["+experiment=smoke"], ["experiment=smoke"]):
        config = _config(argv)
        assert config.experiment == "smoke" and config.model.name == "tiny_qwen2"
        assert config.stage1.max_steps == 6 and not config.eval.agreement  # nothing of the demo preset


@pytest.mark.parametrize("override,message", [
    ("stage2.loss.weights.kl=0.3", "stage2.loss.weights.kl was renamed to stage2.loss.weights.kd; write "
                                   "stage2.loss.weights.kd=0.3"),
    ("stage1.loss.weights.kl=0.3,0.7", "write stage1.loss.weights.kd=0.3,0.7"),
    ("+stage2.medical_ratio.num_steps=4", "stage2.medical_ratio.num_steps was renamed to "
                                          "stage2.medical_ratio.plateaus; write stage2.medical_ratio.plateaus=4"),
])
def test_a_renamed_key_is_refused_naming_the_new_one(override, message):
    with pytest.raises(UsageError, match=message.replace(".", r"\.")):
        translate(["--seed", "1", override])
    with pytest.raises(SystemExit) as exit_info:
        from qwen_distillation.cli import main

        main([override])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("override,message", [
    ("stage2.eval_evry=3", "no such config key: stage2.eval_evry (did you mean stage2.eval_every?)"),
    ("+stage2.eval_evry=3", "no such config key: stage2.eval_evry (did you mean stage2.eval_every?)"),
    ("++train.devic=cpu", "no such config key: train.devic (did you mean train.device?)"),
    ("+stage2.foo=1", "no such config key: stage2.foo;"),
    ("stage2.loss.weight.kd=1", "no such config key: stage2.loss.weight (did you mean stage2.loss.weights?)"),
])
def test_an_unknown_key_is_refused_however_it_is_written(override, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        translate([override])


def test_known_keys_groups_and_hydras_own_pass_through():
    argv = ["model=tiny_qwen2", "experiment=smoke", "~experiment", "hydra.job.chdir=false",
            "hydra/job_logging=disabled", "model.teacher.random_init.vocab_size=64", "data.general=[a.jsonl]"]
    assert translate(argv) == argv


@pytest.mark.parametrize("command,argv", [
    ("prune", ["--out", "o", "--ov", "model.student.keep_layers=2", "--teacher_model", "./no_teacher"]),
    ("cache_teacher", ["--out", "o", "--ov", "--teacher_model", "./no_teacher"]),
    ("generate_data", ["--teacher", "./no_teacher", "--data", "./d.jsonl", "--output", "o", "--ov"]),
    ("evaluate", ["--model", "a=b", "--out", "o", "--dev", "cpu"]),
])
def test_the_commands_take_no_abbreviated_flags(command, argv, tmp_path, capsys, monkeypatch):
    """`prune --out o --ov` was taken as --overwrite (argparse's prefix matching): a typo replaced an output."""
    import importlib

    monkeypatch.chdir(tmp_path)  # a missing teacher: without the check each stops soon, writing nothing here
    main = importlib.import_module(f"qwen_distillation.{command}").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and ("unknown flag --" in err or "unrecognized arguments: --" in err), err


@pytest.mark.parametrize("argv,rerun", [
    ([], "rerun the same command to continue from the last one"),
    (["overwrite_output_dir=true"], "rerun the same command without overwrite_output_dir=true to continue from the "
                                    "last one (with it, the run starts over and removes them)")])
def test_an_interrupted_run_says_how_to_continue_it(argv, rerun, monkeypatch, capsys):
    """With overwrite_output_dir=true, "rerun the same command to continue" started the run over and
    removed the checkpoints it had just said were kept."""
    from qwen_distillation import app, cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "main", interrupted)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 130
    assert capsys.readouterr().err == f"\ninterrupted: the checkpoints written so far are kept; {rerun}\n"


def test_cfg_job_says_what_a_run_would_refuse_and_refuses_a_sweep(capsys):
    """`--cfg job end_stage=5` printed `end_stage: 5` and exited 0, as a dry run passing a config every run
    refuses; `-m --cfg job` ended in Hydra's ValueError traceback."""
    from conftest import run_cli

    code, output = run_cli(["--cfg", "job", "end_stage=5"], capsys)
    assert code == 2 and "end_stage: 5" in output
    assert ("error: end_stage=5: stages are numbered 1..3 (override it, e.g. `end_stage=2`) (the config above is "
            "what these overrides compose; a run refuses it)") in output
    code, output = run_cli(["--cfg", "job", "stage1.temperature=3"], capsys)
    assert code == 0 and "temperature: 3" in output and "error" not in output
    code, output = run_cli(["-m", "--cfg", "job", "stage1.temperature=2,4"], capsys)
    assert code == 2 and output.startswith("error: -m and --cfg cannot go together") and "Traceback" not in output


@pytest.mark.parametrize("override,key", [("data.general=[nothere.jsonl]", "data.general[0]"),
                                          ("data.medical=[{path:nothere.jsonl,max_record:3}]", "data.medical[0]")])
def test_cfg_job_says_a_run_would_refuse_its_data(override, key, tmp_path, capsys, monkeypatch):
    """`--cfg job data.general=[missing.jsonl]` exited 0 without a word, though a run (and a sweep's checks) stop
    on the missing file before any model loads."""
    from conftest import run_cli

    monkeypatch.chdir(tmp_path)
    code, output = run_cli(["--cfg", "job", override], capsys)
    assert code == 2 and f"error: {key}" in output and "(the config above is what these overrides compose; a run " \
        "refuses it)" in output, output


def test_sigterm_ends_a_run_as_ctrl_c_does_with_its_own_status(monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) killed the process at once: no line saying what is kept, and no wait for a
    checkpoint being written in the background. It now unwinds as Ctrl-C does, with exit status 143."""
    import signal
    import time

    from qwen_distillation import app, cli

    cleaned = []

    def running():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            cleaned.append(True)  # what the run's own finally blocks do on the way out

    monkeypatch.setattr(app, "main", running)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        cli.main([])
    assert stop.value.code == 143 and cleaned == [True]
    assert capsys.readouterr().err == ("\nterminated (SIGTERM): the checkpoints written so far are kept; rerun the "
                                       "same command to continue from the last one\n")
    assert signal.getsignal(signal.SIGTERM) == before  # restored for whatever runs next in the process
    # Under a launcher every rank is stopped: rank 0 alone says so (the line came once per rank).
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:
        cli.main([])
    assert stop.value.code == 143 and capsys.readouterr().err == ""
