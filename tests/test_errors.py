"""Bad input stops the run with a clear message and a non-zero exit, and an existing
finished run in output_dir (even with overwrite_output_dir=true) is left untouched."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compose_config, tiny_overrides
from conftest import run_cli as _cli
from conftest import snapshot as _snapshot
from qwen_distillation.cli import main
from qwen_distillation.data.sources import data_sources, refuse_trained_eval_sets


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", ["malformed_jsonl", "missing_fields", "empty_after_filtering",
                                  "missing_checkpoint", "unknown_key", "missing_data_file", "bad_mcq_record",
                                  "missing_teacher_dir", "qlora_on_cpu", "unknown_best_metric",
                                  "checkpoint_inside_cleared_dir", "checkpoint_inside_finished_run",
                                  "feature_layer_out_of_range", "relation_heads", "weight_decay", "lora_targets",
                                  "decoder_without_layers", "random_init_type", "random_init_size", "missing_gguf",
                                  "student_inside_cleared_dir", "data_inside_cleared_dir", "later_stage_without_data",
                                  "lora_adapter_as_student", "agreement_top_k_over_vocab"])
def test_bad_input_fails_clearly_and_keeps_outputs(case, finished_run, tmp_path, capsys):
    before = _snapshot(finished_run)
    base = tiny_overrides(finished_run, steps=1) + ["end_stage=1", "overwrite_output_dir=true"]
    if case == "malformed_jsonl":
        bad = _write(tmp_path / "general.jsonl", '{"instruction": "a", "input": "", "output": "b"}\n'
                                                 '{"instruction": "c", "output": "d"\n')
        argv, expected = base + ["--general_dataset", str(bad)], [f"{bad} line 2", "not valid JSON"]
    elif case == "missing_fields":
        bad = _write(tmp_path / "general.jsonl", '{"prompt_text": "a", "reply": "b"}\n')
        argv, expected = base + ["--general_dataset", str(bad)], ["prompt_text", "reply", "alpaca"]
    elif case == "empty_after_filtering":
        long_prompt = "word " * 400
        bad = _write(tmp_path / "general.jsonl",
                     json.dumps({"instruction": long_prompt, "input": "", "output": "short"}) + "\n")
        argv, expected = base + ["--general_dataset", str(bad)], ["no usable examples", "max_length=96"]
    elif case == "missing_checkpoint":
        argv = base + ["--start_stage", "1", "--checkpoint_path", str(tmp_path / "nowhere")]
        expected = ["checkpoint_path=", "nowhere", "no such directory"]
    elif case == "unknown_key":
        argv, expected = base + ["stage1.loss.weights.kdd=0.5"], ["kdd"]
    elif case == "missing_data_file":
        argv = base + ["--medical_dataset", str(tmp_path / "missing.jsonl")]
        expected = ["missing.jsonl", "not found"]
    elif case == "bad_mcq_record":  # eval.mcq is loaded with the data, before the old run is cleared
        bad = _write(tmp_path / "mcq.jsonl", '{"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", '
                                             '"answer": "F"}\n')
        argv, expected = base + [f"eval.mcq=['{bad}']"], [f"{bad} line 1", "'answer'", "['A', 'B', 'C', 'D']"]
    elif case == "missing_teacher_dir":  # not reported as the hub's "Repo id must be in the form ..."
        argv = base + ["--teacher_model", str(tmp_path / "no_such_teacher")]
        expected = [f"model.teacher.path={tmp_path / 'no_such_teacher'}: no such file or directory"]
    elif case.startswith("checkpoint_inside"):  # --start_stage 2 from this run's stage 1, in the same output_dir
        argv = base + ["--start_stage", "1", "--checkpoint_path", str(finished_run / "stage1" / "best")]
        if case == "checkpoint_inside_finished_run":
            argv.remove("overwrite_output_dir=true")
        expected = ["lies inside output_dir", "start the new stages in another output_dir",
                    "would clear" if case == "checkpoint_inside_cleared_dir" else "holds a finished run"]
    elif case == "feature_layer_out_of_range":  # checked against the models, still before clearing
        argv = base + ["stage1.loss.weights.feature=0.1", "stage1.loss.feature.layer_map=[[0,9]]"]
        expected = ["stage1.loss.feature.layer_map", "out of range"]
    elif case == "relation_heads":
        argv = base + ["stage1.loss.weights.attention=0.1", "stage1.loss.attention.relation_heads=7"]
        expected = ["stage1.loss.attention.relation_heads=7: must divide", "e.g. stage1.loss.attention.relation_heads="]
    elif case == "weight_decay":  # torch's AdamW refused it only when the stage opened
        argv, expected = base + ["stage1.weight_decay=-1"], ["stage1.weight_decay=-1", "must be a finite number >= 0"]
    elif case == "lora_targets":  # refused before student_base is written into the old run
        argv = base + ["lora.enabled=true", "lora.target_modules=[foo_proj]"]
        expected = ["lora.target_modules=['foo_proj']", "no module named ['foo_proj']", "q_proj"]
    elif case == "decoder_without_layers":  # every step runs the student through the layer capture
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        gpt2 = tmp_path / "gpt2"
        GPT2LMHeadModel(GPT2Config(vocab_size=len(AutoTokenizer.from_pretrained(finished_run / "stage1" / "final")),
                                   n_embd=32, n_layer=2, n_head=2)).save_pretrained(gpt2)
        AutoTokenizer.from_pretrained(finished_run / "stage1" / "final").save_pretrained(gpt2)
        argv = base + ["--start_stage", "1", "--checkpoint_path", str(gpt2)]
        expected = ["model.student: GPT2LMHeadModel: its decoder GPT2Model has no `layers` list"]
    elif case == "random_init_type":  # was transformers' ValueError listing every model type
        argv, expected = base + ["model.student.random_init.model_type=foo"], [
            "model.student.random_init.model_type=foo: not a model type transformers knows"]
    elif case == "random_init_size":  # was torch's "negative dimension" traceback
        argv, expected = base + ["model.student.random_init.hidden_size=-4"], [
            "model.student.random_init=", "cannot build a qwen2 model from these sizes"]
    elif case == "missing_gguf":  # was "does not appear to have a file named ... huggingface.co//tmp/..."
        argv = base + ["--student_model", str(tmp_path / "nope.gguf")]
        expected = [f"model.student.path={tmp_path / 'nope.gguf'}: no such file or directory"]
    elif case == "student_inside_cleared_dir":  # the model the run starts from was deleted and replaced
        argv = base + ["--student_model", str(finished_run / "stage1" / "final")]
        expected = [f"model.student.path={finished_run / 'stage1' / 'final'} lies inside {finished_run / 'stage1'}, "
                    "which overwrite_output_dir=true would remove"]
    elif case == "data_inside_cleared_dir":
        argv = base + ["--general_dataset", str(finished_run / "metrics.jsonl")]
        expected = [f"data.general[0]={finished_run / 'metrics.jsonl'} lies inside", "copy it out of output_dir"]
    elif case == "later_stage_without_data":  # was refused when stage 2 opened, after stage 1 had trained
        argv = base + ["end_stage=2", "data.medical=[]", "stage2.best_metric=eval/general_nll"]
        expected = ["stage2 serves medical data (medical_ratio above 0) but data.medical is empty"]
    elif case == "lora_adapter_as_student":  # was "optimizer got an empty parameter list" after the first evaluation
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        adapter = tmp_path / "adapter"
        model = AutoModelForCausalLM.from_pretrained(finished_run / "stage1" / "final")
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
        AutoTokenizer.from_pretrained(finished_run / "stage1" / "final").save_pretrained(adapter)
        argv = base + ["--student_model", str(adapter)]
        expected = [f"model.student.path={adapter}: no parameter of the student is trainable (it is a LoRA adapter",
                    f"checkpoint_path={adapter}"]
    elif case == "unknown_best_metric":  # known only once the evaluation sets are built: still before clearing
        argv, expected = base + ["stage1.best_metric=eval/foo_nll"], ["stage1.best_metric=eval/foo_nll", "not among"]
    elif case == "agreement_top_k_over_vocab":  # was torch's ValueError at the first evaluation, the run cleared
        argv = base + ["eval.agreement=true", "eval.agreement_top_k=1000000"]
        expected = ["eval.agreement_top_k=1000000: topk_overlap compares the top k of the 151665 tokens",
                    "eval.agreement_top_k=5"]
    else:
        argv, expected = base + ["--use_qlora", "train.device=cpu"], ["--use_qlora", "CUDA GPU", "--use_lora"]
    code, output = _cli(argv, capsys)
    assert code != 0, output
    for text in expected:
        assert text in output, output
    assert "Traceback" not in output
    assert _snapshot(finished_run) == before


@pytest.mark.parametrize("case", ["data", "eval", "mcq", "calibration", "prompts", "prompts_dir", "cache",
                                  "checkpoint", "checkpoint_without_model"])
def test_a_mistyped_path_fails_before_any_model_loads(case, monkeypatch, tmp_path, capsys):
    """The teacher of a real run takes minutes to load: a path that does not exist fails first,
    naming the config entry."""
    import qwen_distillation.modeling.pair as pair

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the missing path was reported")

    monkeypatch.setattr(pair, "load_causal_lm", no_model)
    missing = tmp_path / "missing.jsonl"
    (tmp_path / "old" / "stage1" / "best").mkdir(parents=True)  # a run's output_dir, its export left out
    base = tiny_overrides(tmp_path / "run", steps=1) + ["end_stage=1"]
    argv, expected = {
        "data": (base + ["--medical_dataset", str(missing)], "data.medical[0]="),
        "eval": (base + [f"data.eval=[{missing}]"], "data.eval[0]="),
        "mcq": (base + [f"eval.mcq=['{missing}']"], "eval.mcq[0]="),
        "calibration": (base + ["model.student.random_init=null", "model.student.keep_layers=1",
                                "model.student.prune.method=block_influence",
                                f"model.student.prune.calibration.sources=[{missing}]"],
                        "model.student.prune.calibration.sources[0]="),
        "prompts": (base + ["eval.samples=true", f"eval.prompts={missing}"], "eval.prompts="),
        "prompts_dir": (base + ["eval.samples=true", f"eval.prompts={tmp_path / 'old'}"],
                        f"eval.prompts={tmp_path / 'old'}: a directory, not a file"),
        "cache": (base + ["stage1.teacher.source=cache", f"stage1.teacher.cache={tmp_path / 'nocache'}"],
                  "stage1.teacher.cache="),
        "checkpoint": (base + ["--start_stage", "1", "--checkpoint_path", str(tmp_path / "nowhere")],
                       "checkpoint_path="),
        "checkpoint_without_model": (base + ["--start_stage", "1", "--checkpoint_path", str(tmp_path / "old")],
                                     f"e.g. {tmp_path / 'old' / 'stage1' / 'best'}"),
    }[case]
    code, output = _cli(argv, capsys)
    assert code == 2, output
    assert expected in output, output
    assert any(f in output for f in ("file not found", "no such directory", "no teacher cache here",
                                     "holds no config.json", "a directory, not a file")), output
    assert "Traceback" not in output and "a model was loaded" not in output
    assert not (tmp_path / "run").exists()


def test_qlora_on_the_cpu_fails_before_any_model_loads(monkeypatch, tmp_path, capsys):
    """--use_qlora needs CUDA and bitsandbytes, which the machine tells at once; it was refused only after the
    teacher (minutes for a large one) had loaded."""
    import qwen_distillation.modeling.pair as pair

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before QLoRA was refused")

    monkeypatch.setattr(pair, "load_causal_lm", no_model)
    code, output = _cli(tiny_overrides(tmp_path / "run", steps=1) + ["end_stage=1", "--use_qlora", "train.device=cpu"],
                        capsys)
    assert code == 2 and "lora.quantize_4bit=true (--use_qlora): 4-bit QLoRA needs a CUDA GPU" in output, output
    assert "Traceback" not in output and "a model was loaded" not in output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["missing_field", "not_an_object", "empty_response"])
def test_a_malformed_record_fails_before_any_model_loads(case, monkeypatch, tmp_path, capsys):
    """A record the data formats cannot read was reported only once the data was encoded, after the
    teacher (minutes for a large one) and the student had loaded; it is named by file and line first."""
    import qwen_distillation.modeling.pair as pair

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the malformed record was reported")

    monkeypatch.setattr(pair, "load_causal_lm", no_model)
    good = json.dumps({"instruction": "What is aspirin?", "output": "A painkiller."})
    bad = {"missing_field": json.dumps({"instruction": "What is aspirin?"}),
           "not_an_object": json.dumps(["What is aspirin?", "A painkiller."]),
           "empty_response": json.dumps({"instruction": "What is aspirin?", "output": ""})}[case]
    data = _write(tmp_path / "medical.jsonl", "\n".join([good, good, bad, good]) + "\n")
    code, output = _cli(tiny_overrides(tmp_path / "run", steps=1) + ["end_stage=1", "--medical_dataset", str(data)],
                        capsys)
    assert code == 2, output
    assert f"{data} line 3" in output, output
    assert "Traceback" not in output and "a model was loaded" not in output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["file", "under_a_file"])
def test_an_output_dir_that_is_a_file_is_refused_and_kept(case, tmp_path, capsys):
    blocker = _write(tmp_path / "notes.txt", "kept")
    out = blocker if case == "file" else blocker / "run"
    code, output = _cli(tiny_overrides(out, steps=1) + ["end_stage=1", "overwrite_output_dir=true"], capsys)
    assert code == 2 and f"output_dir={out}: " in output and "is a file, not a directory" in output, output
    assert "Traceback" not in output and blocker.read_text() == "kept"


def test_a_run_with_every_stage_disabled_is_refused(tmp_path, capsys):
    argv = tiny_overrides(tmp_path / "run", steps=1) + ["--start_stage", "2", "--end_stage", "3",
                                                         "stage2.enabled=false", "stage3.enabled=false"]
    code, output = _cli(argv, capsys)
    assert code == 2 and "no stage to run: stage2.enabled=false, stage3.enabled=false" in output, output
    assert not (tmp_path / "run").exists()


def test_a_calibration_set_is_checked_only_where_the_run_prunes(monkeypatch, tmp_path, capsys):
    """``model.student.prune.calibration.sources`` is read only to prune the student from the teacher:
    a stale entry left in a config whose student is not pruned does not stop the run."""
    import qwen_distillation.modeling.pair as pair

    class Loading(Exception):
        pass

    def loading(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(pair, "load_causal_lm", loading)
    argv = tiny_overrides(tmp_path / "run", steps=1) + [
        "end_stage=1", "model.student.prune.method=even",
        f"model.student.prune.calibration.sources=[{tmp_path / 'moved.jsonl'}]"]
    with pytest.raises(Loading):
        _cli(argv, capsys)


def test_multirun_sweep_gives_each_job_its_own_output_dir(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = tiny_overrides(out, steps=1) + ["end_stage=1", "-m", "stage1.loss.weights.kd=0.3,0.7"]
    code, output = _cli(argv, capsys)
    assert code == 0, output
    for job, weight in (("job0", 0.3), ("job1", 0.7)):
        assert (out / job / "stage1" / "final" / "config.json").exists()
        assert f"kd: {weight}" in (out / job / "config.yaml").read_text()


def test_a_sweep_checks_every_job_before_the_first_starts(tmp_path, capsys):
    """A value out of range in a later sweep point stops the sweep before any job trains."""
    out = tmp_path / "sweep"
    argv = tiny_overrides(out, steps=1) + ["end_stage=1", "-m", "stage1.lr=1e-3,-1"]
    code, output = _cli(argv, capsys)
    assert code == 2, output
    assert "sweep job 1 (stage1.lr=-1): stage1.lr=-1.0: the learning rate must be" in output, output
    assert not out.exists()
    code, output = _cli(argv[:-1] + ["stage1.lr=1e-3,abc"], capsys)  # found by Hydra: no multirun.yaml left
    assert code == 2 and "sweep job 1 (stage1.lr=abc): stage1.lr=abc: Value 'abc'" in output, output
    assert not out.exists()
    # Set again after the sweep (Hydra keeps the last: one job at 5e-3, silently); before it, the sweep wins.
    code, output = _cli(argv[:-1] + ["stage1.lr=1e-3,2e-3", "stage1.lr=5e-3"], capsys)
    assert code == 2 and "stage1.lr=1e-3,2e-3 sweeps stage1.lr, which stage1.lr=5e-3 sets again after it" in output
    assert not out.exists()
    missing = tmp_path / "missing.jsonl"  # a data path of the second job: found before the first trains
    code, output = _cli(argv[:-1] + [f"data.general=[package:qwen_distillation/data/demo/general.jsonl],[{missing}]"],
                        capsys)
    assert code == 2 and f"sweep job 1 (data.general=[{missing}]): data.general[0]={missing}: file not found" \
        in output, output
    assert not out.exists()
    code, output = _cli(argv[:-1] + ["stage1.lr=-1"], capsys)  # -m with no swept key: one job, no empty "()"
    assert code == 2 and "error: sweep job 0: stage1.lr=-1.0: the learning rate must be" in output, output
    if not torch.cuda.is_available():  # a kernel the device cannot run: found before job 0 trains
        code, output = _cli(argv[:-1] + ["stage1.loss.kernel=auto,triton"], capsys)
        assert code == 2 and "sweep job 1 (stage1.loss.kernel=triton): stage1.loss.kernel=triton needs a CUDA " \
            "device" in output, output
        assert not out.exists()


def test_a_sweep_job_refused_as_it_runs_is_named_and_stops_the_sweep(tmp_path, capsys):
    """A mistake found only once a job has built its models (a best_metric the evaluation does not give)
    printed the bare error: not which job, nor that the jobs after it would not run."""
    out = tmp_path / "sweep"
    argv = tiny_overrides(out, steps=1) + ["end_stage=1", "-m",
                                           "stage1.best_metric=eval/general_top1_agreement,eval/general_nll"]
    code, output = _cli(argv, capsys)
    assert code == 2 and f"error: sweep job 0 ({out / 'job0'}): stage1.best_metric=eval/general_top1_agreement is " \
        "not among the evaluation metrics" in output, output
    assert "the sweep stops here, and no later job runs (rerun the sweep once fixed" in output
    assert not (out / "job1").exists()


def test_a_sweep_run_again_skips_its_finished_jobs(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = tiny_overrides(out, steps=1) + ["end_stage=1", "-m", "stage1.loss.weights.kd=0.3,0.7"]
    assert _cli(argv[:-1] + ["stage1.loss.weights.kd=0.3"], capsys)[0] == 0  # job0 alone, as if job1 had failed
    finished = (out / "job0" / "summary.json").stat().st_mtime_ns
    code, output = _cli(argv, capsys)
    assert code == 0, output
    assert f"{out / 'job0'}: this sweep job's run is finished; skipped" in output
    assert (out / "job0" / "summary.json").stat().st_mtime_ns == finished
    assert json.loads((out / "job1" / "run_state.json").read_text())["finished"]
    # Again with a key it does not sweep changed: refused before any job starts or Hydra rewrites multirun.yaml.
    record = (out / "multirun.yaml").read_bytes()
    code, output = _cli(argv[:-1] + ["seed=7", "-m", "stage1.loss.weights.kd=0.3,0.7"], capsys)
    assert code == 2 and f"sweep job 0 (stage1.loss.weights.kd=0.3): output_dir={out / 'job0'} holds a finished run " \
        "(stages [1]) of another configuration (changed: seed: 42 -> 7)" in output and "no job was started" in output
    assert (out / "multirun.yaml").read_bytes() == record


@pytest.mark.parametrize("override,expected", [
    ("stage1.lr=abc", ["stage1.lr=abc: Value 'abc' of type 'str' could not be converted to Float",
                       "give stage1.lr a value of its type"]),
    ("seed=[1,2]", ["seed=[1,2]:", "could not be converted to Integer", "give seed a value of its type"]),
    # A flat list for a list of pairs: the line named neither the override nor the key ("full_key: 0").
    ("stage2.loss.feature.layer_map=[0,1]", ["stage2.loss.feature.layer_map=[0,1]: Invalid value assigned",
                                             "give stage2.loss.feature.layer_map[0] a value of its type"]),
    ("model=nope", ["model=nope:", "Could not find 'model/nope'", "Available options in 'model': demo_smollm2, ",
                    "tiny_qwen2", "e.g. model=demo_smollm2"]),
    ("stage1.lr", ["Error parsing override 'stage1.lr'", "write KEY=VALUE"]),
    ("+model=tiny_qwen2", ["+model=tiny_qwen2: Multiple values for model", "write model=tiny_qwen2"]),
    ("stage1.lr=1,2", ["Ambiguous value for argument 'stage1.lr=1,2'", "add --multirun"]),
    ("hydra.job.nope=1", ["Could not override 'hydra.job.nope'", "Key 'nope' not in 'JobConf'"]),
    ("~model", ["model: ", "missing mandatory value: model"]),
    # The fix named was "set stage2.name", one key of a preset the override had removed whole.
    ("~stage2", ["stage2.name: ", "missing mandatory value: name", "or choose a stage2 preset (stage2=NAME, one of "
                 "domain_kd, general_kd, medical_ft; an override ~stage2 removes it)"]),
    ("stage1.lr=${nope}", ["stage1.lr: Interpolation key 'nope' not found"]),
])
def test_a_config_error_hydra_finds_exits_2_with_one_line(override, expected, tmp_path):
    """Hydra alone prints its own message and exits 1; a config error is the user's to fix like
    any other: exit status 2 and one `error:` line naming the override and the fix."""
    result = subprocess.run([sys.executable, str(REPO / "run_distillation.py"), f"output_dir={tmp_path / 'out'}",
                             override], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_a_sweep_value_of_the_wrong_type_exits_2(tmp_path, capsys):
    code, output = _cli([f"output_dir={tmp_path / 'out'}", "-m", "seed=abc,2"], capsys)
    assert code == 2 and ("error: sweep job 0 (seed=abc): seed=abc: Value 'abc' of type 'str' could not be "
                          "converted to Integer") in output, output
    assert not (tmp_path / "out").exists()


def test_a_bug_inside_a_run_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    """Only the user's errors become `error:` lines: an exception out of the run itself, even an
    OmegaConf one, is raised with its traceback (exit status 1)."""
    from omegaconf.errors import ConfigKeyError

    from qwen_distillation import app

    def broken(cfg):
        raise ConfigKeyError("a bug in the run")

    monkeypatch.setattr(app, "run", broken)
    before = os.environ.get("HYDRA_FULL_ERROR")
    with pytest.raises(ConfigKeyError, match="a bug in the run"):
        _cli([f"output_dir={tmp_path / 'out'}"], capsys)
    assert os.environ.get("HYDRA_FULL_ERROR") == before  # set only while Hydra runs


# A `wandb` that fails to log in as wandb 0.31 does for a malformed WANDB_API_KEY, without any
# network: the real one would try to reach the server for a well-formed key.
FAKE_WANDB = {
    "errors.py": "class Error(Exception):\n    pass\n\n\nclass CommError(Error):\n    pass\n\n\n"
                 "class AuthenticationError(CommError):\n    pass\n\n\nclass UsageError(Error):\n    pass\n",
    "__init__.py": "from wandb import errors\n\ncalls = []\n\n\n"
                   "def login(**kwargs):\n    calls.append('login')\n"
                   "    raise errors.AuthenticationError('WANDB_API_KEY invalid: API key must have 40+ characters, "
                   "has 3.')\n\n\n"
                   "def init(**kwargs):\n    calls.append('init')\n"
                   "    raise errors.AuthenticationError('API key verification failed')\n",
}


@pytest.fixture
def fake_wandb(tmp_path, monkeypatch):
    """The directory of a fake `wandb` package, imported in place of the real one until the test ends."""
    package = tmp_path / "fake_site" / "wandb"
    package.mkdir(parents=True)
    for name, text in FAKE_WANDB.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(package.parent))
    saved = {name: sys.modules.pop(name) for name in ("wandb", "wandb.errors") if name in sys.modules}
    monkeypatch.setenv("WANDB_API_KEY", "bad")
    yield package.parent
    for name in ("wandb", "wandb.errors"):
        sys.modules.pop(name, None)
    sys.modules.update(saved)


WANDB_FIXES = ["set WANDB_API_KEY to a valid key", "logging.wandb.mode=offline", "logging.wandb.enabled=false"]


def test_online_wandb_that_cannot_log_in_fails_before_anything_is_written(fake_wandb, tmp_path):
    from conftest import compose_config
    from qwen_distillation.app import run
    from qwen_distillation.errors import ConfigError

    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        run(compose_config(tiny_overrides(out, steps=1) + ["end_stage=1", "logging.wandb.enabled=true"]))
    message = str(err.value)
    assert message.startswith("logging.wandb.mode=auto logs online as WANDB_API_KEY is set, but wandb cannot log in: "
                              "WANDB_API_KEY invalid: API key must have 40+ characters, has 3."), message
    assert all(fix in message for fix in WANDB_FIXES), message
    import wandb

    assert wandb.calls == ["login"]  # checked before the models load; no run was started
    assert not out.exists()


def test_wandb_login_is_checked_only_for_online_mode(fake_wandb, monkeypatch):
    from qwen_distillation.config.schema import WandbConfig
    from qwen_distillation.errors import ConfigError
    from qwen_distillation.training.metrics import check_wandb_login

    check_wandb_login(WandbConfig(enabled=False, mode="online"))
    check_wandb_login(WandbConfig(enabled=True, mode="offline"))
    check_wandb_login(WandbConfig(enabled=True, mode="disabled"))
    monkeypatch.delenv("WANDB_API_KEY")
    check_wandb_login(WandbConfig(enabled=True, mode="auto"))  # auto without a key is offline
    import wandb

    assert wandb.calls == []
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode=online, but wandb cannot log in"):
        check_wandb_login(WandbConfig(enabled=True, mode="online"))


def test_use_wandb_with_a_bad_key_exits_2_on_the_command_line(fake_wandb, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_wandb), str(REPO)])}
    result = subprocess.run([sys.executable, str(REPO / "run_distillation.py"), *tiny_overrides(out, steps=1),
                             "--use_wandb"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "wandb cannot log in: WANDB_API_KEY invalid" in errors[0], result.stderr
    assert all(fix in errors[0] for fix in WANDB_FIXES) and "Traceback" not in result.stderr
    assert not out.exists()


def test_train_device_is_refused_naming_the_setting_before_any_model_loads(monkeypatch):
    """train.device and the commands' --device share one check (modeling.device.parse_device): a
    GPU index beyond the visible ones used to reach `.to(device)` as a CUDA traceback."""
    from types import SimpleNamespace

    import torch

    from qwen_distillation.errors import ConfigError
    from qwen_distillation.training.distiller import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^train\.device=cuda: no CUDA GPU is visible; use train\.device=auto"):
        select_device(SimpleNamespace(device="cuda", precision="auto"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^train\.device=cuda:2: only 2 CUDA GPU\(s\) visible \(cuda:0 to cuda:1\)"):
        select_device(SimpleNamespace(device="cuda:2", precision="auto"))
    assert select_device(SimpleNamespace(device="cpu", precision="auto")) == (torch.device("cpu"), "fp32")


def test_overwriting_clears_only_a_runs_own_entries(tmp_path):
    """`stage*` used to match any name: a user's stages_plan.txt or stage1_general.jsonl went too."""
    from qwen_distillation.training.outputs import prepare_output_dir

    out = tmp_path / "out"
    for name in ("stage1/best/model.safetensors", ".stage2.tmp/x", "report/plot.png", "metrics.jsonl"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("run")
    for name in ("stages_plan.txt", "stage1_general.jsonl", "notes/stage1.md", "README.md"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    prepare_output_dir(out, None, run_id="x", run_config={}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "notes", "run_state.json",
                                                     "stage1_general.jsonl", "stages_plan.txt"]


def test_a_lora_run_stopped_before_its_first_record_runs_when_its_command_is_run_again(tmp_path, capsys):
    """A LoRA run writes student_base/ as it builds its student, before its run state: one stopped after that
    (a best_metric no evaluation gives, found once the models and data had loaded; a Ctrl-C, whose line says to
    rerun the same command) left an output_dir that the corrected (or same) command refused as "not empty and
    holds no qwen_distillation run", asking for overwrite_output_dir=true."""
    out = tmp_path / "run"
    argv = tiny_overrides(out, steps=1) + ["end_stage=1", "lora.enabled=true", "data.max_eval_examples=2",
                                           "data.max_length=64", "stage1.grad_accum=1"]
    code, output = _cli(argv + ["stage1.best_metric=eval/foo_nll"], capsys)
    assert code == 2 and "stage1.best_metric=eval/foo_nll" in output, output
    assert (out / "student_base").is_dir() and not (out / "run_state.json").exists()
    code, output = _cli(argv, capsys)
    assert code == 0, output
    assert json.loads((out / "run_state.json").read_text())["finished"]


@pytest.mark.parametrize("wrote_student_base", [False, True])
def test_overwriting_clears_an_old_student_base_unless_this_run_wrote_it(tmp_path, wrote_student_base):
    """A run without LoRA over a LoRA run left the old run's student_base/ (a whole model) behind; a new LoRA
    run writes its own there while it builds, before the old run is cleared, and keeps it."""
    from qwen_distillation.training.outputs import prepare_output_dir

    out = tmp_path / "out"
    (out / "student_base").mkdir(parents=True)
    (out / "student_base" / "config.json").write_text("{}")
    prepare_output_dir(out, None, run_id="x", run_config={}, overwrite=True, wrote_student_base=wrote_student_base)
    assert (out / "student_base" / "config.json").exists() == wrote_student_base


def test_hard_sampling_with_an_end_beside_its_constant_start_runs(tmp_path, capsys):
    """`stage3.medical_ratio.end=0.5` under stage 3's constant schedule was a ValueError traceback
    ('too many values to unpack') once stages 1 and 2 had trained; a constant schedule ignores end."""
    code, output = _cli(tiny_overrides(tmp_path / "run", steps=1) + ["start_stage=3", "stage3.medical_ratio.end=0.5"],
                        capsys)
    assert code == 0 and "Traceback" not in output, output
    assert json.loads((tmp_path / "run" / "run_state.json").read_text())["completed_stages"] == [3]


def test_an_output_dir_that_cannot_be_written_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """A read-only output_dir was an OSError traceback from mkdir or config.yaml, after the models had
    loaded; the nearest existing folder is checked while the directory is only read."""
    import qwen_distillation.training.outputs as outputs

    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: path != locked)
    for out in (locked, locked / "run" / "a"):
        with pytest.raises(outputs.ConfigError, match=rf"^output_dir={out}: cannot write in {locked} "):
            outputs.check_output_dir(out, run_id="x", resume=True, overwrite=False)
    assert outputs.check_output_dir(tmp_path / "free", run_id="x", resume=True, overwrite=False) is None


def test_an_output_dir_inside_a_data_directory_is_refused(tmp_path, capsys):
    """On a resume the run's own run_state.json was read as a data record ("holds a single JSON object
    spread over several lines"), an error that did not say why a run file was data."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "general.jsonl").write_bytes((REPO / "qwen_distillation/data/demo/general.jsonl").read_bytes())
    code, output = _cli(tiny_overrides(data / "run", steps=1) + ["end_stage=1", f"data.general=[{data}]"], capsys)
    assert code == 2 and f"output_dir={data / 'run'} lies inside data.general[0]={data}, a directory read as " \
        "data" in output, output
    assert sorted(p.name for p in data.iterdir()) == ["general.jsonl"]


def test_resuming_after_a_data_file_changed_is_refused_naming_it(tmp_path, capsys):
    """Only the pool's size was checked: the same records in another order resumed silently, with
    another held-out split (examples trained on before now scored as held out)."""
    general = tmp_path / "general.jsonl"
    lines = (REPO / "qwen_distillation/data/demo/general.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    general.write_text("".join(lines), encoding="utf-8")
    argv = tiny_overrides(tmp_path / "run", steps=1) + ["end_stage=1", f"data.general=[{general}]"]
    assert _cli(argv, capsys)[0] == 0
    state_file = tmp_path / "run" / "run_state.json"
    state = json.loads(state_file.read_text())
    assert state["data_sha256"][f"data.general[0]={general}"] == hashlib.sha256(general.read_bytes()).hexdigest()
    state_file.write_text(json.dumps({**state, "finished": False}))  # as if killed before the end
    general.write_text("".join(reversed(lines)), encoding="utf-8")
    code, output = _cli(argv, capsys)
    assert code == 2 and f"data.general[0]={general}: changed since this run started" in output, output
    general.write_text("".join(lines), encoding="utf-8")
    assert _cli(argv, capsys)[0] == 0  # the original data resumes


def test_a_run_hashes_each_local_data_file_once(tmp_path, monkeypatch):
    """The check that no evaluation set is a copy of a training source and the resume check both
    need each data file's digest; each file used to be read and hashed twice at start-up."""
    import qwen_distillation.data.generated as generated
    import qwen_distillation.data.sources as sources
    import qwen_distillation.training.distiller as distiller
    from qwen_distillation.config.validate import validate_config

    hashed = []

    def counted(path):
        hashed.append(os.path.realpath(path))
        return generated.file_digest(path)

    for module in (sources, distiller):
        monkeypatch.setattr(module, "file_digest", counted)
    general, medical = tmp_path / "general.jsonl", tmp_path / "medical.jsonl"
    for file in (general, medical):
        file.write_bytes((REPO / f"qwen_distillation/data/demo/{file.name}").read_bytes())
    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "run", steps=1) + [
        f"data.general=[{general}]", f"data.medical=[{medical}]"]))
    run = distiller.Distiller(cfg)
    assert {path: hashed.count(path) for path in hashed} == {str(general): 1, str(medical): 1}
    assert run._data_sha256() == {f"data.general[0]={general}": hashlib.sha256(general.read_bytes()).hexdigest(),
                                  f"data.medical[0]={medical}": hashlib.sha256(medical.read_bytes()).hexdigest()}
    assert len(hashed) == 2


