"""Every shipped config composes and validates; bad values fail naming the override."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import compose_config
from qwen_distillation.app import CONF_DIR
from qwen_distillation.config.validate import unknown_override_key, validate_config
from qwen_distillation.data.sources import normalise_sources
from qwen_distillation.errors import ConfigError

GROUPS = ["model", "data", "stage1", "stage2", "stage3", "eval", "train", "logging", "distributed"]


def _warned(check, *overrides) -> list[str]:
    """The warning lines ``check`` (``ignored_settings``, ``faint_settings``) gives for the validated config
    of ``overrides``."""
    return check(validate_config(compose_config(list(overrides))))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group, option):
    config = validate_config(compose_config([f"{group}={option}"]))
    assert config.stage1.name


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    config = validate_config(compose_config([f"experiment={experiment}"]))
    assert config.experiment == (None if experiment == "none" else experiment)


def test_stage_defaults_follow_the_design():
    # experiment=none: the stage options as written, without the default demo preset's budgets.
    config = validate_config(compose_config(["experiment=none"]))
    s1, s2, s3 = config.stage1, config.stage2, config.stage3
    assert (s1.temperature, s1.loss.weights.kd, s1.loss.weights.ce, s1.lr) == (4.0, 0.9, 0.1, 5e-5)
    assert s1.medical_ratio.start == s1.medical_ratio.end == 0.0
    assert s1.batch_size > s2.batch_size and 2 <= s1.epochs <= 3
    assert (s2.temperature, s2.lr, s2.medical_ratio.start, s2.medical_ratio.end) == (2.0, 3e-5, 0.3, 0.7)
    assert s2.medical_ratio.schedule == "linear"
    assert (s3.temperature, s3.loss.weights.ce, s3.loss.weights.kd, s3.lr) == (1.0, 0.9, 0.1, 1e-5)
    assert s3.medical_ratio.start == s3.medical_ratio.end == 1.0
    assert config.model.name == "demo_smollm2" and config.model.student.keep_layers == 15
    demo = validate_config(compose_config([]))
    assert demo.data.name == "demo" and demo.stage1.max_steps and demo.stage2.temperature == 2.0
    assert demo.experiment == "demo"


def test_presets_do_what_their_names_say():
    """A data option sets data only: the demo's step budgets and evaluation come from the
    experiment preset the default config selects, and no other preset changes data."""
    plain = validate_config(compose_config(["experiment=none"]))
    with_demo_data = validate_config(compose_config(["experiment=none", "data=demo"]))
    assert with_demo_data.stage1 == plain.stage1 and with_demo_data.eval == plain.eval
    for data in ("demo", "shared_kit"):
        config = validate_config(compose_config(["experiment=none", f"data={data}"]))
        assert (config.stage1, config.stage2, config.stage3, config.eval) == (
            plain.stage1, plain.stage2, plain.stage3, plain.eval), data
    for data in ("shared_kit_small", "shared_kit_arms"):  # the smoke and arms presets' sources, and only sources
        config = validate_config(compose_config(["experiment=none", f"data={data}"]))
        assert (config.stage1, config.eval) == (plain.stage1, plain.eval) and config.data.general, data
    # A preset picks its data with its defaults list, so a data group chosen on the command line replaces its
    # sources (the smoke preset had set them itself: `experiment=smoke data=demo` trained on the shared kit).
    smoke_on_demo = validate_config(compose_config(["experiment=smoke", "data=demo"]))
    assert (smoke_on_demo.data.general, smoke_on_demo.data.medical) == (plain.data.general, plain.data.medical)
    assert smoke_on_demo.data.max_length == 128 and smoke_on_demo.stage1.max_steps == 6  # the preset's caps stay
    smoke = validate_config(compose_config(["experiment=smoke"]))
    assert smoke.data.name == "shared_kit_small" and len(smoke.data.general) == 2 and len(smoke.data.medical) == 3
    demo = validate_config(compose_config([]))
    assert demo.data == plain.data and demo.stage1.max_steps == 5 and plain.stage1.max_steps is None
    assert demo.stage2.loss.balancing.method == "none" != plain.stage2.loss.balancing.method


@pytest.mark.parametrize("override,named", [
    ("stage2.temperature=0", "stage2.temperature"),
    ("stage1.temperature=-1", "stage1.temperature"),
    ("stage2.loss.weights.kd=-0.5", "stage2.loss.weights.kd"),
    ("stage2.medical_ratio.end=1.5", "stage2.medical_ratio.end"),
    ("stage3.medical_ratio.start=-0.1", "stage3.medical_ratio.start"),
    ("start_stage=0", "start_stage"),
    ("end_stage=4", "end_stage"),
    ("stage2.loss.kd=kl", "stage2.loss.kd"),
    ("stage2.loss.jsd_beta=2", "stage2.loss.jsd_beta"),
    ("train.precision=fp8", "train.precision"),
    ("stage1.lr=inf", "stage1.lr"),
    ("stage1.temperature=inf", "stage1.temperature=inf: must be a finite number"),
    ("stage2.loss.weights.feature=inf", "stage2.loss.weights.feature=inf: must be a finite number"),
    ("stage3.sampling.temperature=nan", "stage3.sampling.temperature=nan: must be a finite number"),
    # Hard-example sampling under a mixed ratio: the error named sampling.mode alone, not the ratio that was set.
    ("stage3.medical_ratio.start=0.5", "stage3.sampling.mode=hard: hard-example sampling draws from one domain"),
    ("stage3.medical_ratio.start=0.5", "but stage3.medical_ratio.start=0.5; set stage3.medical_ratio.schedule=constant "
     "stage3.medical_ratio.start=1"),
    ("stage3.medical_ratio.schedule=linear", "but stage3.medical_ratio.schedule=linear;"),
    ("stage3.weight_decay=-1", "stage3.weight_decay"),
    ("stage2.temperature=1000", "stage2.temperature=1000.0: must be at most 100"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("lora.alpha=-4", "lora.alpha"),
    ("lora.enabled=true lora.target_modules=[]", "lora.target_modules"),
    ("distributed=fsdp2 distributed.engine=deepspeed distributed.deepspeed_config=ds.json", "distributed.engine"),
])
def test_bad_values_name_the_override(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        validate_config(compose_config(override.split()))


def test_all_linear_beside_module_names_is_refused_by_name():
    """peft's shorthand beside a module name: the run loaded both models, then said the student had no module
    named ['all-linear'] and suggested lora.target_modules=[all-linear], which it had been given."""
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config(["lora.enabled=true", "lora.target_modules=[all-linear,lm_head]"]))
    assert str(err.value).startswith("lora.target_modules=['all-linear', 'lm_head']: all-linear (peft's shorthand")
    assert "stands alone" in str(err.value) and "lora.target_modules=[all-linear]" in str(err.value)
    assert validate_config(compose_config(["lora.enabled=true", "lora.target_modules=[all-linear]"])).lora.enabled


@pytest.mark.parametrize("override,named", [
    ("lora.merge_on_export=true", "lora.merge_on_export"),
    ("distributed.zero_stage=3", "distributed.zero_stage"),
    ("distributed.offload=true", "distributed.offload"),
    ("train.precision=fp16", "train.precision"),
    ("stage1.loss.balancing.method=gradnorm", "stage1.loss.balancing.method"),
])
def test_fsdp2_refuses_what_it_cannot_do(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        validate_config(compose_config(["distributed=fsdp2", "lora.enabled=true", override]))


@pytest.mark.parametrize("override,named", [
    # A negative alpha pushed the slower-training terms down; it used to train without a word.
    ("stage2.loss.balancing.method=gradnorm stage2.loss.balancing.gradnorm_alpha=-1",
     "stage2.loss.balancing.gradnorm_alpha=-1.0: GradNorm's asymmetry must be >= 0"),
    # Ignored under max_steps (the demo preset sets stage1.max_steps), so it used to pass.
    ("stage1.epochs=-1", "stage1.epochs=-1.0: a number of passes"),
    # One domain: every sequence a positive of every other, the term pulled them all together.
    ("stage3.loss.weights.contrastive=0.1 stage3.loss.contrastive.domain_aware=true",
     "stage3.loss.contrastive.domain_aware=true: stage3 serves medical data only"),
    ("stage2.medical_ratio.schedule=constant stage2.medical_ratio.start=1 stage2.loss.weights.contrastive=0.05",
     "stage2.loss.contrastive.domain_aware=true: stage2 serves medical data only"),
    # A step schedule of one plateau stays at its start, as the constant one does.
    ("stage2.medical_ratio.schedule=step stage2.medical_ratio.plateaus=1 stage2.medical_ratio.start=0 "
     "stage2.loss.weights.contrastive=0.05", "stage2.loss.contrastive.domain_aware=true: stage2 serves general data"),
    # A micro-batch of one has no negatives: the term was exactly 0 at every step.
    ("stage1.loss.weights.contrastive=0.5 stage1.batch_size=1",
     "stage1.batch_size=1: stage1.loss.weights.contrastive=0.5 takes its negatives"),
])
def test_stage_values_that_trained_silently_wrong_are_refused(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("(", r"\(")):
        validate_config(compose_config(override.split()))


@pytest.mark.parametrize("override", [
    "stage2.loss.balancing.gradnorm_alpha=0",
    "stage1.epochs=0",  # with the demo preset's stage1.max_steps
    "stage2.loss.weights.contrastive=0.05",  # stage 2 mixes both domains (linear 0.3 -> 0.7), domain-aware
    "stage3.loss.weights.contrastive=0.1 stage3.loss.contrastive.domain_aware=false",
    "stage1.loss.weights.contrastive=0.5 stage1.batch_size=1 train.packing=true train.pack_step=true",
    "stage1.loss.weights.contrastive=0.5 stage1.batch_size=1 train.packing=true stage1.tokens_per_step=4096",
])
def test_the_limits_of_those_refusals_still_validate(override):
    validate_config(compose_config(override.split()))


def test_settings_a_run_ignores_are_named_for_a_warning_not_refused():
    """LoRA options with LoRA off, and a layer map of a term whose weight is 0, were ignored without a word
    (the run trained all weights; the stage trained without the term). An ablation sweep keeps them while it
    turns the feature off, so they are warned about, not refused."""
    from qwen_distillation.config.validate import ignored_settings

    overrides = ["lora.r=8", "lora.merge_on_export=true", "stage1.loss.feature.layer_map=[[0,1]]",
                 "stage3.loss.attention.layer_map=[[1,3]]", "end_stage=2"]
    assert ignored_settings(validate_config(compose_config(overrides))) == [
        "lora.r=8, lora.merge_on_export=True: ignored, LoRA is off (lora.enabled=false), so the run trains all of "
        "the student's weights; turn it on with lora.enabled=true (--use_lora)",
        "stage1.loss.feature.layer_map: ignored, the feature term is off (stage1.loss.weights.feature=0); give it a "
        "weight (e.g. stage1.loss.weights.feature=0.1) to train it"]  # stage 3 does not run
    on = ["lora.enabled=true", "lora.r=8", "stage1.loss.weights.feature=0.1", "stage1.loss.feature.layer_map=[[0,1]]"]
    assert ignored_settings(validate_config(compose_config(on))) == []


def test_medical_ratio_keys_the_schedule_does_not_read_are_named_for_a_warning():
    """Stage 2 with `medical_ratio.schedule=constant` (or a step schedule of one plateau) served 30% medical
    data at every step though `medical_ratio.end=0.7` said it should rise to 70%, and `plateaus` under a
    schedule other than step was dropped; nothing said so. A sweep over the schedule keeps the keys: warned."""
    from qwen_distillation.config.validate import ignored_settings

    warnings = functools.partial(_warned, ignored_settings)

    assert warnings("stage2.medical_ratio.schedule=constant") == [
        "stage2.medical_ratio.end=0.7: ignored, the constant schedule serves the medical share "
        "stage2.medical_ratio.start=0.3 at every step of the stage; to move it to the end value use "
        "stage2.medical_ratio.schedule=linear (or step with stage2.medical_ratio.plateaus=2 or more)"]
    assert warnings("stage2.medical_ratio.schedule=step", "stage2.medical_ratio.plateaus=1")[0].startswith(
        "stage2.medical_ratio.end=0.7: ignored, a step schedule of one plateau serves the medical share "
        "stage2.medical_ratio.start=0.3")
    assert warnings("stage2.medical_ratio.plateaus=3") == [
        "stage2.medical_ratio.plateaus=3: ignored, only the step schedule has plateaus "
        "(stage2.medical_ratio.schedule=linear); use stage2.medical_ratio.schedule=step"]
    assert warnings("stage1.medical_ratio.end=0.7")[0].startswith("stage1.medical_ratio.end=0.7: ignored")
    # What the schedules read, the shipped stages (constant 0 -> 0, 1 -> 1) and a stage that does not run: no word.
    assert warnings("stage2.medical_ratio.schedule=step", "stage2.medical_ratio.plateaus=2") == []
    assert warnings("stage2.medical_ratio.start=0.7", "stage2.medical_ratio.end=0.3") == []
    assert warnings("stage3.medical_ratio.end=0.5", "end_stage=2") == []
    assert warnings() == [] and warnings("experiment=smoke") == []


def test_a_later_stage_contrastive_projection_dim_is_named_for_a_warning():
    """One contrastive head serves the run, sized by the first stage that uses it: stage 3's
    `loss.contrastive.projection_dim=64` after stage 2's 256 trained a 256-wide head without a word."""
    from qwen_distillation.config.validate import ignored_settings

    warnings = functools.partial(_warned, ignored_settings, "stage3.loss.weights.contrastive=0.1")
    assert warnings("stage3.loss.contrastive.projection_dim=64") == [
        "stage3.loss.contrastive.projection_dim=64: ignored, one contrastive head serves the whole run, sized by the "
        "first stage that uses it (stage2.loss.contrastive.projection_dim=256); give both the same value"]
    # The same width, or the first contrastive stage of the run: no word.
    assert warnings() == []
    assert warnings("stage3.loss.contrastive.projection_dim=64", "start_stage=3") == []


