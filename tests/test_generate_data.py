"""`python -m qwen_distillation.generate_data`: the teacher writes a dataset (sequence-level KD).

Most tests replace the teacher with a function of the prompt that returns chosen texts, so what
is kept, rejected, split or resumed is known exactly; the kill-and-resume test runs a tiny random
Qwen2 model (real Qwen tokenizer) through transformers ``generate`` with sampling."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import qwen_distillation.generate_data as generate_data
from conftest import REPO, SHARED_DATA, compose_config, tiny_overrides
from qwen_distillation.data.formats import detect_format
from qwen_distillation.data.encode import split_last_turn
from qwen_distillation.data.generated import (PROVENANCE, RunFiles, Sampling, append_rows, read_journal,
                                              split_reasoning)
from qwen_distillation.data.sources import build_domain_data, data_sources
from qwen_distillation.errors import ConfigError, DataError
from qwen_distillation.evaluation.generation import Completion, choose_backend
from qwen_distillation.evaluation.mcq import answer_letters
from qwen_distillation.evaluation.teacher_data import FORCED_CLOSE, generate_dataset, read_prompts

MEDMCQA = str(SHARED_DATA / "medical_eval" / "medmcqa_dev_eval_500.jsonl")
DEMO_MEDICAL = "package:qwen_distillation/data/demo/medical.jsonl"
IDENTITY = {"teacher": "fake", "sampling": "x"}
PROVENANCE_FIELDS = {"teacher", "source", "sampling", "reasoning", "source_row", "sample", "finished"}

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


def fake_teacher(tokenizer, answer):
    """A backend whose sample ``k`` of the prompt of source row ``row`` is ``answer(row, k, text)``
    (``text``: the decoded prompt); it records its calls."""
    calls = []

    def generate(prompts, rows, sampling):
        calls.append((list(rows), sampling))
        return [[Completion(*answer(row, k, tokenizer.decode(ids))) for k in range(sampling.num_samples)]
                for ids, row in zip(prompts, rows, strict=True)]

    generate.calls = calls
    return generate


def run(generate, tokenizer, prompts, out, *, fmt="alpaca", reasoning=False, num_samples=1, batch_size=2, **kw):
    return generate_dataset(generate, tokenizer, prompts, output=str(out), fmt=fmt,
                            sampling=Sampling(temperature=1.0, num_samples=num_samples, max_new_tokens=8),
                            reasoning=reasoning, batch_size=batch_size, identity=kw.pop("identity", IDENTITY),
                            provenance={"teacher": "fake", "source": "src", "sampling": {}, "reasoning": reasoning},
                            **kw)


@pytest.mark.parametrize("text,letters", [
    ("The answer is B", "B"), ("So the answer is (C).", "C"), ("Answer: A, C and D", "ACD"), ("答案是AC", "AC"),
    ("答案：B项", "B"), ("<think>A looks right</think>The answer is D.", "D"), ("B. Vitamin C", "B"),
    ("It is Heparin.", "C"), ("Answer: E", ""), ("The answer is b", ""), ("I think A or B", ""),
    ("The answer is Aspirin, surely", "A"),  # no letter after the phrase: the one quoted option
])
def test_answer_letters_reads_the_chosen_option(text, letters):
    options = {"A": "Aspirin", "B": "Vitamin C", "C": "Heparin", "D": "None of these"}
    assert answer_letters(text, options) == frozenset(letters)


@pytest.mark.parametrize("text,parts", [
    ("<think>\nstep 1\n</think>\n\nThe answer is B", ("step 1", "The answer is B")),
    ("no block at all", ("", "no block at all")),
    ("<think>\nstill thinking", ("still thinking", "")),
])
def test_split_reasoning(text, parts):
    assert split_reasoning(text) == parts


def test_journal_cuts_a_truncated_last_line_and_refuses_damage_before_it(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [{"x": i, PROVENANCE: {"source_row": i, "sample": 0}} for i in range(3)]
    append_rows(path, rows)
    with open(path, "a") as handle:
        handle.write('{"x": 3, "_prov')  # a write cut by a kill
    assert read_journal(path) == rows
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 3
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(DataError, match=r"g.jsonl line 1: not a row this command wrote"):
        read_journal(path)


def test_rejection_sampling_keeps_exactly_the_samples_that_name_the_gold(tokenizer, tmp_path):
    prompts, fmt = read_prompts(MEDMCQA, max_prompts=6)
    assert fmt == "medmcqa" and [p.row for p in prompts] == [1, 2, 3, 4, 5, 6]
    gold = {p.row: "".join(sorted(p.gold)) for p in prompts}
    wrong = {row: "ABCD"[("ABCD".index(letter) + 1) % 4] for row, letter in gold.items()}

    def answer(row, k, prompt):
        assert "The answer is X" in prompt  # the choice instruction reaches the teacher
        # the gold letter when row + k is odd, another letter when it is even; row 3's sample 0 names none
        if k == 0 and row == 3:
            return "I am not sure.", True
        return f"The answer is {gold[row] if (row + k) % 2 else wrong[row]}.", True

    summary = run(fake_teacher(tokenizer, answer), tokenizer, prompts, tmp_path / "g.jsonl", num_samples=2)
    kept = read_journal(tmp_path / "g.jsonl")
    expected = [(row, k) for row in range(1, 7) for k in range(2) if (row + k) % 2 and not (row == 3 and k == 0)]
    assert [(r[PROVENANCE]["source_row"], r[PROVENANCE]["sample"]) for r in kept] == expected
    assert all(r[PROVENANCE]["predicted"] == r[PROVENANCE]["gold"] == gold[r[PROVENANCE]["source_row"]]
               for r in kept)
    assert summary["kept"] == 5 and summary["samples"] == 12 and summary["keep_rate"] == pytest.approx(5 / 12)
    assert summary["rejected"] == {"truncated": 0, "empty_response": 0, "no_reasoning": 0, "no_answer": 1,
                                   "wrong_answer": 6, "duplicate": 0}
    assert summary["answered_correctly"] == 5 and summary["prompts_done"] == 6
    manifest = json.loads((tmp_path / "g.jsonl.manifest").read_text())
    assert manifest["summary"] == summary and manifest["identity"] == IDENTITY
    # The stored question is the lettered question alone: the instruction is not part of the data.
    assert kept[0]["instruction"] == prompts[0].messages[0]["content"]
    assert "The answer is X" not in kept[0]["instruction"]
    assert set(kept[0]) == {"instruction", "input", "output", PROVENANCE}
    assert set(kept[0][PROVENANCE]) == PROVENANCE_FIELDS | {"gold", "predicted"}


def test_reasoning_splits_into_cot_and_response_and_forces_unfinished_answers(tokenizer, tmp_path):
    prompts, _ = read_prompts(MEDMCQA, max_prompts=3)
    gold = {p.row: "".join(sorted(p.gold)) for p in prompts}

    def answer(row, k, prompt):
        if prompt.endswith(FORCED_CLOSE):  # the forced answer after a block left open
            return f"The answer is {gold[row]}.", True
        assert prompt.endswith("<|im_start|>assistant\n<think>\n") and "inside <think> and </think>" in prompt
        if row == 1:
            return f"Recall the physiology.\n</think>\n\nThe answer is {gold[row]}.", True
        if row == 2:
            return "Thinking without end", False  # cut at max_new_tokens inside the block
        return "</think>The answer is A.", True  # row 3: an empty block

    teacher = fake_teacher(tokenizer, answer)
    summary = run(teacher, tokenizer, prompts, tmp_path / "g.jsonl", fmt="medical_o1", reasoning=True, batch_size=3)
    kept = read_journal(tmp_path / "g.jsonl")
    assert [set(row) for row in kept] == [{"Question", "Complex_CoT", "Response", PROVENANCE}] * 2
    assert [(r["Complex_CoT"], r["Response"]) for r in kept] == [
        ("Recall the physiology.", f"The answer is {gold[1]}."), ("Thinking without end", f"The answer is {gold[2]}.")]
    assert [r[PROVENANCE].get("answer_forced", False) for r in kept] == [False, True]
    assert summary["rejected"]["no_reasoning"] == 1  # row 3: medical_o1 needs the reasoning
    # One call for the batch, one for the forced answer (one sample, --answer_tokens new tokens).
    assert [(rows, s.num_samples, s.max_new_tokens) for rows, s in teacher.calls] == [([1, 2, 3], 1, 8), ([2], 1, 128)]


def test_a_resumed_run_skips_what_is_written_and_drops_duplicate_rows(tokenizer, tmp_path):
    prompts, _ = read_prompts(DEMO_MEDICAL, max_prompts=5)

    def answer(row, k, prompt):
        return ("Same answer." if row == 2 else f"Answer {row}.{k}"), True  # row 2: both samples identical

    full = run(fake_teacher(tokenizer, answer), tokenizer, prompts, tmp_path / "full.jsonl", num_samples=2)
    assert full["kept"] == 9 and full["rejected"]["duplicate"] == 1
    # Killed after two batches, the last row's write cut in half:
    calls = []

    def dying(row, k, prompt):
        if len(calls) == 2 * 2 * 2:  # 2 batches x 2 prompts x 2 samples
            raise KeyboardInterrupt
        calls.append(row)
        return answer(row, k, prompt)

    with pytest.raises(KeyboardInterrupt):
        run(fake_teacher(tokenizer, dying), tokenizer, prompts, tmp_path / "part.jsonl", num_samples=2)
    text = (tmp_path / "part.jsonl").read_text()
    (tmp_path / "part.jsonl").write_text(text[:-40])
    teacher = fake_teacher(tokenizer, answer)
    resumed = run(teacher, tokenizer, prompts, tmp_path / "part.jsonl", num_samples=2)
    # Only the batch with the cut row and the batch never started are generated again.
    assert [rows for rows, _ in teacher.calls] == [[3, 4], [5]]
    assert (tmp_path / "part.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    assert resumed == full
    rejected = read_journal(RunFiles.of(tmp_path / "part.jsonl").rejected)
    keys = [(r[PROVENANCE]["source_row"], r[PROVENANCE]["sample"]) for r in
            read_journal(tmp_path / "part.jsonl") + rejected]
    assert len(keys) == len(set(keys)) == 10
    # A third run has nothing left to do.
    again = fake_teacher(tokenizer, answer)
    assert run(again, tokenizer, prompts, tmp_path / "part.jsonl", num_samples=2) == full and again.calls == []


def test_a_rerun_asking_for_fewer_prompts_counts_them_and_names_what_else_the_output_holds(tokenizer, tmp_path,
                                                                                            caplog):
    """Run over 5 prompts, then again with --max_prompts 2: it reported 'prompts 5/2' and kept the other rows
    without a word. It now counts the prompts asked for and warns that the others' rows stay in the file."""
    teacher = fake_teacher(tokenizer, lambda row, k, prompt: (f"Answer {row}.{k}", True))
    run(teacher, tokenizer, read_prompts(DEMO_MEDICAL, max_prompts=5)[0], tmp_path / "g.jsonl", num_samples=2)
    fewer, _ = read_prompts(DEMO_MEDICAL, max_prompts=2)
    with caplog.at_level("WARNING"):
        summary = run(teacher, tokenizer, fewer, tmp_path / "g.jsonl", num_samples=2)
    assert (summary["prompts"], summary["prompts_done"], summary["other_prompts"], summary["kept"]) == (2, 2, 3, 10)
    assert "also holds the answers to 3 prompt(s) not asked for this time" in caplog.text
    assert "pass --overwrite to generate only these 2 prompt(s)" in caplog.text
    from qwen_distillation.generate_data import describe
    assert describe(summary).startswith("prompts 2/2: kept 10 of 10 samples")
    assert "the output also holds 3 other prompt(s)' samples, counted here" in describe(summary)
    assert "other_prompts" not in run(teacher, tokenizer, fewer, tmp_path / "g.jsonl", num_samples=2, overwrite=True)


