"""`python -m qwen_distillation.evaluate` compares saved checkpoints on NLL, teacher
agreement, BLEU/ROUGE of greedy answers and multiple-choice sets and writes a Markdown and
JSON table."""

from __future__ import annotations

import json

import pytest
import torch

import qwen_distillation.evaluate as evaluate_module
from conftest import SHARED_DATA, compose_config, tiny_overrides
from qwen_distillation.app import run
from qwen_distillation.evaluate import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    run(compose_config(tiny_overrides(out, steps=1) + ["end_stage=2"]))
    return out


def test_compares_checkpoints_and_writes_tables(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["--model", f"stage1={tiny_run / 'stage1' / 'final'}", "--model",
                 f"stage2={tiny_run / 'stage2' / 'final'}", "--teacher", "stage1",
                 "--nll", "medical=package:qwen_distillation/data/demo/medical.jsonl",
                 "--mcq", f"medmcqa={SHARED_DATA / 'medical_eval' / 'medmcqa_dev_eval_500.jsonl'}",
                 "--mcq", f"cmexam={SHARED_DATA / 'medical_eval' / 'cmexam_val_eval_zh_1000.jsonl'}",
                 "--max_examples", "4", "--mcq_max_items", "6", "--max_length", "96", "--out", str(out),
                 "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"stage1", "stage2"}
    # The metric names of evaluation during training (metrics.jsonl, the report), and the items each MCQ
    # set scored: --max_examples capped the MCQ sets too, without a word.
    mcq = {"eval/mcq/medmcqa_accuracy", "eval/mcq/cmexam_accuracy", "eval/mcq/medmcqa_items", "eval/mcq/cmexam_items"}
    assert set(results["stage2"]) == {"eval/medical_nll", "eval/medical_ppl", "eval/medical_top1_agreement",
                                      "eval/medical_topk_overlap", "eval/medical_kl_to_teacher", *mcq}
    assert set(results["stage1"]) == {"eval/medical_nll", "eval/medical_ppl", *mcq}  # no agreement with itself
    assert results["stage2"]["eval/mcq/medmcqa_items"] == results["stage1"]["eval/mcq/cmexam_items"] == 6
    assert results["stage2"]["eval/mcq/medmcqa_accuracy"] in {k / 6 for k in range(7)}
    assert results["stage2"]["eval/medical_kl_to_teacher"] > 0  # stage 2 moved away from stage 1
    table = (out / "results.md").read_text()
    assert table.startswith("| model |") and "| stage2 |" in table and "| 6 |" in table


def test_unknown_teacher_name_is_a_clear_error(tiny_run, tmp_path, capsys):
    code = main(["--model", f"a={tiny_run / 'stage1' / 'final'}", "--teacher", "b", "--out", str(tmp_path)])
    assert code == 2 and "--teacher b: not among the --model names ['a']" in capsys.readouterr().err


def test_text_metrics_score_every_model_on_the_nll_sets(tiny_run, tmp_path):
    out = tmp_path / "eval"
    code = main(["--model", f"stage1={tiny_run / 'stage1' / 'final'}", "--model",
                 f"stage2={tiny_run / 'stage2' / 'final'}", "--teacher", "stage1",
                 "--nll", "medical=package:qwen_distillation/data/demo/medical.jsonl",
                 "--nll", "general=package:qwen_distillation/data/demo/general.jsonl",
                 "--text_metrics", "--text_metrics_max_examples", "2", "--max_new_tokens", "4",
                 "--max_examples", "4", "--max_length", "96", "--out", str(out), "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    names = {f"eval/{prefix}{name}_{metric}" for prefix in ("", "llamafactory/") for name in ("medical", "general")
             for metric in ("bleu4", "rouge1", "rouge2", "rougeL")}
    for model in ("stage1", "stage2"):  # the teacher included: its answers have references too
        assert names <= set(results[model]), model
        assert all(0.0 <= results[model][name] <= 100.0 for name in names), results[model]
    assert "eval/medical_rougeL" in (out / "results.md").read_text().splitlines()[0]


@pytest.mark.parametrize("flags,message", [
    (["--text_metrics"], "--text_metrics scores answers to the examples of the --nll (or --run) sets"),
    (["--text_metrics", "--nll", "m=x.jsonl", "--text_metrics_max_examples", "0"],
     "--text_metrics_max_examples 0: must be >= 1"),
    (["--text_metrics", "--nll", "m=x.jsonl", "--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
])
def test_text_metrics_flags_are_checked_before_loading(tmp_path, capsys, flags, message):
    code = main(["--model", "a=does/not/exist", *flags, "--out", str(tmp_path)])
    assert code == 2 and message in capsys.readouterr().err


def test_bad_arguments_are_refused_before_any_model_loads(tiny_run, tmp_path, capsys):
    """Duplicate names, no set to evaluate on, --out naming a file, a model path that does not
    exist or a folder with no saved model: exit 2 with one line naming the option."""
    final, nll = str(tiny_run / "stage1" / "final"), "package:qwen_distillation/data/demo/medical.jsonl"
    a_file = tmp_path / "results.txt"
    a_file.write_text("kept")
    cases = [
        (["--model", f"a={final}", "--model", f"a={tmp_path}", "--nll", f"m={nll}"], "the name a is given twice"),
        (["--model", f"a={final}", "--nll", f"m={nll}", "--mcq", f"m={nll}", "--mcq", f"m={nll}"],
         "--mcq m="),
        (["--model", f"a={final}"], "nothing to evaluate on"),
        (["--model", f"a={final}", "--mcq", f"med/qa={nll}"],  # was 'file not found' for the whole NAME=FILE
         "--mcq[0].name=med/qa: a set name may hold only letters, digits"),
        # Accepted, and reported as `eval/gen eral_nll`.
        (["--model", f"a={final}", "--nll", f"gen eral={nll}"], f"--nll gen eral={nll}: a set name may hold only"),
        (["--model", f"a={tmp_path / 'nope'}", "--nll", f"m={nll}"], f"--model a={tmp_path / 'nope'}: no such file"),
        (["--model", f"a={tiny_run / 'stage1'}", "--nll", f"m={nll}"], "stage folder: pass one of its exports"),
    ]
    for flags, message in cases:
        code = main([*flags, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (flags, err)
    code = main(["--model", f"a={final}", "--nll", f"m={nll}", "--out", str(a_file)])
    assert code == 2 and f"--out {a_file}: it is a file" in capsys.readouterr().err
    code = main(["--model", f"a={final}", "--nll", f"m={nll}", "--out", str(a_file / "sub")])  # was NotADirectoryError
    assert code == 2 and f"--out {a_file / 'sub'}: {a_file} is a file" in capsys.readouterr().err
    assert a_file.read_text() == "kept" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--max_examples", "0"], "--max_examples 0: must be >= 1"),  # [:0]: a perfect NLL of 0 on nothing
    (["--max_examples", "-1"], "--max_examples -1: must be >= 1"),  # [:-1]: all but one example
    (["--max_length", "0"], "--max_length 0: must be >= 16 tokens"),
    (["--mcq_max_items", "-1"], "--mcq_max_items -1: must be >= 1, or 0 for every item"),
    (["--agreement_top_k", "0"], "--agreement_top_k 0: must be >= 1"),
    (["--device", "tpu"], "--device tpu: not a device torch knows; use cpu or cuda"),
    (["--device", "meta"], "--device meta: not a device this project runs on; use cpu or cuda"),
])
def test_sizes_and_devices_out_of_range_are_refused_before_loading(tmp_path, capsys, flags, message):
    code = main(["--model", "a=does/not/exist", "--nll", "m=x.jsonl", *flags, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_model_and_an_adapter_without_its_base_are_refused_before_loading(tmp_path, capsys):
    """A weights or text file was reported as "cannot load a tokenizer ... not a valid JSON file"; an adapter
    whose base_model_name_or_path is null was looked up on the hub as "None" (minutes of retries offline)."""
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, weights)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"w": torch.zeros(2)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    cases = [(weights, f"--model a={weights}: a file that is not a .gguf model; give the directory that holds the "
                       f"model"),
             (adapter, f"--model a={adapter}: a LoRA adapter whose {adapter / 'adapter_config.json'} names no base "
                       f"model (base_model_name_or_path is empty); set it to ")]
    for path, message in cases:
        code = main(["--model", f"a={path}", "--nll", "m=x.jsonl", "--out", str(tmp_path / "out"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {message}") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_bad_mcq_record_is_refused_before_the_teacher_loads(tokenizer, tmp_path, capsys, monkeypatch):
    """The MCQ files were read after the teacher had loaded (minutes for a large one)."""
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the MCQ sets were read")

    monkeypatch.setattr(evaluate_module, "check_model_path", lambda *args, **kwargs: None)
    monkeypatch.setattr(evaluate_module, "load_any_tokenizer", lambda *args, **kwargs: tokenizer)
    monkeypatch.setattr(evaluate_module, "load_model", no_model)
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text(json.dumps({"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "F"}) + "\n")
    code = main(["--model", "t=some/teacher", "--teacher", "t", "--mcq", f"x={mcq}", "--out", str(tmp_path / "out"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    # Named by the option as typed: the fix once said to point `--mcq[0]`, no flag one can type, at another file.
    assert code == 2 and err.startswith(f"error: --mcq x={mcq}: {mcq} line 1: mmlu field 'answer' names letter(s) "
                                        f"['F']"), err
    assert f"point --mcq x={mcq} at another one" in err


def test_cuda_without_a_gpu_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["--model", "a=does/not/exist", "--nll", "m=x.jsonl", "--device", "cuda", "--out", str(tmp_path)])
    assert code == 2 and "--device cuda: no CUDA GPU is visible; use --device cpu" in capsys.readouterr().err


def test_a_too_short_max_length_names_this_commands_option(tiny_run, tokenizer, tmp_path, capsys, monkeypatch):
    # The saved tokenizer is the fixture's: reading its 151k-token BPE back takes seconds.
    monkeypatch.setattr(evaluate_module, "load_any_tokenizer", lambda *args, **kwargs: tokenizer)
    code = main(["--model", f"a={tiny_run / 'stage1' / 'final'}", "--nll",
                 "m=package:qwen_distillation/data/demo/medical.jsonl", "--max_length", "16", "--device", "cpu",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--nll m: " in err and "raise --max_length" in err and "data.max_length" not in err, err


def test_a_runs_own_held_out_sets_score_as_the_run_scored_them(tiny_run, tmp_path, capsys):
    """--run OUTPUT_DIR scores the run's held-out sets (its data, split, data.max_length and
    data.max_eval_examples) under the names of its metrics: the last stage's export scores exactly what the
    run logged at its last step. Before, the split could not be rebuilt outside a run."""
    out = tmp_path / "eval"
    code = main(["--model", f"stage2={tiny_run / 'stage2' / 'final'}", "--run", str(tiny_run), "--out", str(out),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0 and "are not the run's" not in err, err  # the split is the run's (run_state.json's split_sha256)
    results = json.loads((out / "results.json").read_text())["stage2"]
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if row.get("stage") == 2 and "eval/general_nll" in row][-1]
    assert {"eval/general_nll", "eval/medical_nll"} <= set(results)
    for key in ("eval/general_nll", "eval/medical_nll"):
        assert results[key] == pytest.approx(logged[key], rel=1e-6, abs=1e-6), key

    # Refused before any model loads: a folder that holds no run, a data file changed since the run read it.
    code = main(["--model", f"a={tmp_path / 'nope'}", "--run", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2 and f"--run {tmp_path}: no config.yaml there" in capsys.readouterr().err
    moved = tmp_path / "copied_run"
    moved.mkdir()
    (moved / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    state = json.loads((tiny_run / "run_state.json").read_text())
    entry = sorted(state["data_sha256"])[0]
    state["data_sha256"][entry] = "0" * 64
    (moved / "run_state.json").write_text(json.dumps(state))
    code = main(["--model", f"a={tmp_path / 'nope'}", "--run", str(moved), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"--run {moved}: {entry} changed since the run read it" in err, err
    assert not (tmp_path / "o").exists()
    # Sets that are not the run's (here: another recorded split) are scored with a warning.
    state = json.loads((tiny_run / "run_state.json").read_text())
    state["split_sha256"] = "0" * 64
    (moved / "run_state.json").write_text(json.dumps(state))
    code = main(["--model", f"stage2={tiny_run / 'stage2' / 'final'}", "--run", str(moved), "--out",
                 str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0 and f"warning: --run {moved}: the held-out sets built here are not the run's" in err, err


def test_a_runs_topk_overlap_is_scored_with_its_own_k(tiny_run, tmp_path, capsys):
    """A run with eval.agreement_top_k=50 logs eval/<set>_topk_overlap over the top 50 tokens; the evaluate
    command always used k=5 (no option set it, --run did not read it), so the same key held another number."""
    teacher = tiny_run / "stage1" / "final"
    out = tmp_path / "run"
    run(compose_config(tiny_overrides(out, steps=1, evaluation=True) + [
        "end_stage=1", "eval.mcq=[]", "eval.samples=false", "eval.agreement_top_k=50",
        "model.teacher.random_init=null", f"model.teacher.path={teacher}"]))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    flags = ["--model", f"teacher={teacher}", "--teacher", "teacher", "--model", f"s={out / 'stage1' / 'final'}",
             "--run", str(out), "--device", "cpu"]
    assert main([*flags, "--out", str(tmp_path / "e1")]) == 0
    results = json.loads((tmp_path / "e1" / "results.json").read_text())["s"]
    for key in ("eval/general_topk_overlap", "eval/medical_topk_overlap", "eval/medical_top1_agreement"):
        assert results[key] == pytest.approx(logged[key], rel=1e-6, abs=1e-9), key
    # --agreement_top_k overrides it: k=5 is another number here.
    assert main([*flags, "--agreement_top_k", "5", "--out", str(tmp_path / "e2")]) == 0
    five = json.loads((tmp_path / "e2" / "results.json").read_text())["s"]
    assert five["eval/general_topk_overlap"] != pytest.approx(logged["eval/general_topk_overlap"], rel=1e-6)
    capsys.readouterr()


def test_the_settings_the_flags_leave_out_are_the_runs(tiny_run, tmp_path, monkeypatch):
    """With --run, BLEU/ROUGE were scored on 16 answers of 64 tokens and MCQ sets on 200 items whatever the
    run had scored (the demo preset: 4 answers of 32 tokens): the same metric names, other numbers. The
    flags left out now take the run's eval settings; a flag given wins; without --run, a run's defaults."""
    seen = []
    monkeypatch.setattr(evaluate_module, "evaluate", lambda models, **kwargs: seen.append(kwargs) or {})
    final = str(tiny_run / "stage2" / "final")
    assert main(["--model", f"s={final}", "--run", str(tiny_run), "--text_metrics", "--out", str(tmp_path / "a")]) == 0
    assert main(["--model", f"s={final}", "--run", str(tiny_run), "--text_metrics", "--max_new_tokens", "8",
                 "--mcq_max_items", "0", "--out", str(tmp_path / "b")]) == 0
    nll = "m=package:qwen_distillation/data/demo/medical.jsonl"
    assert main(["--model", f"s={final}", "--nll", nll, "--text_metrics", "--out", str(tmp_path / "c")]) == 0
    keys = ("text_metrics_max_examples", "max_new_tokens", "mcq_max_items", "agreement_top_k")
    assert [tuple(k[key] for key in keys) for k in seen] == [(4, 32, 200, 5), (4, 8, None, 5), (16, 64, 200, 5)]


def test_a_run_is_read_once(tiny_run, tmp_path, monkeypatch):
    """evaluate --run parsed the run's config.yaml three times and hashed its data files twice (the early check,
    the settings, the held-out sets); it reads both once and scores the same sets."""
    from qwen_distillation.data import generated

    parsed, hashed = [], []
    read_config, digest = evaluate_module.run_config, generated.file_digest
    monkeypatch.setattr(evaluate_module, "run_config", lambda run: parsed.append(run) or read_config(run))
    monkeypatch.setattr(generated, "file_digest", lambda path: hashed.append(path) or digest(path))
    out = tmp_path / "eval"
    assert main(["--model", f"s={tiny_run / 'stage2' / 'final'}", "--run", str(tiny_run), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert parsed == [str(tiny_run)]
    assert len(hashed) == len(set(hashed)) == 3  # the demo's three data files, once each
    assert {"eval/general_nll", "eval/medical_nll"} <= set(json.loads((out / "results.json").read_text())["s"])


def test_a_model_of_another_tokenizer_is_refused_before_any_model_loads(tiny_run, tokenizer, tmp_path, capsys,
                                                                        monkeypatch):
    """Every set is encoded with the teacher's tokenizer: a model of another one was scored on token ids of a
    vocabulary it does not have (NLL, agreement and MCQ numbers, silently meaningless)."""
    import copy

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<medterm>"])
    monkeypatch.setattr(evaluate_module, "load_any_tokenizer",
                        lambda name, *args, **kwargs: other if name == "b" else tokenizer)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the tokenizers were compared")

    monkeypatch.setattr(evaluate_module, "load_model", no_model)
    final = tiny_run / "stage1" / "final"
    code = main(["--model", f"a={final}", "--model", f"b={final}", "--teacher", "a", "--nll",
                 "m=package:qwen_distillation/data/demo/medical.jsonl", "--max_length", "96", "--device", "cpu",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --model b={final}: its tokenizer (151666 tokens) is not that of "
                                        f"--model a={final} (151665 tokens; e.g. [] vs [('<medterm>', 151665)])"), err
    assert not (tmp_path / "out").exists()


def test_a_model_with_fewer_logit_columns_than_the_tokenizer_is_a_clear_error(tiny_run, tokenizer, tmp_path, capsys,
                                                                               monkeypatch):
    """It crashed in the embedding lookup (IndexError: index out of range in self)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(small)
    monkeypatch.setattr(evaluate_module, "load_any_tokenizer", lambda *args, **kwargs: tokenizer)
    final = tiny_run / "stage1" / "final"
    code = main(["--model", f"t={final}", "--model", f"s={small}", "--teacher", "t", "--nll",
                 "m=package:qwen_distillation/data/demo/medical.jsonl", "--max_examples", "2", "--max_length", "96",
                 "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and (f"error: --model s={small}: the model has 1000 logit columns but the tokenizer that "
                          f"encodes the sets (of --model t={final}) has 151665 tokens") in err, err


def test_the_table_reads_zero_for_a_value_rounded_at_zero_from_below():
    """The KL of a model against itself came out as -1e-9 and was printed as -0.0000."""
    table = evaluate_module.to_markdown({"a": {"eval/kl": -1e-9, "eval/nll": 1.23456, "eval/mcq/x_items": 3},
                                         "b": {"eval/kl": -0.5, "eval/nll": float("nan")}})
    assert table.splitlines()[2:] == ["| a | 0.0000 | 3 | 1.2346 |", "| b | -0.5000 |  | nan |"]


def test_a_sweeps_folder_as_run_names_its_jobs(tmp_path):
    """`--run SWEEP` (a multirun's output_dir, which holds job0/, job1/, ... and multirun.yaml) said only "no
    config.yaml there; give a run's output_dir"."""
    from qwen_distillation.errors import ConfigError
    from qwen_distillation.evaluate import run_config

    for job in ("job0", "job1", "job10", "job2"):
        (tmp_path / job).mkdir()
        (tmp_path / job / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    with pytest.raises(ConfigError, match=rf"--run {tmp_path}: no config.yaml there; it is a sweep's folder: give one "
                                          rf"of its 4 jobs, e.g. --run {tmp_path / 'job0'}$"):
        run_config(str(tmp_path))
    with pytest.raises(ConfigError, match="give a run's output_dir"):
        run_config(str(tmp_path / "nothing"))