def test_a_teacher_cache_of_a_stage_that_runs_the_teacher_online_is_named_for_a_warning():
    """`stage1.teacher.cache=DIR` without `stage1.teacher.source=cache` ran the teacher online without a word."""
    from qwen_distillation.config.validate import ignored_settings

    assert ignored_settings(validate_config(compose_config(["stage1.teacher.cache=out/cache"]))) == [
        "stage1.teacher.cache=out/cache: ignored, the stage runs the teacher online (stage1.teacher.source=online); "
        "read the cache with stage1.teacher.source=cache"]
    assert ignored_settings(validate_config(compose_config(["stage1.teacher.cache=out/cache", "end_stage=2",
                                                            "start_stage=2"]))) == []


def test_an_eval_every_past_the_stage_length_is_named_for_a_warning():
    """`stage2.eval_every=500` with `stage2.max_steps=200` evaluated only at the stage's end, without a word. A
    sweep over max_steps keeps it: warned, not refused."""
    from qwen_distillation.config.validate import ignored_settings

    warnings = functools.partial(_warned, ignored_settings, "end_stage=2")

    assert warnings("stage2.max_steps=200", "stage2.eval_every=500") == [
        "stage2.eval_every=500: ignored, the stage runs 200 steps (stage2.max_steps=200), so it is evaluated only at "
        "its end; to evaluate during it, lower it (e.g. stage2.eval_every=50), or set 0 for the end only"]
    # Within the stage, every step of it, off (0), a length the data decides, or a stage that does not run: no word.
    assert warnings("stage2.max_steps=200", "stage2.eval_every=200") == []
    assert warnings("stage2.max_steps=200", "stage2.eval_every=0") == []
    assert warnings("stage2.max_steps=null", "stage2.eval_every=500") == []
    assert warnings("stage3.max_steps=200", "stage3.eval_every=500") == []