def test_other_settings_over_an_existing_output_are_refused_unless_overwrite(tokenizer, tmp_path):
    prompts, _ = read_prompts(DEMO_MEDICAL, max_prompts=2)
    teacher = fake_teacher(tokenizer, lambda row, k, prompt: ("An answer.", True))
    run(teacher, tokenizer, prompts, tmp_path / "g.jsonl")
    other = {"teacher": "fake", "sampling": "y"}
    with pytest.raises(ConfigError, match=r"was generated with other settings \(sampling: 'x' -> 'y'\).*--overwrite"):
        run(teacher, tokenizer, prompts, tmp_path / "g.jsonl", identity=other)
    assert run(teacher, tokenizer, prompts, tmp_path / "g.jsonl", identity=other, overwrite=True)["kept"] == 2
    RunFiles.of(tmp_path / "g.jsonl").manifest.unlink()
    with pytest.raises(ConfigError, match="exists without its manifest"):
        run(teacher, tokenizer, prompts, tmp_path / "g.jsonl", identity=other)


@pytest.mark.parametrize("fmt,expected", [
    ("medical_o1", "<think>Because of X.</think>The answer is B.<|im_end|>"),
    ("alpaca", "<think>Because of X.</think>The answer is B.<|im_end|>"),
])
def test_the_generated_file_loads_as_a_training_source(tokenizer, tmp_path, fmt, expected):
    prompts, _ = read_prompts(DEMO_MEDICAL, max_prompts=3)
    teacher = fake_teacher(tokenizer, lambda row, k, prompt: ("Because of X.\n</think>\n\nThe answer is B.", True))
    out = tmp_path / "generated.jsonl"
    run(teacher, tokenizer, prompts, out, fmt=fmt, reasoning=True)
    rows = read_journal(out)
    assert detect_format(rows[0], str(out)) == fmt
    config = compose_config(tiny_overrides(tmp_path) + [f"data.medical=[{out}]"])
    data = build_domain_data(data_sources(config.data), tokenizer, max_length=256, eval_fraction=0.0,
                             max_eval_examples=0, seed=0)
    assert len(data.medical) == 3
    example = data.medical[0]
    response = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(response) == expected
    assert prompts[0].messages[-1]["content"] in tokenizer.decode(example["input_ids"])


