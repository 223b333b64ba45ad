"""Depth pruning by measured importance (ShortGPT's Block Influence, calibration perplexity), the
slim-down config and the ``python -m qwen_distillation.prune`` command, on tiny random models."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from qwen_distillation.data.encode import IGNORE_INDEX
from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.depth import (block_influence, choose_layers, keep_highest, perplexity_scores,
                                              response_nll)
from qwen_distillation.modeling.loading import slim_down
from tests.conftest import REPO, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 5


def _model(kind: str = "llama", layers: int = LAYERS):
    torch.manual_seed(0)
    config_class = LlamaConfig if kind == "llama" else Qwen2Config
    config = config_class(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config).eval()


def _batches(pad_rows: bool = True):
    """Two right-padded micro-batches with prompt tokens masked out of the labels."""
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ((9, 6), (7, 7)):
        length = max(lengths)
        ids = torch.randint(1, 97, (2, length), generator=g)
        mask = torch.zeros(2, length, dtype=torch.long)
        labels = torch.full((2, length), IGNORE_INDEX)
        for row, n in enumerate(lengths):
            mask[row, :n] = 1
            labels[row, 3:n] = ids[row, 3:n]
            ids[row, n:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _hand_block_influence(model, batches):
    """1 - mean cos(layer input, layer output) over non-padding tokens, from output_hidden_states
    (entry i is layer i's input; the last entry has the final norm applied, so the last layer's
    output is taken before it by running the layers by hand)."""
    layers = model.model.layers
    sums, count = torch.zeros(len(layers), dtype=torch.float64), 0
    for batch in batches:
        with torch.no_grad():
            states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True, use_cache=False).hidden_states
            last = []
            handle = layers[-1].register_forward_hook(lambda m, a, o: last.append(o))
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            handle.remove()
        outputs = list(states[1:len(layers)]) + [last[0]]
        mask = batch["attention_mask"].bool()
        for i in range(len(layers)):
            cos = torch.nn.functional.cosine_similarity(states[i].float(), outputs[i].float(), dim=-1)
            sums[i] += cos[mask].double().sum()
        count += int(mask.sum())
    return [1 - float(s) / count for s in sums]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_block_influence_equals_a_hand_computation(kind):
    model = _model(kind)
    scores = block_influence(model, _batches())
    assert scores == pytest.approx(_hand_block_influence(model, _batches()), abs=1e-6)
    assert all(0 < s < 2 for s in scores)


def test_block_influence_ignores_padding():
    model = _model()
    batches = _batches()
    padded = []
    for batch in batches:  # three more padding columns, with tokens the model would otherwise read
        extra = {"input_ids": torch.randint(1, 97, (2, 3)), "attention_mask": torch.zeros(2, 3, dtype=torch.long),
                 "labels": torch.full((2, 3), IGNORE_INDEX)}
        padded.append({k: torch.cat([batch[k], extra[k]], dim=1) for k in batch})
    assert block_influence(model, padded) == pytest.approx(block_influence(model, batches), abs=1e-6)


def test_perplexity_single_scores_are_the_nll_of_the_model_without_that_layer():
    model = _model()
    batches = _batches()
    kept, scores = perplexity_scores(model, batches, keep=3, search="single")
    for i in range(LAYERS):
        without, _ = slim_down(model, LAYERS - 1, torch.float32, layers=[j for j in range(LAYERS) if j != i])
        assert scores[i] == pytest.approx(response_nll(without.eval(), batches), rel=1e-5)
    assert kept == keep_highest(scores, 3)
    assert len(model.model.layers) == LAYERS  # the teacher is left whole


def test_perplexity_greedy_removes_the_cheapest_layer_each_round():
    model = _model()
    batches = _batches()
    kept, scores = perplexity_scores(model, batches, keep=3, search="greedy")
    removed = [i for i in range(LAYERS) if i not in kept]
    assert len(kept) == 3 and all(scores[i] is None for i in kept)
    _, single = perplexity_scores(model, batches, keep=3, search="single")
    first = min(range(LAYERS), key=lambda i: (single[i], i))
    assert first in removed and scores[first] == pytest.approx(single[first], rel=1e-6)
    second = next(i for i in removed if i != first)
    both, _ = slim_down(model, 3, torch.float32, layers=kept)
    assert scores[second] == pytest.approx(response_nll(both.eval(), batches), rel=1e-5)


def test_keep_highest_breaks_ties_towards_the_lower_layer():
    assert keep_highest([0.5, 0.2, 0.5, 0.5, 0.1], 2) == [0, 2]
    assert keep_highest([3.0, 1.0, 2.0], 3) == [0, 1, 2]


def test_choose_layers_even_needs_no_data_and_refuses_a_bad_keep():
    model = _model(layers=30)
    assert choose_layers(model, 15, "even", None) == ([0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29], None)
    with pytest.raises(ConfigError, match="keep_layers=31"):
        choose_layers(model, 31, "block_influence", _batches())
    with pytest.raises(ConfigError, match="prune.method=magnitude"):
        choose_layers(model, 3, "magnitude", _batches())


def test_slim_down_keeps_the_chosen_layers():
    model = _model()
    student, kept = slim_down(model, 2, torch.float32, layers=[3, 1])
    assert kept == [1, 3] and student.config.num_hidden_layers == 2
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    with pytest.raises(ConfigError, match="keep_layers=2"):
        slim_down(model, 2, torch.float32, layers=[1, 1])


# ------------------------------------------------------------------ config, calibration, command
PRUNE_RUN = ["model=tiny_qwen2", "model.student.random_init=null", "data=demo", "data.max_length=96",
             "model.student.prune.calibration.num_examples=6", "model.student.prune.calibration.batch_size=3",
             "train.device=cpu"]


def _validated(overrides):
    from qwen_distillation.config.validate import validate_config

    return validate_config(compose_config(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["model.student.prune.method=block_influence"], "model.student.prune.method=block_influence: chooses which"),
    (["model.student.keep_layers=2", "model.student.prune.method=shortgpt"], "model.student.prune.method=shortgpt"),
    (["model.student.keep_layers=2", "model.student.prune.perplexity_search=beam"], "perplexity_search=beam"),
    (["model.student.prune.width.hidden_size=0"], "model.student.prune.width.hidden_size=0"),
    (["model.student.keep_layers=2", "model.student.prune.calibration.num_examples=0"], "calibration.num_examples"),
    (["model.teacher.prune.method=perplexity"], "model.teacher.prune"),
])
def test_bad_pruning_options_are_refused_naming_them(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        _validated(["model=tiny_qwen2", "model.student.random_init=null"] + overrides)


def test_pruning_a_student_that_is_loaded_from_elsewhere_is_refused():
    with pytest.raises(ConfigError, match="model.student.random_init"):
        _validated(["model=tiny_qwen2", "model.student.keep_layers=2"])
    # The fix named the keys that were set (it said `model.student.keep_layers=null` for a width target alone).
    with pytest.raises(ConfigError, match=re.escape(
            "model.student.path=some/model: is set, but model.student.prune.width.hidden_size builds the student "
            "from the teacher (override it, e.g. `model.student.prune.width.hidden_size=null to use "
            "model.student.path, or model.student.path=null to prune the teacher`)")):
        _validated(["model=tiny_qwen2", "model.student.random_init=null", "model.student.path=some/model",
                    "model.student.prune.width.hidden_size=32"])
    # A method without keep_layers: keep_layers=15 led to the error above when the student is loaded.
    with pytest.raises(ConfigError, match=re.escape("`model.student.prune.method=even (the student is "
                                                    "model.student.path, not pruned from the teacher)`")):
        _validated(["model=tiny_qwen2", "model.student.random_init=null", "model.student.path=some/model",
                    "model.student.prune.method=block_influence"])


def test_calibration_draws_training_examples_of_both_domains_by_seed(tokenizer):
    from qwen_distillation.data.sources import build_domain_data, data_sources
    from qwen_distillation.modeling.prune import calibration_examples

    cfg = _validated(PRUNE_RUN + ["model.student.keep_layers=2"])
    calibration = cfg.model.student.prune.calibration
    first = calibration_examples(calibration, cfg.data, tokenizer, seed=1)
    assert [e["input_ids"] for e in first] == [e["input_ids"] for e in
                                               calibration_examples(calibration, cfg.data, tokenizer, seed=1)]
    other = calibration_examples(calibration, cfg.data, tokenizer, seed=2)
    assert [e["input_ids"] for e in first] != [e["input_ids"] for e in other]
    assert len(first) == 6 and sorted(e["domain"] for e in first) == [0, 0, 0, 1, 1, 1]
    data = build_domain_data(data_sources(cfg.data), tokenizer, max_length=96, eval_fraction=cfg.data.eval_fraction,
                             max_eval_examples=cfg.data.max_eval_examples, seed=cfg.data.split_seed)
    heldout = {tuple(e["input_ids"]) for examples in data.eval_sets.values() for e in examples}
    assert not heldout & {tuple(e["input_ids"]) for e in first}


def test_a_calibration_drawn_from_the_run_data_does_not_repeat_the_runs_held_out_warnings(tokenizer, caplog):
    """A student pruned from the teacher logged each held-out warning of the run's data twice (data.max_eval_examples
    below a domain's held-out split: once as the run built its data, once as its calibration read it again); the
    calibration reads only the training pools, and draws them from the same split."""
    import logging

    from qwen_distillation.data.sources import build_domain_data, data_sources
    from qwen_distillation.modeling.prune import calibration_examples

    cfg = _validated(PRUNE_RUN + ["model.student.keep_layers=2", "data.max_eval_examples=2"])
    calibration = cfg.model.student.prune.calibration
    over_cap = "over data.max_eval_examples=2"
    with caplog.at_level(logging.WARNING, logger="qwen_distillation.data.sources"):
        data = build_domain_data(data_sources(cfg.data), tokenizer, max_length=96,
                                 eval_fraction=cfg.data.eval_fraction, max_eval_examples=2, seed=cfg.data.split_seed)
        assert over_cap in caplog.text  # from the run's own data
        caplog.clear()
        chosen = calibration_examples(calibration, cfg.data, tokenizer, seed=1)
    assert over_cap not in caplog.text, caplog.text
    pools = {tuple(e["input_ids"]) for e in data.general + data.medical}
    assert len(chosen) == 6 and {tuple(e["input_ids"]) for e in chosen} <= pools


def test_a_small_pool_lends_its_share_to_the_other_and_a_short_set_is_warned_of(tokenizer, caplog):
    """The demo's pools hold 58 general and 80 medical training examples: the default 256 gave 138 without a
    word, and a pool smaller than its half left the set short even where the other had examples to spare."""
    from qwen_distillation.data.sources import build_domain_data, data_sources
    from qwen_distillation.modeling.prune import calibration_examples

    cfg = _validated(PRUNE_RUN + ["model.student.keep_layers=2"])
    data = build_domain_data(data_sources(cfg.data), tokenizer, max_length=96, eval_fraction=cfg.data.eval_fraction,
                             max_eval_examples=cfg.data.max_eval_examples, seed=cfg.data.split_seed)
    general, medical = len(data.general), len(data.medical)
    calibration = cfg.model.student.prune.calibration
    wanted = 2 * general + 2  # the general half is short by 2, which the medical pool can give
    assert medical >= general + 2
    chosen = calibration_examples(dataclasses.replace(calibration, num_examples=wanted), cfg.data, tokenizer, seed=1)
    assert sorted(e["domain"] for e in chosen) == [0] * general + [1] * (general + 2)
    with caplog.at_level("WARNING"):
        every = calibration_examples(dataclasses.replace(calibration, num_examples=10_000), cfg.data, tokenizer,
                                     seed=1)
    assert len(every) == general + medical
    assert (f"num_examples=10000: the calibration set holds {general + medical} examples, all there are "
            f"({general} general and {medical} medical training examples)") in caplog.text


def test_prune_command_saves_a_loadable_student_with_its_record(tmp_path, capsys):
    from qwen_distillation.prune import main

    out = tmp_path / "student"
    args = ["--out", str(out), *PRUNE_RUN, "model.student.keep_layers=2", "model.student.prune.method=block_influence",
            "seed=3"]
    main(args)
    record = json.loads((out / "pruning.json").read_text())
    assert record["method"] == "block_influence" and record["teacher_layers"] == 4
    assert record["kept_layers"] == keep_highest(record["layer_scores"], 2)
    assert record["calibration"]["examples"] == 6
    assert {"config.json", "model.safetensors"} <= set(record["files"])  # what a later --overwrite may replace
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2
    assert record["parameters"]["student"] == sum(p.numel() for p in student.parameters())
    # The same seed chooses the same layers; the output is not overwritten unless asked.
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main(args + ["--overwrite"])
    assert json.loads((out / "pruning.json").read_text()) == record


def test_prune_command_refuses_a_config_with_nothing_to_prune(tmp_path, capsys):
    from qwen_distillation.prune import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "s"), *PRUNE_RUN])
    assert "nothing to prune" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    (tmp_path / "f").write_text("kept")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "f"), *PRUNE_RUN, "model.student.keep_layers=2"])
    assert exit_info.value.code == 2 and f"--out {tmp_path / 'f'}: it is a file" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "kept"


def test_prune_overwrite_never_removes_its_inputs_or_files_it_did_not_write(tmp_path, capsys, monkeypatch):
    """`prune --overwrite` replaced the whole --out: the teacher it read from inside it (--teacher_model)
    and every other file there were deleted; an --out inside a data directory was written there."""
    import qwen_distillation.modeling.pair as pair
    from qwen_distillation.prune import foreign_entries, main

    monkeypatch.setattr(pair, "load_causal_lm", lambda *a, **k: pytest.fail("the teacher was loaded"))
    parent, data, earlier = tmp_path / "parent", tmp_path / "data", tmp_path / "earlier"
    for directory in (parent / "teacher", data, earlier):
        directory.mkdir(parents=True)
    (parent / "teacher" / "config.json").write_text("{}")
    (parent / "notes.txt").write_text("important")
    (data / "general.jsonl").write_bytes((REPO / "qwen_distillation/data/demo/general.jsonl").read_bytes())
    for name in ("config.json", "model.safetensors", "notes.txt"):  # an earlier output, and a file of the user's
        (earlier / name).write_text("x")
    (earlier / "pruning.json").write_text(json.dumps({"files": ["config.json", "model.safetensors"]}))
    teacher = ["--teacher_model", str(parent / "teacher")]
    cases = [(parent, teacher, f"--out {parent}: holds model.teacher.path={parent / 'teacher'}, an input"),
             (parent / "teacher", teacher, f"--out {parent / 'teacher'}: is model.teacher.path="),
             (parent, [], f"--out {parent}: holds notes.txt, teacher, which the prune command did not write"),
             (earlier, [], f"--out {earlier}: holds notes.txt, which the prune command did not write"),
             (data / "student", [f"data.general=[{data}]"],
              f"--out {data / 'student'} lies inside data.general[0]={data}, a directory read as data")]
    before = sorted(p for p in tmp_path.rglob("*"))
    for out, extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(out), "--overwrite", *PRUNE_RUN, "model.student.keep_layers=2", *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, err
    assert sorted(p for p in tmp_path.rglob("*")) == before and (parent / "notes.txt").read_text() == "important"
    (earlier / "notes.txt").unlink()
    assert foreign_entries(earlier) == []
    (earlier / "pruning.json").write_text("{}")  # written before pruning.json listed the files: known names pass
    (earlier / "stage1").mkdir()
    assert foreign_entries(earlier) == ["stage1"]


@pytest.mark.parametrize("override", ["model.student.prune.calibration.sources=[{missing}]",
                                      "data.medical=[{missing}]"])
def test_prune_command_reports_a_missing_calibration_file_before_the_teacher_loads(override, tmp_path, capsys,
                                                                                   monkeypatch):
    import qwen_distillation.modeling.pair as pair
    from qwen_distillation.prune import main

    monkeypatch.setattr(pair, "load_causal_lm", lambda *a, **k: pytest.fail("the teacher was loaded"))
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "s"), *PRUNE_RUN, "model.student.keep_layers=2",
              "model.student.prune.method=block_influence", override.format(missing=missing)])
    assert exit_info.value.code == 2
    assert f"{override.split('=')[0]}[0]={missing}: file not found" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_run_prunes_its_student_from_the_teacher_and_saves_the_record(tmp_path):
    from qwen_distillation.app import run
    from tests.conftest import tiny_overrides

    out = tmp_path / "run"
    overrides = tiny_overrides(out, steps=1) + [
        "model.student.random_init=null", "model.student.keep_layers=3", "model.student.prune.method=perplexity",
        "model.student.prune.width.intermediate_size=80", "model.student.prune.calibration.num_examples=4",
        "start_stage=1", "end_stage=1"]
    summary = run(compose_config(overrides))
    record = json.loads((out / "pruning.json").read_text())
    assert summary["pruning"] == str(out / "pruning.json")
    assert record["method"] == "perplexity" and len(record["kept_layers"]) == 3
    assert record["width"] == {"intermediate_size": {"teacher": 128, "student": 80}}
    assert (out / "pruning_scores.safetensors").exists()
    final = AutoModelForCausalLM.from_pretrained(out / "stage1" / "final")
    assert (final.config.num_hidden_layers, final.config.intermediate_size) == (3, 80)
    assert final.config.hidden_size == 64  # the teacher's
    # Run over with a depth-only pruning, then with no pruning: each leaves only its own record (the width
    # scores, then the record itself, stayed, and the summary pointed at a pruning the run never did).
    depth_only = [o for o in overrides if "width" not in o] + ["overwrite_output_dir=true"]
    run(compose_config(depth_only))
    assert "width" not in json.loads((out / "pruning.json").read_text())
    assert not (out / "pruning_scores.safetensors").exists()
    summary = run(compose_config(tiny_overrides(out, steps=1) + ["start_stage=1", "end_stage=1",
                                                                 "overwrite_output_dir=true"]))
    assert summary["pruning"] is None and not (out / "pruning.json").exists()


def test_a_structure_only_student_has_the_pruned_students_shapes():
    """An FSDP2 rank that receives rank 0's weights builds the student on the meta device."""
    from qwen_distillation.config.schema import ModelSpec, PruneConfig, WidthPruneConfig
    from qwen_distillation.modeling.loading import empty_model
    from qwen_distillation.modeling.prune import prune_from_teacher

    teacher = _model("qwen2")
    spec = ModelSpec(keep_layers=3, prune=PruneConfig(method="block_influence", width=WidthPruneConfig(
        intermediate_size=40, num_key_value_heads=1)))
    real = prune_from_teacher(teacher, spec, batches=_batches()).student
    meta = prune_from_teacher(empty_model(teacher.config, torch.float32), spec, batches=None,
                              structure_only=True, agree=False).student
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert all(p.device.type == "meta" for p in meta.parameters())