def test_loss_balancing_and_sampling_options_another_option_turns_off_are_named_for_a_warning():
    """`stage1.loss.jsd_beta=0.9` under forward KL, a temperature with the KD term off, GradNorm's learning rate
    under another balancing method and `stage3.sampling.max_scored=16` under uniform sampling (as the arms of
    experiments/three_stage_vs_finetune.py set it) trained without them, without a word. Warned, not refused."""
    from qwen_distillation.config.validate import ignored_settings

    warnings = functools.partial(_warned, ignored_settings)

    assert warnings("stage1.loss.jsd_beta=0.9", "stage1.loss.kd=skew_forward_kl", "stage1.loss.skew_alpha=0.2") == [
        "stage1.loss.jsd_beta=0.9: ignored, only jsd reads it (stage1.loss.kd=skew_forward_kl); use stage1.loss.kd=jsd"]
    assert warnings("stage1.loss.skew_alpha=0.2") == [
        "stage1.loss.skew_alpha=0.2: ignored, only skew_forward_kl and skew_reverse_kl read it "
        "(stage1.loss.kd=forward_kl); use stage1.loss.kd=skew_forward_kl"]
    assert warnings("stage1.loss.weights.kd=0", "stage1.loss.kd=jsd") == [
        "stage1.temperature=4, stage1.loss.kd=jsd: ignored, the KD term is off (stage1.loss.weights.kd=0); give it "
        "a weight (e.g. stage1.loss.weights.kd=0.5) to train it"]
    assert warnings("stage2.loss.balancing.method=pcgrad", "stage2.loss.balancing.gradnorm_lr=0.1") == [
        "stage2.loss.balancing.gradnorm_lr=0.1: ignored, only GradNorm reads it (stage2.loss.balancing.method=pcgrad); "
        "use stage2.loss.balancing.method=gradnorm"]
    assert warnings("stage3.sampling.mode=uniform", "stage3.sampling.max_scored=16",
                    "stage3.sampling.temperature=2") == [
        "stage3.sampling.temperature=2, stage3.sampling.max_scored=16: ignored, only hard-example sampling reads them "
        "(stage3.sampling.mode=uniform); use stage3.sampling.mode=hard"]
    # What the options read, the defaults, and a stage that does not run: no word.
    assert warnings("stage1.loss.kd=jsd", "stage1.loss.jsd_beta=0.9", "stage3.sampling.max_scored=16",
                    "stage2.loss.balancing.gradnorm_lr=0.1", "experiment=none") == []
    assert warnings("stage3.loss.weights.kd=0", "stage3.loss.jsd_beta=0.9", "end_stage=2") == []