def test_the_held_out_split_keeps_every_sample_of_a_prompt_on_one_side(tokenizer, tmp_path):
    prompts, _ = read_prompts(DEMO_MEDICAL, max_prompts=20)
    teacher = fake_teacher(tokenizer, lambda row, k, prompt: (f"Answer {k} to row {row}.", True))
    out = tmp_path / "teacher.jsonl"
    run(teacher, tokenizer, prompts, out, num_samples=2)
    config = compose_config(tiny_overrides(tmp_path) + [f"data.medical=[{out}]"])
    for seed in range(3):
        data = build_domain_data(data_sources(config.data), tokenizer, max_length=256, eval_fraction=0.25,
                                 max_eval_examples=100, seed=seed)
        heldout = data.eval_sets["medical"]
        assert len(data.medical) + len(heldout) == 40 and len(heldout) == 10  # 5 whole prompts of 2 samples
        prompt = lambda e: tuple(split_last_turn(e)[0])  # noqa: E731
        assert not {prompt(e) for e in heldout} & {prompt(e) for e in data.medical}, seed
    rows = read_journal(out)  # line n of the file is example index n
    assert all(e["group"] == f"src\0{rows[e['index'] - 1][PROVENANCE]['source_row']}" for e in data.medical)


def test_held_out_examples_past_the_domain_cap_are_counted_in_a_warning(tokenizer, tmp_path, caplog):
    # The demo's two medical sources hold out 6 and 2 examples (eval_fraction 0.1); a cap of 5 makes that 5 and
    # 2 (each source's split is capped too), of which the domain's set keeps 5.
    config = compose_config(tiny_overrides(tmp_path))
    with caplog.at_level("WARNING", logger="qwen_distillation.data.sources"):
        data = build_domain_data(data_sources(config.data), tokenizer, max_length=256, eval_fraction=0.1,
                                 max_eval_examples=5, seed=0)
    assert len(data.eval_sets["medical"]) == 5 and len(data.medical) == 64 + 24 - 7
    assert "data.medical: its sources hold out 7 examples, over data.max_eval_examples=5; the 2 past it" in caplog.text
    assert "data.general" not in caplog.text  # 6 held out of 64, under the cap
    caplog.clear()
    with caplog.at_level("WARNING", logger="qwen_distillation.data.sources"):
        build_domain_data(data_sources(config.data), tokenizer, max_length=256, eval_fraction=0.1,
                          max_eval_examples=8, seed=0)
    assert "hold out" not in caplog.text