@pytest.mark.parametrize("entry, key", [("data.eval", "data.eval[0]"), ("eval.mcq", "eval.mcq[0]")])
@pytest.mark.parametrize("same", ["link", "copy"])
def test_an_evaluation_set_that_is_also_trained_on_is_refused(entry, key, same, tmp_path, capsys):
    """Its scores were reported as held out: eval/general__nll of the training file itself, or an MCQ
    accuracy on the items the student trained on. A link to the file, or a copy of it, is the same data."""
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text(json.dumps({"question": "q?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A"}) + "\n")
    other = tmp_path / f"{same}.jsonl"
    other.symlink_to(mcq) if same == "link" else other.write_bytes(mcq.read_bytes())
    argv = tiny_overrides(tmp_path / "run", steps=1) + ["end_stage=1", f"data.general=[{mcq}]", f"{entry}=[{other}]"]
    code, output = _cli(argv, capsys)
    assert code == 2 and f"{key}={other}: also the training source data.general[0] (the same file, a link or a " \
        "copy); its scores would be reported as held out" in output, output
    assert not (tmp_path / "run").exists()


def test_training_sources_that_are_the_same_data_are_named_in_a_warning(tmp_path, caplog):
    """The same records under two paths (general and medical here): each one's held-out split is
    trained on through the other; the run says so."""
    general = tmp_path / "general.jsonl"
    general.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(general.read_bytes())
    sources = data_sources(compose_config(tiny_overrides(tmp_path / "run", steps=1)
                                          + [f"data.general=[{general}]", f"data.medical=[{copy}]"]).data)
    with caplog.at_level(logging.WARNING):
        refuse_trained_eval_sets(sources)
    assert f"data.medical[0]={copy} is the same data as data.general[0]" in caplog.text