@pytest.mark.parametrize("override,message", [
    ("model.student.prune.width.hidden_size=100000", "model.student.prune.width.hidden_size=100000: must be an "
                                                     "integer from 1 to the model's hidden_size"),
    ("model.student.prune.width.num_key_value_heads=4", "model.student.prune.width.num_key_value_heads=4: must be an "
                                                        "integer from 1 to the model's num_key_value_heads"),
])
def test_width_targets_beyond_the_teacher_fail_before_it_loads(override, message, tmp_path, capsys, monkeypatch):
    """The teacher's config gives its sizes: a target beyond them fails before its weights load and the
    calibration runs (minutes for a large teacher)."""
    import qwen_distillation.modeling.pair as pair
    from qwen_distillation.prune import main

    monkeypatch.setattr(pair, "load_causal_lm", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "s"), *PRUNE_RUN, override])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_run_over_its_own_student_folder_keeps_the_prune_record(tmp_path):
    """`--student_model P output_dir=P overwrite_output_dir=true` over a prune output deleted P's pruning.json
    and pruning_scores.safetensors (a run's overwrite clears those names) though no run had written them. An
    output_dir further down an input folder still clears only the run's own files."""
    from qwen_distillation.errors import ConfigError
    from qwen_distillation.training.outputs import check_output_dir

    pruned = tmp_path / "pruned"
    pruned.mkdir()
    for name in ("config.json", "model.safetensors", "pruning.json", "pruning_scores.safetensors"):
        (pruned / name).write_text("{}")
    with pytest.raises(ConfigError, match=f"model.student.path={pruned} holds pruning.json, which "
                                          f"overwrite_output_dir=true would remove from output_dir={pruned}"):
        check_output_dir(pruned, run_id="r", resume=True, overwrite=True, inputs=[("model.student.path", str(pruned))])
    assert sorted(p.name for p in pruned.iterdir())[-2:] == ["pruning.json", "pruning_scores.safetensors"]
    below = pruned / "run"
    below.mkdir()
    (below / "pruning.json").write_text("{}")
    check_output_dir(below, run_id="r", resume=True, overwrite=True, inputs=[("model.student.path", str(pruned))])
