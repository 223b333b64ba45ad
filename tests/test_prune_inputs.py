"""The prune command given options its pruning ignores: each named in a warning before the teacher loads."""

from __future__ import annotations

import logging

import pytest

from tests.test_pruning_depth import PRUNE_RUN


class _TeacherLoaded(Exception):
    pass


@pytest.mark.parametrize("overrides, message", [
    (["model.student.prune.method=block_influence", "model.student.prune.perplexity_search=greedy"],
     "model.student.prune.perplexity_search=greedy: ignored, it applies to model.student.prune.method=perplexity "
     "only and the method is block_influence"),
    (["model.student.prune.calibration.sources=[{missing}]"],
     "model.student.prune.calibration.sources: ignored (not even opened), nothing is calibrated"),
    (["model.student.prune.calibration.num_examples=64"],
     "model.student.prune.calibration.num_examples=64, model.student.prune.calibration.batch_size=3: ignored, "
     "nothing is calibrated (model.student.prune.method=even"),
], ids=["perplexity_search_without_perplexity", "calibration_sources_with_even", "calibration_size_with_even"])
def test_prune_options_the_method_ignores_are_warned_of_before_the_teacher_loads(overrides, message, tmp_path,
                                                                                 caplog, monkeypatch):
    """Both were ignored without a word: the layers chosen by Block Influence under
    perplexity_search=greedy, and a calibration file that does not even exist under method=even.
    Warnings, not errors: a sweep over the method keeps them for the methods that read them."""
    import qwen_distillation.modeling.pair as pair
    from qwen_distillation.prune import main

    def load(*args, **kwargs):
        raise _TeacherLoaded

    monkeypatch.setattr(pair, "load_causal_lm", load)
    overrides = [o.format(missing=tmp_path / "missing.jsonl") for o in overrides]
    with caplog.at_level(logging.WARNING), pytest.raises((_TeacherLoaded, SystemExit)):
        main(["--out", str(tmp_path / "s"), *PRUNE_RUN, "model.student.keep_layers=2", *overrides])
    assert message in caplog.text
    assert sum(message in record.getMessage() for record in caplog.records) == 1


def test_prune_options_of_a_student_loaded_as_it_is_are_warned_of(tmp_path, caplog, monkeypatch):
    """`--student_model DIR model.student.prune.calibration.num_examples=64` (or a random_init student with
    `perplexity_search=greedy`) ran without a word: nothing is pruned, so no pruning option is read."""
    import torch

    import qwen_distillation.modeling.pair as pair
    from qwen_distillation.config.validate import validate_config
    from tests.conftest import compose_config

    def load(*args, **kwargs):
        raise _TeacherLoaded

    monkeypatch.setattr(pair, "load_causal_lm", load)
    cfg = validate_config(compose_config(["model=tiny_qwen2", "data=demo",
                                          "model.student.prune.perplexity_search=greedy",
                                          "model.student.prune.calibration.seed=3"]))
    with caplog.at_level(logging.WARNING), pytest.raises(_TeacherLoaded):
        pair.build_pair(cfg, device=torch.device("cpu"), teacher_dtype=torch.float32, output_dir=tmp_path / "run")
    assert "model.student.prune.perplexity_search=greedy, model.student.prune.calibration.seed=3: ignored, the " \
        "student is loaded as it is (model.student.path or random_init), not pruned from the teacher" in caplog.text


@pytest.mark.parametrize("length, key", [(["model.student.prune.calibration.max_length=16"],
                                          "model.student.prune.calibration.max_length"),
                                         (["data.max_length=16"], "data.max_length")])
def test_calibration_examples_that_do_not_fit_name_the_length_that_cut_them(length, key, tokenizer):
    """The error told to raise data.max_length also where calibration.max_length had set the length."""
    from qwen_distillation.config.validate import validate_config
    from qwen_distillation.errors import DataError
    from qwen_distillation.modeling.prune import calibration_examples
    from tests.conftest import compose_config

    cfg = validate_config(compose_config([*PRUNE_RUN, "model.student.keep_layers=2",
                                          "model.student.prune.method=block_influence", *length]))
    with pytest.raises(DataError, match=rf"raise {key.replace('.', chr(92) + '.')} or check the response field"):
        calibration_examples(cfg.model.student.prune.calibration, cfg.data, tokenizer, cfg.seed)