def test_random_init_heads_that_do_not_divide_are_refused_before_output_dir(tmp_path, capsys):
    """`model.teacher.random_init.num_attention_heads=3` (64 // 3 = 21, an odd head size) built a teacher
    whose first forward pass failed in the rotary embedding, a RuntimeError traceback after the output
    directory was written."""
    out = tmp_path / "run"
    argv = tiny_overrides(out, steps=1) + ["end_stage=1", "model.teacher.random_init.num_attention_heads=3"]
    code, output = _cli(argv, capsys)
    assert code == 2, output
    assert "error: model.teacher.random_init={" in output, output
    assert "cannot build a qwen2 model from these sizes: hidden_size 64 is not a multiple of num_attention_heads 3" \
        in output, output
    assert "Traceback" not in output
    assert not out.exists()


def _run_or_prune(command: str, out, argv: list[str], capsys) -> tuple[int, str]:
    """``python -m qwen_distillation.prune --out OUT ARGV`` for ``command="prune"``, else ``run_distillation.py
    output_dir=OUT ARGV`` (a run or, with ``-m``, a sweep): (exit status, what it printed)."""
    if command != "prune":
        return _cli([f"output_dir={out}"] + argv, capsys)
    from qwen_distillation.prune import main as prune

    with pytest.raises(SystemExit) as exit_:
        prune(["--out", str(out)] + argv)
    captured = capsys.readouterr()
    return exit_.value.code, captured.out + captured.err