def test_bad_inputs_name_the_file_and_the_fix(tmp_path, capsys):
    def error(*flags):
        assert generate_data.main(["--teacher", "does/not/exist", *flags]) == 2
        return capsys.readouterr().err

    assert "--output g.json: must end in .jsonl" in error("--data", DEMO_MEDICAL, "--output", "g.json")
    assert "no_such.jsonl: file not found" in error("--data", str(tmp_path / "no_such.jsonl"),
                                                    "--output", str(tmp_path / "g.jsonl"))
    assert "--num_samples 2: greedy decoding" in error("--data", DEMO_MEDICAL, "--output", str(tmp_path / "g.jsonl"),
                                                       "--temperature", "0", "--num_samples", "2")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                                  {"from": "human", "value": "Headache?"}]}) + "\n")
    assert "--format medical_o1 holds one question per row, but source row 1" in error(
        "--data", str(chat), "--output", str(tmp_path / "g.jsonl"), "--reasoning")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 7}) + "\n")
    assert "bad.jsonl line 1: medmcqa field 'cop' is 7" in error("--data", str(bad),
                                                                 "--output", str(tmp_path / "g.jsonl"))
    assert "--backend vllm: vLLM is not installed" in error("--data", DEMO_MEDICAL, "--output",
                                                            str(tmp_path / "g.jsonl"), "--backend", "vllm")
    assert choose_backend("auto", "does/not/exist") == "transformers"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tokenizer):
    """A random 2-layer Qwen2 model for the real Qwen tokenizer, saved as a model directory."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("teacher")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_a_killed_sampling_run_resumes_to_the_uninterrupted_result(tiny_teacher, tokenizer, tmp_path, monkeypatch,
                                                                     capsys):
    # The saved tokenizer is the fixture's: reading its 151k-token BPE back takes seconds.
    monkeypatch.setattr(generate_data, "load_any_tokenizer", lambda *args, **kwargs: tokenizer)

    def command(out, *extra):
        return ["--teacher", str(tiny_teacher), "--data", DEMO_MEDICAL, "--max_prompts", "4", "--output", str(out),
                "--reasoning", "--format", "alpaca", "--num_samples", "2", "--temperature", "1.0", "--top_p", "1.0",
                "--max_new_tokens", "3", "--answer_tokens", "2", "--keep_truncated", "--batch_size", "2",
                "--device", "cpu", *extra]

    assert generate_data.main(command(tmp_path / "full.jsonl")) == 0
    full = read_journal(tmp_path / "full.jsonl")
    # 3 random tokens never close the block: every answer is forced; no two samples are alike.
    assert len(full) == 8 and all(row[PROVENANCE]["answer_forced"] for row in full)
    assert len({row["output"] for row in full}) == 8

    real = generate_data.transformers_generate

    def dies_on_the_third_call(model, tokenizer):
        generate, calls = real(model, tokenizer), []

        def counted(*args):
            calls.append(1)
            if len(calls) == 3:  # batch 2's samples: batch 1 (a sampling and a forcing call) is written
                raise KeyboardInterrupt
            return generate(*args)
        return counted

    monkeypatch.setattr(generate_data, "transformers_generate", dies_on_the_third_call)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line, not a traceback
        generate_data.main(command(tmp_path / "part.jsonl"))
    assert stopped.value.code == 130
    assert f"interrupted: the rows written so far are kept in {tmp_path / 'part.jsonl'}; rerun the same command" \
        in capsys.readouterr().err
    assert len(read_journal(tmp_path / "part.jsonl")) == 4
    monkeypatch.setattr(generate_data, "transformers_generate", real)
    assert generate_data.main(command(tmp_path / "part.jsonl")) == 0
    assert (tmp_path / "part.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    summary = json.loads((tmp_path / "part.jsonl.manifest").read_text())["summary"]
    assert summary == json.loads((tmp_path / "full.jsonl.manifest").read_text())["summary"]
    assert summary["samples"] == summary["kept"] == 8 and summary["prompts_done"] == 4
    # The same output with another temperature is refused before the teacher loads.
    assert generate_data.main(command(tmp_path / "part.jsonl", "--temperature", "0.5")) == 2
    # So is the teacher with another chat template (a system prompt edited): a resumed run mixed prompts of both.
    monkeypatch.setattr(tokenizer, "chat_template", tokenizer.chat_template.replace("You are", "You were"))
    assert generate_data.main(command(tmp_path / "part.jsonl", "--max_prompts", "6")) == 2
    assert "other settings (teacher_tokenizer: " in capsys.readouterr().err


def test_the_vllm_backend_passes_token_prompts_and_per_row_seeds(monkeypatch):
    """vLLM is not installed here: a stand-in module records what the backend asks of its API
    (``LLM(model, dtype, seed)``, ``generate([{"prompt_token_ids"}], [SamplingParams per row])``)."""
    import sys
    import types

    from qwen_distillation.evaluation.generation import draw_seed, vllm_generate

    calls = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls["engine"] = kwargs

        def generate(self, prompts, params, use_tqdm=True):
            calls["prompts"], calls["params"] = prompts, [p.kwargs for p in params]
            sample = types.SimpleNamespace
            return [types.SimpleNamespace(outputs=[sample(text=f" answer {i} ", finish_reason="stop"),
                                                   sample(text="cut", finish_reason="length")])
                    for i in range(len(prompts))]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    generate = vllm_generate("/models/teacher", seed=7)
    assert calls["engine"] == {"model": "/models/teacher", "dtype": "auto", "seed": 7}
    out = generate([[1, 2, 3], [4]], [5, 9], Sampling(temperature=0.0, top_p=0.9, max_new_tokens=12, num_samples=2,
                                                      seed=3))
    assert calls["prompts"] == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    assert [p["seed"] for p in calls["params"]] == [draw_seed(3, 5), draw_seed(3, 9)]
    assert all(p["n"] == 2 and p["max_tokens"] == 12 and p["temperature"] == 0.0 and p["top_p"] == 1.0
               for p in calls["params"])
    assert out == [[Completion("answer 0", True), Completion("cut", False)],
                   [Completion("answer 1", True), Completion("cut", False)]]


def test_the_output_may_not_be_the_input_file(tmp_path, capsys):
    """--output naming the --data file (itself, through a symlink or another spelling) would
    replace the input: refused, and the input is left as it was."""
    data = tmp_path / "in.jsonl"
    data.write_text((REPO / "qwen_distillation" / "data" / "demo" / "medical.jsonl").read_text())
    before = data.read_text()
    (tmp_path / "link.jsonl").symlink_to(data)
    (tmp_path / "sub").mkdir()
    for output in (data, tmp_path / "link.jsonl", tmp_path / "sub" / ".." / "in.jsonl"):
        code = generate_data.main(["--teacher", "does/not/exist", "--data", str(data), "--output", str(output),
                                   "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and f"--output {output}: is the input file given by --data; choose another --output" in err
    assert data.read_text() == before


@pytest.mark.parametrize("which", ["", ".manifest"])
def test_an_output_that_is_a_directory_is_refused_before_the_teacher_loads(tmp_path, capsys, which):
    """An existing directory named like the output (or the manifest beside it): the refusal said to pass
    --overwrite, which then failed with IsADirectoryError after the teacher had loaded."""
    data = tmp_path / "in.jsonl"
    data.write_text((REPO / "qwen_distillation" / "data" / "demo" / "medical.jsonl").read_text())
    output = tmp_path / "x.jsonl"
    (tmp_path / f"x.jsonl{which}").mkdir()
    for extra in ([], ["--overwrite"]):
        code = generate_data.main(["--teacher", "does/not/exist", "--data", str(data), "--output", str(output),
                                   *extra])
        err = capsys.readouterr().err
        expected = (f"is a directory, and --output names the JSON Lines file to write; give a file path (e.g. "
                    f"--output {output / 'teacher_data.jsonl'})" if not which else
                    f"the run writes {output}{which} beside it, and that is a directory; move it away or choose "
                    f"another --output")
        assert code == 2 and err.strip() == f"error: --output {output}: {expected}", err
    assert (tmp_path / f"x.jsonl{which}").is_dir()


def test_an_output_below_a_file_is_refused_before_the_teacher_loads(tmp_path, capsys):
    """--output in a "directory" that is a file: a FileExistsError traceback once the teacher had loaded."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    for output in (a_file / "g.jsonl", a_file / "sub" / "g.jsonl"):
        code = generate_data.main(["--teacher", "does/not/exist", "--data", DEMO_MEDICAL, "--output", str(output)])
        err = capsys.readouterr().err
        assert code == 2 and err.strip() == (f"error: --output {output}: {a_file} is a file, not a directory; choose "
                                             f"an --output in a directory"), err
    assert a_file.read_text() == "kept"