def test_start_after_end_is_rejected():
    with pytest.raises(ConfigError, match="start_stage"):
        validate_config(compose_config(["start_stage=3", "end_stage=2"]))


def test_a_stage_key_given_elsewhere_is_suggested_by_its_ending():
    """`train.max_grad_norm` is a stage's key: the stages' keys that end as it does are suggested."""
    assert unknown_override_key("train.max_grad_norm") == ("train.max_grad_norm (did you mean stage1.max_grad_norm or "
                                                           "stage2.max_grad_norm or stage3.max_grad_norm?)")
    assert unknown_override_key("train.loss.weights.kd").startswith("train.loss (did you mean stage1.loss.weights.kd")


@pytest.mark.parametrize("override", ["stage2.loss.weight.kl=0.5", "stage2.temperture=3", "train.foo=1"])
def test_unknown_key_fails_at_composition(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_config([override])
    assert override.split("=")[0].split(".")[-2 if "weight." in override else -1] in str(err.value)


@pytest.mark.parametrize("override,named", [
    ("+stage2.foo=1", "stage2.foo"),
    ("++stage2.eval_evry=3", r"stage2\.eval_evry \(did you mean stage2\.eval_every\?\)"),
    ("+foo=1", "foo"),
    ("+stage2.loss.weights.kl=0.5", r"stage2\.loss\.weights\.kl \(renamed to stage2\.loss\.weights\.kd\)"),
])
def test_keys_added_with_a_plus_are_refused_not_dropped(override, named):
    """Hydra adds a key given with + or ++; the typed config would drop it without a word."""
    with pytest.raises(ConfigError, match=f"unknown config key\\(s\\): {named}"):
        validate_config(compose_config([override]))


def test_data_sources_accept_strings_and_mappings_and_reject_unknown_keys():
    sources = normalise_sources("data.general", ["a.jsonl", {"path": "b.csv", "format": "alpaca", "max_records": 3}])
    assert [s.path for s in sources] == ["a.jsonl", "b.csv"] and sources[1].max_records == 3
    with pytest.raises(ConfigError, match=r"data\.general\[0\].*unknown key"):
        normalise_sources("data.general", [{"path": "a.jsonl", "fmt": "alpaca"}])
    with pytest.raises(ConfigError, match=r"data\.medical\[0\]\.format"):
        normalise_sources("data.medical", [{"path": "a.jsonl", "format": "parquet"}])


@pytest.mark.parametrize("entry,key", [
    ({"path": "a.jsonl", "max_records": "abc"}, "max_records=abc"),  # was a TypeError
    ({"path": "a.jsonl", "max_records": True}, "max_records=True"),  # kept 1 record without a word
    ({"path": "a.jsonl", "max_records": 1.5}, "max_records=1.5"),  # kept 2
    ({"path": 5}, "path=5"),  # an AttributeError
    ({"path": ["a.jsonl", "b.jsonl"]}, "path=['a.jsonl', 'b.jsonl']"),
    ({"path": "org/name", "split": ["train"]}, "split=['train']"),
])
def test_data_and_mcq_source_values_of_the_wrong_type_are_refused_naming_the_key(entry, key):
    from qwen_distillation.evaluation.mcq import normalise_mcq_sources

    with pytest.raises(ConfigError, match=re.escape(f"data.general[0].{key}: must be ")):
        normalise_sources("data.general", [entry])
    if "max_records" not in entry:
        with pytest.raises(ConfigError, match=re.escape(f"eval.mcq[0].{key}: must be one string")):
            normalise_mcq_sources("eval.mcq", [entry])
    with pytest.raises(ConfigError, match=re.escape("eval.mcq[0].name=5: must be one string")):
        normalise_mcq_sources("eval.mcq", [{"path": "a.jsonl", "name": 5}])  # was a TypeError


RECIPES = {"general_kd": "stage1", "domain_kd": "stage2", "medical_ft": "stage3"}


@pytest.mark.parametrize("slot", ["stage1", "stage2", "stage3"])
def test_every_stage_slot_takes_every_stage_recipe(slot):
    """`stage2=medical_ft` (say) swaps stage 3's recipe into stage 2 from the command line: each slot's
    group offers the three recipes, each the very values of its own slot's file, and the other slots
    keep theirs."""
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(compose_config(["experiment=none"]))
    assert sorted(p.stem for p in (Path(CONF_DIR) / slot).glob("*.yaml")) == sorted(RECIPES)
    for recipe, home in RECIPES.items():
        swapped = OmegaConf.to_container(compose_config(["experiment=none", f"{slot}={recipe}"]))
        assert swapped[slot] == base[home] and swapped[slot]["name"] == recipe
        assert all(swapped[other] == base[other] for other in RECIPES.values() if other != slot)
        validate_config(compose_config([f"{slot}={recipe}"]))


def test_a_kd_temperature_that_all_but_turns_the_term_off_is_named_for_a_warning():
    """`stage1.temperature=0.05` passed the range check (> 0) and trained a KD term whose pull on the logits was
    20x smaller than at T = 1, next to an unscaled CE, without a word. Warned (a sharpening T is a choice); the
    factor it names is the measured ratio of the term's gradients."""
    import torch

    from qwen_distillation.config.validate import FAINT_TEMPERATURE, faint_settings
    from qwen_distillation.losses.logit import forward_kl

    warnings = functools.partial(_warned, faint_settings)

    assert warnings("stage1.temperature=0.05") == [
        "stage1.temperature=0.05: the KD term is T**2 times its divergence, so its gradient on the student's logits "
        "is 20x smaller than at T=1 while the CE's is not; for softened KD use stage1.temperature=1 or more (e.g. "
        "stage1.temperature=2), or give the term more weight (stage1.loss.weights.kd)"]
    # The defaults (4, 2, 1), a T at the threshold, the term off, and a stage that does not run: no word.
    assert warnings() == []
    assert warnings(f"stage2.temperature={FAINT_TEMPERATURE}", "end_stage=2") == []
    assert warnings("stage1.temperature=0.05", "stage1.loss.weights.kd=0") == []
    assert warnings("stage3.temperature=0.1", "end_stage=2") == []

    # Logits far apart (each distribution near one-hot at small T): the gradient's size over a token is
    # T * |q_T - p_T|, which is 2 * T once both are one-hot, so T = 0.05 pulls 20x less than T = 1.
    student = torch.tensor([[[8.0, 0.0, -8.0]]])
    teacher = torch.tensor([[[-8.0, 0.0, 8.0]]])
    labels = torch.tensor([[0]])

    def pull(temperature):
        logits = student.clone().requires_grad_(True)
        forward_kl(logits, teacher, labels, temperature=temperature).backward()
        return logits.grad.abs().sum().item()

    assert pull(0.05) == pytest.approx(0.1, rel=1e-3)
    assert pull(1.0) / pull(0.05) == pytest.approx(20, rel=1e-3)


def test_term_options_agreement_k_and_a_save_interval_past_the_stage_are_named_for_a_warning():
    """Found by a probe: `stage1.loss.feature.loss=cosine` with the feature term off, `eval.agreement_top_k=10`
    with agreement off, and `stage1.save_every=100` on a 2-step stage (no checkpoint: a stop starts the stage
    over) went without a word, unlike the layer map and the other options the run ignores."""
    from qwen_distillation.config.validate import ignored_settings

    warnings = functools.partial(_warned, ignored_settings, "end_stage=1")

    assert warnings("stage1.loss.feature.loss=cosine", "stage1.loss.contrastive.projection_dim=64") == [
        "stage1.loss.feature.loss=cosine: ignored, the feature term is off (stage1.loss.weights.feature=0); give it a "
        "weight (e.g. stage1.loss.weights.feature=0.1) to train it",
        "stage1.loss.contrastive.projection_dim=64: ignored, the contrastive term is off "
        "(stage1.loss.weights.contrastive=0); give it a weight (e.g. stage1.loss.weights.contrastive=0.1) to train it"]
    assert warnings("stage1.loss.attention.layer_map=[[0,1]]", "stage1.loss.attention.mode=attention") == [
        "stage1.loss.attention.layer_map, stage1.loss.attention.mode=attention: ignored, the attention term is off "
        "(stage1.loss.weights.attention=0); give it a weight (e.g. stage1.loss.weights.attention=0.1) to train it"]
    assert warnings("eval.agreement=false", "eval.agreement_top_k=10") == [
        "eval.agreement_top_k=10: ignored, the agreement with the teacher is off (eval.agreement=false); turn it on "
        "with eval.agreement=true"]
    assert warnings("stage1.max_steps=8", "stage1.save_every=100") == [
        "stage1.save_every=100: past the stage's 8 steps (stage1.max_steps=8), so it writes no checkpoint by steps "
        "(only by time, train.save_every_minutes) and a stop mid-stage starts it over; lower it (e.g. "
        "stage1.save_every=2), or leave it null to save every quarter of the stage"]
    # A floor a constant schedule never reaches: accepted without a word.
    assert warnings("stage1.lr_scheduler=constant", "stage1.min_lr_ratio=0.5") == [
        "stage1.min_lr_ratio=0.5: ignored, the learning rate stays at stage1.lr after its warmup "
        "(stage1.lr_scheduler=constant); a decay to it needs stage1.lr_scheduler=cosine or linear"]
    assert warnings("stage1.lr_scheduler=cosine", "stage1.min_lr_ratio=0.5") == []
    # The term on, agreement on, a save interval within the stage, and every stage preset as it is: no word.
    assert warnings("stage1.loss.weights.feature=0.1", "stage1.loss.feature.loss=cosine", "eval.agreement=true",
                    "eval.agreement_top_k=10", "stage1.max_steps=8", "stage1.save_every=8") == []
    assert ignored_settings(validate_config(compose_config([]))) == []
    assert ignored_settings(validate_config(compose_config(["experiment=none"]))) == []


@pytest.mark.parametrize("extra,level", [([], "INFO"), (["stage3.sampling.max_scored=16"], "WARNING"),
                                         (["stage3.sampling={max_scored:32}"], "WARNING"), (None, "WARNING")])
def test_a_presets_own_value_that_a_swapped_stage_option_ignores_is_not_warned_of_as_the_users(extra, level, caplog):
    """`experiment=demo stage3=general_kd` warned `stage3.sampling.max_scored=32: ignored, only hard-example sampling
    reads it`, a value the demo preset sets for its own stage 3 (medical_ft), as if the user had set it. It is an info
    line naming the preset; a value the command line sets is warned of as before, and so is every line of a caller
    that does not pass the command line (None)."""
    import logging

    from qwen_distillation.app import warn_ignored_settings

    overrides = ["experiment=demo", "stage3=general_kd"] + (extra or [])
    config = validate_config(compose_config(overrides))
    with caplog.at_level(logging.INFO, logger="qwen_distillation.app"):
        warn_ignored_settings(config, None if extra is None else overrides)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if "stage3.sampling.max_scored=" in r.getMessage()]
    assert len(lines) == 1 and lines[0][0] == level, lines
    value = 16 if extra and "=16" in extra[0] else 32
    assert lines[0][1].startswith(f"stage3.sampling.max_scored={value}: ignored, only hard-example sampling reads it")
    assert lines[0][1].endswith("(experiment=demo's own value; nothing on the command line sets it)") is (
        level == "INFO")