@pytest.mark.parametrize("command,argv,expected", [
    ("run", ["experiment=null"], "error: experiment=null: a config group takes an option name; use experiment=none "
                                 "(options: arms, demo, none, smoke)"),
    ("run", ["model=NULL"], "error: model=NULL: a config group takes an option name; choose one, e.g. "
                            "model=demo_smollm2 (options: demo_smollm2, "),
    ("sweep", ["-m", "experiment=null,demo"], "error: sweep job 0 (experiment=null): experiment=null: a config group "
                                              "takes an option name; use experiment=none"),
    ("prune", ["data=null"], "error: data=null: a config group takes an option name; choose one, e.g. data=demo "
                             "(options: demo, shared_kit, shared_kit_arms, shared_kit_small)"),
], ids=["experiment", "model", "sweep", "prune"])
def test_a_config_group_set_to_null_exits_2_naming_its_options(command, argv, expected, tmp_path, capsys):
    """`experiment=null` (also `model=null`, `data=null`, `eval=null`) was Hydra's ValueError traceback
    'Config group override must be a string or a list. Got NoneType' with exit status 1."""
    out = tmp_path / "out"
    code, output = _run_or_prune(command, out, argv, capsys)
    assert code == 2, output
    assert output.strip().splitlines() == [output.strip()] and output.startswith(expected), output
    assert not out.exists()