def test_the_output_may_not_lie_inside_a_data_directory(tmp_path, capsys):
    """--output inside the --data directory: a rerun failed with "generated with other settings
    (source_sha256...)", and with --overwrite read the teacher's earlier answers as prompts."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.jsonl").write_text((REPO / "qwen_distillation" / "data" / "demo" / "medical.jsonl").read_text())
    for output in (data / "out.jsonl", data / "sub" / "out.jsonl"):
        code = generate_data.main(["--teacher", "does/not/exist", "--data", str(data), "--output", str(output),
                                   "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and f"--output {output} lies inside --data={data}, a directory read as data" in err, err
    assert sorted(p.name for p in data.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("teacher", ["/no/such/teacher", "./no_such_teacher", "~/no_such_teacher_dir"])
def test_a_missing_local_teacher_is_refused_before_loading(tmp_path, capsys, teacher):
    code = generate_data.main(["--teacher", teacher, "--data", DEMO_MEDICAL, "--output", str(tmp_path / "g.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "--teacher=" in err and "no such file or directory" in err and "Repo id" not in err, err


@pytest.mark.parametrize("device,message", [
    ("tpu", "--device tpu: not a device torch knows; use cpu or cuda"),
    ("cuda", "--device cuda: no CUDA GPU is visible; use --device cpu"),
])
def test_a_device_that_is_not_there_is_refused_before_loading(tmp_path, capsys, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = generate_data.main(["--teacher", "does/not/exist", "--data", DEMO_MEDICAL, "--device", device,
                               "--output", str(tmp_path / "g.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("reject", [False, True], ids=["all_kept", "one_rejected"])
def test_the_last_line_names_only_the_files_written(tmp_path, capsys, monkeypatch, tokenizer, reject):
    """`wrote ...` lists OUTPUT.rejected only when a sample was rejected (no such file otherwise)."""
    def answer(row, k, prompt):
        return ("" if reject and row == 1 else f"Answer to row {row}."), True  # "": rejected, empty_response

    monkeypatch.setattr(generate_data, "check_model_path", lambda *args, **kwargs: None)
    monkeypatch.setattr(generate_data, "load_any_tokenizer", lambda *args, **kwargs: tokenizer)
    monkeypatch.setattr(generate_data, "load_model", lambda *args, **kwargs: torch.nn.Identity())
    monkeypatch.setattr(generate_data, "transformers_generate", lambda model, tok: fake_teacher(tok, answer))
    out = tmp_path / "g.jsonl"
    assert generate_data.main(["--teacher", "fake/teacher", "--data", DEMO_MEDICAL, "--max_prompts", "2",
                               "--output", str(out), "--backend", "transformers", "--device", "cpu"]) == 0
    files = RunFiles.of(out)
    written = [files.output, files.rejected, files.manifest] if reject else [files.output, files.manifest]
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {', '.join(map(str, written))}"
    assert sorted(tmp_path.iterdir()) == sorted(written)


def _fake_model_dir(directory, weights: bytes):
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def test_a_resumed_output_refuses_other_weights_at_the_teachers_path(tmp_path, capsys, monkeypatch, tokenizer):
    """--teacher names a directory whose model was replaced (same path, same sizes, other weights): the
    output was resumed with the new teacher's samples appended to the old one's."""
    monkeypatch.setattr(generate_data, "check_model_path", lambda *args, **kwargs: None)
    monkeypatch.setattr(generate_data, "load_any_tokenizer", lambda *args, **kwargs: tokenizer)
    monkeypatch.setattr(generate_data, "load_model", lambda *args, **kwargs: torch.nn.Identity())
    monkeypatch.setattr(generate_data, "transformers_generate",
                        lambda model, tok: fake_teacher(tok, lambda row, k, prompt: (f"Answer {row}.", True)))
    teacher, out = _fake_model_dir(tmp_path / "teacher", b"\1" * 4096), tmp_path / "g.jsonl"
    command = ["--teacher", str(teacher), "--data", DEMO_MEDICAL, "--max_prompts", "2", "--output", str(out),
               "--device", "cpu", "--backend", "transformers"]
    assert generate_data.main(command) == 0
    manifest = json.loads(RunFiles.of(out).manifest.read_text())
    assert manifest["identity"]["teacher_fingerprint"]
    before = out.read_text()
    _fake_model_dir(teacher, b"\2" * 4096)
    assert generate_data.main(command) == 2
    err = capsys.readouterr().err
    assert f"teacher weights: {teacher} now holds other weights" in err and "original teacher" in err, err
    assert out.read_text() == before
    # The original weights back: the same teacher, resumed. An output written before fingerprints were
    # recorded is not refused for lacking one.
    _fake_model_dir(teacher, b"\1" * 4096)
    assert generate_data.main(command) == 0
    del manifest["identity"]["teacher_fingerprint"]
    RunFiles.of(out).manifest.write_text(json.dumps(manifest))
    assert generate_data.main(command) == 0
    assert out.read_text() == before


def test_the_model_fingerprint_samples_the_weights_and_ignores_the_path(tmp_path, monkeypatch):
    """What model_fingerprint reads: config and weight files, whole when small, else evenly spaced
    windows (a change no window reads goes unseen); not the path, nor other files; None for a hub id."""
    import shutil

    import qwen_distillation.data.generated as generated

    model = _fake_model_dir(tmp_path / "a", bytes(range(256)) * 64)
    (model / "tokenizer.json").write_text("{}")
    first = generated.model_fingerprint(str(model))
    shutil.copytree(model, tmp_path / "b")
    assert generated.model_fingerprint(str(tmp_path / "b")) == first  # the same model at another path
    (tmp_path / "b" / "tokenizer.json").write_text('{"x": 1}')
    assert generated.model_fingerprint(str(tmp_path / "b")) == first  # the tokenizer is not the weights
    (tmp_path / "b" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert generated.model_fingerprint(str(tmp_path / "b")) != first
    assert generated.model_fingerprint("Qwen/Qwen2.5-7B-Instruct") is None
    (model / "model.safetensors").unlink()
    assert generated.model_fingerprint(str(model)) is None  # no weights: nothing to tell apart

    # A large file (a .gguf, by path or as gguf_file): 4 windows of 16 bytes over 1000 bytes.
    monkeypatch.setattr(generated, "FINGERPRINT_WINDOWS", 4)
    monkeypatch.setattr(generated, "FINGERPRINT_WINDOW", 16)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(bytes(1000))
    sampled = generated.model_fingerprint(str(gguf))
    assert generated.model_fingerprint(str(tmp_path), "m.gguf") == sampled
    for offset, seen in ((0, True), (500, False), (328, True), (990, True)):  # windows at 0, 328, 656, 984
        data = bytearray(1000)
        data[offset] = 1
        gguf.write_bytes(bytes(data))
        assert (generated.model_fingerprint(str(gguf)) != sampled) == seen, offset


def test_a_prompt_directory_of_several_formats_is_refused_naming_both_files(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_qa.jsonl").write_text(json.dumps({"Question": "What is 1+1?", "Answer": "2"}) + "\n")
    (folder / "b_mmlu.jsonl").write_text(json.dumps({"question": "q", "A": "a", "B": "b", "C": "c", "D": "d",
                                                     "answer": "A"}) + "\n")
    with pytest.raises(DataError, match=r"a_qa\.jsonl holds question_answer records and .*b_mmlu\.jsonl holds mmlu"):
        read_prompts(str(folder))