@pytest.mark.parametrize("command,argv,expected", [
    ("run", ["model.teacher.random_init.hidden_size=64"],
     "error: model.teacher.random_init.hidden_size=64: model.teacher.random_init is null, and an override cannot "
     "set a mapping or keys into a null value (choose a config option that sets it, or set it in a preset of "
     "your own (`--config-dir DIR experiment=NAME`"),
    ("run", ["stage1.lr=1e-4", "model.student.random_init={model_type: qwen2}"],
     "error: model.student.random_init={model_type: qwen2}: model.student.random_init is null, and an override "),
    ("sweep", ["-m", "model.teacher.random_init.hidden_size=32,64"],
     "error: sweep job 0 (model.teacher.random_init.hidden_size=32): model.teacher.random_init.hidden_size=32: "
     "model.teacher.random_init is null, and an override "),
    ("prune", ["model.teacher.random_init.hidden_size=64"],
     "error: model.teacher.random_init.hidden_size=64: model.teacher.random_init is null, and an override "),
], ids=["key-inside", "mapping", "sweep", "prune"])
def test_an_override_into_a_null_value_exits_2_naming_it(command, argv, expected, tmp_path, capsys):
    """`model.teacher.random_init.hidden_size=64` under the default model (random_init null) was OmegaConf's
    traceback 'AssertionError: Unexpected type for root: NoneType', and `model.student.random_init={...}`
    'AttributeError: 'NoneType' object has no attribute 'get'', both with exit status 1, though a composition
    error is one `error:` line with exit status 2 (configuration.md); `--cfg job` as well."""
    out = tmp_path / "out"
    code, output = _run_or_prune(command, out, argv, capsys)
    assert code == 2, output
    assert output.strip().splitlines() == [output.strip()] and output.startswith(expected), output
    assert not out.exists()
    if command == "run":
        code, output = _cli(argv + ["--cfg", "job"], capsys)
        assert code == 2 and output.strip().splitlines()[-1].startswith(expected), output


@pytest.mark.parametrize("command", ["run", "sweep", "prune"])
@pytest.mark.parametrize("argv,expected", [
    (["model=tiny_qwen2", "model="], "model=: In 'config': Could not find 'model/'"),
    (["output_dir=OUT", "output_dir=null"], "output_dir=null: field 'output_dir' is not Optional"),
], ids=["group", "value"])
def test_a_config_error_names_the_last_override_of_its_key(command, argv, expected, tmp_path, capsys):
    """Hydra applies the last of a key set twice; the error quoted the first (`model=tiny_qwen2: ...
    Could not find 'model/'`, `output_dir=/tmp/a: field 'output_dir' is not Optional`)."""
    out = tmp_path / "out"
    argv = [a.replace("OUT", str(out)) for a in argv] + (["-m"] if command == "sweep" else [])
    expected = ("error: sweep job 0: " if command == "sweep" else "error: ") + expected
    if command == "prune":
        from qwen_distillation.prune import main as prune

        with pytest.raises(SystemExit) as exit_:
            prune(["--out", str(tmp_path / "pruned")] + argv)
        captured = capsys.readouterr()
        code, output = exit_.value.code, captured.out + captured.err
    else:
        code, output = _cli(argv, capsys)
    assert code == 2 and output.startswith(expected), output
    assert not out.exists() and not (tmp_path / "pruned").exists()


def _run_user_preset(tmp_path, capsys, text: str) -> tuple[int, str]:
    """A tiny run with ``experiment=mine`` from the user's own ``--config-dir``, the preset holding ``text``."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "mine.yaml").write_text(text)
    return _cli(["--config-dir", str(tmp_path / "conf"), "experiment=mine"] + tiny_overrides(tmp_path / "run", steps=1),
                capsys)


def test_a_user_preset_that_is_not_valid_yaml_is_one_error_line(tmp_path, capsys):
    """A preset in the user's own --config-dir with a YAML syntax error ended in yaml's ParserError traceback."""
    code, output = _run_user_preset(tmp_path, capsys, "# @package _global_\nstage1: {lr: 1e-3\n")
    assert code == 2 and f"error: {tmp_path / 'conf' / 'experiment' / 'mine.yaml'} line 3, column 1: not valid YAML " \
        "(while parsing a flow mapping at line 2, column 9, expected ',' or '}'" in output, output
    assert not (tmp_path / "run").exists()


def test_a_user_preset_without_its_package_line_says_so(tmp_path, capsys):
    """It was read as the value of `experiment`: "Cannot convert 'DictConfig' to string ... full_key: experiment"."""
    code, output = _run_user_preset(tmp_path, capsys, "stage1:\n  temperature: 7\n")
    assert code == 2 and "this preset lacks its package line (a preset sets keys of the whole config: make " \
        "`# @package _global_` its first line" in output, output


def test_a_typo_in_a_user_preset_gets_the_closest_key(tmp_path, capsys):
    code, output = _run_user_preset(tmp_path, capsys, "# @package _global_\nstage1:\n  temperture: 7\n")
    assert code == 2 and "experiment=mine: In 'experiment/mine': no such config key: stage1.temperture (did you mean " \
        "stage1.temperature?)" in output, output


def test_ctrl_c_is_one_line_and_exit_status_130(monkeypatch, tmp_path, capsys):
    """A KeyboardInterrupt printed a full traceback; HYDRA_FULL_ERROR=1 keeps it (where a hung run was)."""
    from qwen_distillation import app

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(app, "main", interrupted)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code, output = _cli(tiny_overrides(tmp_path / "run", steps=1), capsys)
    assert code == 130 and "interrupted: the checkpoints written so far are kept; rerun the same command" in output
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["run_distillation.py"])  # main() rewrites it
    with pytest.raises(KeyboardInterrupt):
        main(tiny_overrides(tmp_path / "run", steps=1))


def test_a_finished_partial_run_names_how_to_train_its_later_stages(finished_run, capsys):
    """Rerun with end_stage=3 over an end_stage=1 run: overwriting would discard stage 1, so the error
    names the way to go on from it."""
    code, output = _cli(tiny_overrides(finished_run, steps=1) + ["end_stage=3"], capsys)
    assert code == 2 and "holds a finished run (stages [1]) of another configuration (changed: end_stage: 1 -> 3); " \
        "to train the stages after it, start a new run from it: --start_stage 2 --checkpoint_path " \
        f"{finished_run / 'stage1' / 'final'} output_dir=NEW_DIR" in output


@pytest.mark.parametrize("changed", [["stage1.lr=5e-4"], ["seed=7"], ["stage2.lr=5e-4", "stage1.lr=5e-4"]])
def test_a_finished_partial_run_changed_in_a_trained_stage_does_not_suggest_going_on_from_it(finished_run, changed,
                                                                                             capsys):
    """Rerun with end_stage=3 and a changed stage-1 key (or seed) over an end_stage=1 run: the error suggested
    going on from stage 1's export, which was trained without the change; the new value would have no effect."""
    code, output = _cli(tiny_overrides(finished_run, steps=1) + ["end_stage=3", *changed], capsys)
    assert code == 2 and "holds a finished run (stages [1]) of another configuration" in output, output
    assert "--start_stage" not in output and "choose another output_dir or pass overwrite_output_dir=true" in output
    code, output = _cli(tiny_overrides(finished_run, steps=1) + ["end_stage=3", "stage2.lr=5e-4"], capsys)
    assert code == 2 and "start a new run from it: --start_stage 2" in output, output


@pytest.mark.parametrize("override,expected", [
    ("stage1.loss.balancing.method=gradnorm stage1.loss.balancing.gradnorm_alpha=-1",
     "stage1.loss.balancing.gradnorm_alpha=-1.0: GradNorm's asymmetry must be >= 0"),
    ("stage1.loss.weights.contrastive=0.5 stage1.loss.contrastive.domain_aware=true",
     "stage1.loss.contrastive.domain_aware=true: stage1 serves general data only"),
    ("stage1.loss.weights.contrastive=0.5 stage1.batch_size=1", "stage1.batch_size=1: "),
    ("stage1.epochs=-1", "stage1.epochs=-1.0: "),
])
def test_a_stage_value_that_would_train_wrong_keeps_a_finished_run(override, expected, finished_run, capsys):
    """Each used to train (overwrite_output_dir=true clearing the finished run first): a negative GradNorm
    alpha, a domain-aware contrastive term in a one-domain stage, a contrastive term with no negatives,
    negative epochs under max_steps."""
    before = _snapshot(finished_run)
    code, output = _cli(tiny_overrides(finished_run, steps=1) + ["end_stage=1", "overwrite_output_dir=true",
                                                                  *override.split()], capsys)
    assert code == 2 and f"error: {expected}" in output, output
    assert _snapshot(finished_run) == before


def test_an_empty_domain_is_named_before_the_metric_it_leaves_missing(tmp_path, capsys):
    """data.general=[] used to be reported as 'stage1.best_metric=eval/general_nll is not among the metrics'."""
    code, output = _cli(tiny_overrides(tmp_path / "run", steps=1) + ["end_stage=1", "data.general=[]"], capsys)
    assert code == 2 and "stage1 serves general data (medical_ratio below 1) but data.general is empty" in output


@pytest.mark.parametrize("overrides, named", [
    (["end_stage=2", "data.medical=[]"], "stage2 serves medical data (medical_ratio above 0) but data.medical is "
                                         "empty"),
    (["start_stage=3", "data.medical=[]"], "stage3 serves medical data (medical_ratio above 0) but data.medical"),
    (["end_stage=1", "stage1.medical_ratio.start=0.2", "data.medical=[]"], "stage1 serves medical data"),
    (["data.general=[]"], "stage1 serves general data (medical_ratio below 1) but data.general is empty"),
])
def test_a_stage_whose_domain_has_no_data_source_is_refused_before_any_model_loads(tmp_path, overrides, named):
    """data.medical=[] with stage 2's medical share (or stage 3's hard-example sampling) is known from the
    config, but it was refused only after both models had loaded and the data was tokenized (minutes for a
    large teacher). The Distiller's construction, which loads nothing, now refuses it."""
    from qwen_distillation.config.validate import validate_config
    from qwen_distillation.errors import DataError
    from qwen_distillation.training.distiller import Distiller

    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "run", steps=1) + overrides))
    with pytest.raises(DataError) as err:
        Distiller(cfg)
    assert named in str(err.value)
    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "run", steps=1) + ["end_stage=1",
                                                                                     "data.medical=[]"]))
    Distiller(cfg)  # stage 1 serves general data only: it needs no medical source


def test_a_misspelt_flag_of_a_command_lists_that_commands_own_flags(tmp_path, capsys):
    from qwen_distillation import cache_teacher

    with pytest.raises(SystemExit) as exit_:
        cache_teacher.main(["--out", str(tmp_path / "cache"), "--kk", "4", "model=tiny_qwen2"])
    output = capsys.readouterr().err
    assert exit_.value.code == 2 and "unknown flag --kk; classic flags are:" in output
    assert "python -m qwen_distillation.cache_teacher's own flags are: --help, --out, --k, --dtype" in output, output


@pytest.mark.parametrize("flags", [["-m", "seed=1,2"], ["seed=1,2", "--multirun"], ["--cfg", "job"]])
def test_hydra_flags_given_to_the_cache_command_are_refused_naming_them(tmp_path, capsys, flags):
    """`seed=1,2` is met by Hydra's hint 'add --multirun'; given to the cache command, -m then failed with
    'LexerNoViableAltException: -m' (the command composes one config and runs once)."""
    from qwen_distillation import cache_teacher

    with pytest.raises(SystemExit) as exit_:
        cache_teacher.main(["--out", str(tmp_path / "cache"), "--k", "4", "model=tiny_qwen2", *flags])
    output = capsys.readouterr().err
    flag = next(f for f in flags if f.startswith("-"))
    assert exit_.value.code == 2 and f"error: {flag}: python -m qwen_distillation.cache_teacher " in output, output
    assert "Lexer" not in output and "Traceback" not in output and not (tmp_path / "cache").exists()


def test_no_held_out_set_names_the_ways_to_get_one(tmp_path, capsys):
    """data.eval_fraction=0 was met by "choose one of them" from an empty list of metrics, with advice
    (agreement, BLEU/ROUGE) that needs a held-out set too."""
    out = tmp_path / "run"
    code, output = _cli(tiny_overrides(out, steps=1) + ["end_stage=1", "data.eval_fraction=0"], capsys)
    assert code == 2 and "error: stage1.best_metric=eval/general_nll: this run has no evaluation metric, since no " \
        "held-out set is scored (data.eval_fraction=0.0, no data.eval, no eval.mcq); set data.eval_fraction above 0, " \
        "give data.eval=[FILE], or give eval.mcq and stage1.best_metric=eval/mcq/NAME_accuracy" in output, output
    assert not out.exists()


def test_an_unfinished_run_says_how_to_resume_it_or_keep_its_finished_stages(tmp_path):
    """resume=false over an unfinished run of the same config said "rerun the same command to resume it",
    which failed again; another config was offered only overwrite_output_dir=true, which throws away the
    stages it had finished."""
    from qwen_distillation.errors import ConfigError
    from qwen_distillation.training import outputs

    out = tmp_path / "run"
    out.mkdir()
    (out / "run_state.json").write_text(json.dumps({"run_hash": "abc", "finished": False, "completed_stages": [1]}))
    with pytest.raises(ConfigError) as err:
        outputs.check_output_dir(out, run_id="abc", resume=False, overwrite=False)
    assert str(err.value) == (f"output_dir={out} holds an unfinished run of this configuration and resume=false does "
                              f"not resume it; drop resume=false to resume it, choose another output_dir, or pass "
                              f"overwrite_output_dir=true to start over")
    with pytest.raises(ConfigError) as err:
        outputs.check_output_dir(out, run_id="other", resume=True, overwrite=False)
    assert str(err.value) == (f"output_dir={out} holds an unfinished run with a different configuration; rerun its "
                              f"own command to resume it, start a new run from its finished stage 1 (--start_stage 2 "
                              f"--checkpoint_path {out / 'stage1' / 'final'} output_dir=NEW_DIR), choose another "
                              f"output_dir, or pass overwrite_output_dir=true to start over")
    assert outputs.check_output_dir(out, run_id="abc", resume=True, overwrite=False)["completed_stages"] == [1]


def test_overwrite_over_an_unfinished_run_of_the_same_config_says_it_starts_over(tmp_path, caplog):
    """A killed run with overwrite_output_dir=true, rerun as its interrupt line said, started over and removed
    its checkpoints without a word."""
    from qwen_distillation.training import outputs

    out = tmp_path / "run"
    out.mkdir()
    (out / "run_state.json").write_text(json.dumps({"run_hash": "abc", "finished": False, "completed_stages": []}))
    with caplog.at_level("WARNING", logger="qwen_distillation.training.outputs"):
        assert outputs.check_output_dir(out, run_id="abc", resume=True, overwrite=True) is None
    assert caplog.messages == [f"output_dir={out} holds an unfinished run of this configuration; overwrite_output_dir="
                               f"true starts over and removes it and its checkpoints. To resume it instead, rerun "
                               f"without overwrite_output_dir=true"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="qwen_distillation.training.outputs"):  # another config: a new run anyway
        outputs.check_output_dir(out, run_id="other", resume=True, overwrite=True)
    assert caplog.messages == []


def test_a_second_process_on_an_output_dir_in_use_is_refused_before_it_reads_it(tmp_path, capsys):
    """The same command run while the first was alive (to "resume" it, or a requeue) trained alongside it into
    one output_dir: every metrics row twice, a report of 12 steps where 6 ran. It is refused, touching nothing."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with open(out / ".run.lock", "a+") as held:  # what the running process holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on node7\n")
        held.flush()
        before = _snapshot(out)
        code, output = _cli(tiny_overrides(out), capsys)
        assert code == 2 and (f"error: output_dir={out}: another run is writing to it (pid 4242 on node7); let it "
                              f"end or stop it before resuming this run, or choose another output_dir") in output
        assert _snapshot(out) == before and (out / ".run.lock").read_text() == "pid 4242 on node7\n"


def test_the_output_dir_hold_is_released_and_a_folder_it_made_for_nothing_is_removed(tmp_path):
    from qwen_distillation.errors import ConfigError
    from qwen_distillation.training.outputs import LOCK_FILE, hold_output_dir

    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError):
        with hold_output_dir(fresh):
            assert (fresh / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
            raise ConfigError("refused before writing")
    assert not fresh.exists()
    with hold_output_dir(fresh):
        (fresh / "summary.json").write_text("{}")
    with hold_output_dir(fresh):  # released: the next run takes it
        with pytest.raises(ConfigError, match="another run is writing to it"):
            with hold_output_dir(fresh):
                pass
    assert sorted(p.name for p in fresh.iterdir()) == [LOCK_FILE, "summary.json"]
    with hold_output_dir(tmp_path / "ranks", hold=False):  # a rank other than 0 takes no hold
        assert not (tmp_path / "ranks").exists()


def test_a_resume_with_a_train_setting_that_changes_the_numbers_is_warned_and_recorded(tmp_path, caplog):
    """A run stopped at step 4 in fp32 and resumed with train.precision=bf16 (outside the run identity, so that
    num_threads may change) ran steps 5-10 in bf16 without a word, and its records then said bf16 throughout."""
    from omegaconf import OmegaConf

    from qwen_distillation.training import outputs

    out = tmp_path / "run"
    out.mkdir()
    old = {"seed": 1, "train": {"precision": "fp32", "num_threads": 2, "packing": False}}
    (out / "config.yaml").write_text(OmegaConf.to_yaml(old))
    state = {"run_hash": "abc", "finished": False, "completed_stages": [1]}
    new = {"seed": 1, "train": {"precision": "bf16", "num_threads": 4, "packing": True}}
    with caplog.at_level("WARNING", logger="qwen_distillation.training.outputs"):
        state = outputs.prepare_output_dir(out, state, run_id="abc", run_config=new, overwrite=False)
    changed = ["train.precision: 'fp32' -> 'bf16'", "train.packing: False -> True"]
    assert state["resumed_with_changes"] == [{"completed_stages": [1], "changed": changed}]
    assert json.loads((out / "run_state.json").read_text())["resumed_with_changes"] == state["resumed_with_changes"]
    assert caplog.messages == [f"output_dir={out}: resumed with {', '.join(changed)}; the steps after the checkpoint "
                               f"it resumes from run with the new value, those before ran with the old (recorded as "
                               f"resumed_with_changes in run_state.json and summary.json); to keep one setting, "
                               f"rerun with the old value"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="qwen_distillation.training.outputs"):  # resumed again as it now is
        state = outputs.prepare_output_dir(out, state, run_id="abc", run_config={**new, "train": {
            **new["train"], "num_threads": 1}}, overwrite=False)
    assert caplog.messages == [] and len(state["resumed_with_changes"]) == 1
