"""The offline teacher cache: written, killed and resumed; read by a stage instead of the teacher;
refused when it does not match the stage. Tiny random Qwen2 models with a 256-token word-level
tokenizer trained on the demo set, so that a top-k covering the whole vocabulary stays small."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from qwen_distillation.data.teacher_cache import CacheReader, CacheWriter, shard_files, shard_index
from qwen_distillation.errors import ConfigError
from tests.conftest import REPO, compose_config, tiny_overrides, train_rows

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 256


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("general", "medical", "medical_reasoning"):
        for line in (REPO / "qwen_distillation" / "data" / "demo" / f"{name}.jsonl").read_text().splitlines():
            texts.append(" ".join(str(v) for v in json.loads(line).values()))
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=VOCAB,
                                                                   special_tokens=["<unk>", "<pad>", "<eos>"]))
    directory = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                            eos_token="<eos>").save_pretrained(directory)
    return directory


def _overrides(out, tokenizer_dir, *extra):
    return tiny_overrides(out, steps=2) + [
        f"model.teacher.tokenizer={tokenizer_dir}", f"model.student.tokenizer={tokenizer_dir}",
        f"model.teacher.random_init.vocab_size={VOCAB}", f"model.student.random_init.vocab_size={VOCAB}",
        "data.max_length=64", "start_stage=1", "end_stage=1", "stage1.eval_every=0", *extra]


def _config(out, tokenizer_dir, *extra):
    from qwen_distillation.config.validate import validate_config

    return validate_config(compose_config(_overrides(out, tokenizer_dir, *extra)))


def _entries(directory):
    reader = CacheReader(directory)
    return {key: reader.lookup(key, checksum, rows) for key, (_, _, rows, checksum) in reader.where.items()}


def test_a_killed_cache_run_resumes_to_the_uninterrupted_cache(tmp_path, small_tokenizer, monkeypatch):
    from qwen_distillation.cache_teacher import cache_teacher

    cfg = _config(tmp_path / "run", small_tokenizer)
    whole = cache_teacher(cfg, tmp_path / "whole", k=8, examples_per_shard=16)
    assert whole["examples_written"] == whole["examples_total"] > 32

    real_write, calls = CacheWriter.write, []

    def dying_write(self, examples):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real_write(self, examples)

    monkeypatch.setattr(CacheWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(cfg, tmp_path / "resumed", k=8, examples_per_shard=16)
    assert len(shard_files(tmp_path / "resumed")) == 2 and not list((tmp_path / "resumed").glob(".*tmp"))
    monkeypatch.setattr(CacheWriter, "write", real_write)
    resumed = cache_teacher(cfg, tmp_path / "resumed", k=8, examples_per_shard=16)
    assert resumed["examples_written"] == whole["examples_total"] - 32
    a, b = _entries(tmp_path / "whole"), _entries(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(x, y) for key in a for x, y in zip(a[key], b[key]))
    # every example once: the shards' entries add up to the distinct keys
    assert sum(len(shard_index(s)) for s in shard_files(tmp_path / "resumed")) == len(b)
    ids, logprobs, tail = next(iter(a.values()))
    assert ids.shape[1] == 8 and torch.all(logprobs[:, :-1] >= logprobs[:, 1:])  # most probable first
    assert torch.allclose(torch.logsumexp(torch.cat([logprobs, tail[:, None]], 1), 1), torch.zeros(len(tail)),
                          atol=1e-5)  # top-k and tail hold the whole mass


def test_training_from_a_full_vocabulary_cache_equals_the_online_teacher(tmp_path, small_tokenizer):
    from qwen_distillation.app import run
    from qwen_distillation.cache_teacher import cache_teacher

    run(compose_config(_overrides(tmp_path / "online", small_tokenizer)))
    cache_teacher(_config(tmp_path / "x", small_tokenizer), tmp_path / "cache", k=VOCAB)
    run(compose_config(_overrides(tmp_path / "cached", small_tokenizer, "stage1.teacher.source=cache",
                                  f"stage1.teacher.cache={tmp_path / 'cache'}")))
    online, cached = train_rows(tmp_path / "online"), train_rows(tmp_path / "cached")
    assert len(online) == len(cached) == 2
    for a, b in zip(online, cached):
        # fp32 rounding: the cache holds the teacher's log-probs, the online run its logits, and a KL
        # of 0.02 between two close models is a difference of two sums of about 5 nats.
        for key in ("loss", "loss/kd", "loss/ce", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=2e-6), key
        # Nothing lies outside a cache of the whole vocabulary; the online run logs no such measure.
        assert b["cache/student_mass_outside_topk"] == 0.0 and "cache/student_mass_outside_topk" not in a
    # The run did read the cache: a top-4 cache gives another KD value (the approximation).
    cache_teacher(_config(tmp_path / "x", small_tokenizer), tmp_path / "top4", k=4)
    run(compose_config(_overrides(tmp_path / "top4run", small_tokenizer, "stage1.teacher.source=cache",
                                  f"stage1.teacher.cache={tmp_path / 'top4'}")))
    top4 = train_rows(tmp_path / "top4run")[0]
    assert top4["loss/ce"] == pytest.approx(online[0]["loss/ce"], rel=1e-6)
    assert abs(top4["loss/kd"] - online[0]["loss/kd"]) > 1e-3 * online[0]["loss/kd"]
    # The tiny random student spreads its mass: most of it lies outside the teacher's top 4 of 256 tokens.
    assert 0.5 < top4["cache/student_mass_outside_topk"] < 1.0


def test_a_run_from_the_cache_never_reads_the_teachers_weights(tmp_path, small_tokenizer):
    """Every stage reads the cache: the teacher's weights file can be gone. Its config still gives the
    vocabulary; evaluation runs without agreement, teacher metrics or teacher samples."""
    from qwen_distillation.app import run
    from qwen_distillation.cache_teacher import cache_teacher

    teacher_dir = tmp_path / "teacher"
    _save_teacher(teacher_dir, seed=0)
    teacher = [f"model.teacher.path={teacher_dir}", "model.teacher.random_init=null", "stage1.max_steps=1",
               "eval.agreement=true", "eval.samples=true", "eval.samples_max_prompts=1", "eval.max_new_tokens=4"]
    cache_teacher(_config(tmp_path / "x", small_tokenizer, *teacher), tmp_path / "cache", k=8)
    weights = list(teacher_dir.glob("*.safetensors"))
    assert weights
    for path in weights:
        path.unlink()
    out = tmp_path / "cached"
    run(compose_config(_overrides(out, small_tokenizer, *teacher, "stage1.teacher.source=cache",
                                  f"stage1.teacher.cache={tmp_path / 'cache'}")))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"] == {}
    after = summary["student_after_stage"]["1"]
    assert "eval/general_nll" in after and not any(key.endswith("_top1_agreement") for key in after)
    samples = [json.loads(line) for line in (out / "stage1" / "samples.jsonl").read_text().splitlines()]
    assert samples and all("student" in row and "teacher" not in row for row in samples)
    # The same run with the online teacher needs the weights that are gone.
    with pytest.raises(Exception, match="(?i)safetensors|weights|no file"):
        run(compose_config(_overrides(tmp_path / "online", small_tokenizer, *teacher)))


def _save_teacher(directory, seed):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 tie_word_embeddings=False)).save_pretrained(directory)


def test_a_cache_of_other_weights_at_the_teachers_path_is_refused(tmp_path, small_tokenizer):
    """The teacher is a previous run's stageN/final, re-run with overwrite_output_dir=true: the same path
    and shapes, other weights. The cache named the teacher by its path only, so the stage trained against
    the old teacher's distribution, and the cache command resumed a cache of the old one."""
    import shutil

    from qwen_distillation.app import run
    from qwen_distillation.cache_teacher import cache_teacher
    from qwen_distillation.data.teacher_cache import read_manifest

    teacher_dir = tmp_path / "teacher"
    _save_teacher(teacher_dir, seed=0)
    shutil.copytree(teacher_dir, tmp_path / "original")
    teacher = [f"model.teacher.path={teacher_dir}", "model.teacher.random_init=null", "stage1.max_steps=1"]
    cache_teacher(_config(tmp_path / "x", small_tokenizer, *teacher), tmp_path / "cache", k=4)
    assert read_manifest(tmp_path / "cache")["teacher_fingerprint"]
    _save_teacher(teacher_dir, seed=1)  # another model over the same directory
    cached = ["stage1.teacher.source=cache", f"stage1.teacher.cache={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match=rf"stage1\.teacher\.cache=.*teacher weights: {teacher_dir} now holds "
                                          r"other weights.*made from other teacher weights.*cache_teacher --overwrite"):
        run(compose_config(_overrides(tmp_path / "run", small_tokenizer, *teacher, *cached)))
    assert not (tmp_path / "run" / "stage1").exists()
    with pytest.raises(ConfigError, match=r"--out .*other inputs \(teacher weights: .*--overwrite"):
        cache_teacher(_config(tmp_path / "x", small_tokenizer, *teacher), tmp_path / "cache", k=4)
    # The original weights back at the path: the same teacher, the cache is resumed (nothing left to write).
    shutil.rmtree(teacher_dir)
    shutil.copytree(tmp_path / "original", teacher_dir)
    assert cache_teacher(_config(tmp_path / "x", small_tokenizer, *teacher), tmp_path / "cache", k=4)[
        "examples_written"] == 0
    # A cache written before fingerprints were recorded is not refused for lacking one (and now records it).
    manifest = tmp_path / "cache" / "manifest.json"
    identity = json.loads(manifest.read_text())
    fingerprint = identity.pop("teacher_fingerprint")
    manifest.write_text(json.dumps(identity))
    assert cache_teacher(_config(tmp_path / "x", small_tokenizer, *teacher), tmp_path / "cache", k=4)[
        "examples_written"] == 0
    assert read_manifest(tmp_path / "cache")["teacher_fingerprint"] == fingerprint


@pytest.mark.parametrize("kwargs,message", [({"batch_size": 0}, "--batch_size 0: must be >= 1"),
                                            ({"examples_per_shard": 0}, "--examples_per_shard 0: must be >= 1"),
                                            ({"out_is_a_file": True}, "is a file")])
def test_cache_arguments_are_refused_before_the_teacher_loads(kwargs, message, tmp_path, small_tokenizer,
                                                              monkeypatch):
    import qwen_distillation.modeling.loading as loading
    import qwen_distillation.modeling.pair  # noqa: F401 - imported first, it binds the real loader, not the patch
    from qwen_distillation.cache_teacher import cache_teacher

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("the teacher was loaded"))
    out = tmp_path / "cache"
    if kwargs.pop("out_is_a_file", False):
        out.write_text("kept")
    with pytest.raises(ConfigError, match=message):
        cache_teacher(_config(tmp_path / "x", small_tokenizer), out, k=4, **kwargs)
    assert out.read_text() == "kept" if out.is_file() else not out.exists()


def test_an_agreement_best_metric_without_a_loaded_teacher_says_why(tmp_path, small_tokenizer):
    """With every stage reading the cache no teacher is loaded, so no agreement is computed; an agreement
    best_metric was refused with 'need eval.agreement=true', which the run already set."""
    from qwen_distillation.app import run
    from qwen_distillation.cache_teacher import cache_teacher

    cache_teacher(_config(tmp_path / "x", small_tokenizer), tmp_path / "cache", k=4)
    with pytest.raises(ConfigError, match=r"stage1\.best_metric=eval/medical_top1_agreement: this run computes no "
                                          r"agreement with the teacher, since every stage reads the teacher's cache"):
        run(compose_config(_overrides(tmp_path / "run", small_tokenizer, "stage1.teacher.source=cache",
                                      f"stage1.teacher.cache={tmp_path / 'cache'}", "eval.agreement=true",
                                      "stage1.best_metric=eval/medical_top1_agreement")))
    assert not (tmp_path / "run" / "stage1").exists()


def test_a_cache_of_other_inputs_is_refused_naming_what_differs(tmp_path, small_tokenizer):
    from qwen_distillation.app import run
    from qwen_distillation.cache_teacher import cache_teacher

    cache_teacher(_config(tmp_path / "x", small_tokenizer), tmp_path / "cache", k=4)
    cached = ["stage1.teacher.source=cache", f"stage1.teacher.cache={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match=r"stage1\.teacher\.cache=.*max_length: cache 64, run 48"):
        run(compose_config(_overrides(tmp_path / "a", small_tokenizer, "data.max_length=48", *cached)))
    with pytest.raises(ConfigError, match=r"data: the cache holds no entries for .*alpaca_en_demo"):
        run(compose_config(_overrides(tmp_path / "b", small_tokenizer, *cached,
                                      "data.general=[../shared/data/general/alpaca_en_demo.jsonl]")))
    with pytest.raises(ConfigError, match=r"other inputs \(k/dtype: cache 4/float32, run 8/float32\); choose another "
                                          r"directory or pass --overwrite"):
        cache_teacher(_config(tmp_path / "x", small_tokenizer), tmp_path / "cache", k=8)


def test_a_cache_of_the_same_file_read_otherwise_names_the_option_not_the_file_twice():
    """A run reading the cached file with another max_records was refused with 'no entries for F ... it was
    written for F'; the message now names the option that differs."""
    from qwen_distillation.data.teacher_cache import cache_identity, identity_differences

    def identity(**options):
        source = dict({"path": "data/g.jsonl", "sha256": "ab12", "format": "auto", "split": None, "subset": None,
                       "max_records": None}, **options)
        return cache_identity(teacher="t", tokenizer="tok", vocab_size=16, data=[source], max_length=8, k=4,
                              dtype="float32")

    assert identity_differences(identity(max_records=20), identity()) == [
        "data: data/g.jsonl read otherwise (max_records: cache 20, run None)"]
    assert identity_differences(identity(split="train", format="jsonl"), identity(path="moved/g.jsonl")) == [
        "data: moved/g.jsonl read otherwise (format: cache 'jsonl', run 'auto'; split: cache 'train', run None)"]
    assert identity_differences(identity(), identity(path="moved/g.jsonl")) == []  # the same content elsewhere
    (other,) = identity_differences(identity(), identity(sha256="cd34"))
    assert other.startswith("data: the cache holds no entries for data/g.jsonl (or a different version of it)")


def test_a_tokenizer_of_the_same_size_says_what_else_differs(tokenizer):
    """A tokenizer saved with an edited chat template was refused as 'tokenizer: cache '151665 tokens, sha256
    3858...', run '151665 tokens, sha256 de1e...'', two equal sizes and two hashes: nothing said what differed."""
    import copy

    from qwen_distillation.data.generated import tokenizer_description
    from qwen_distillation.data.teacher_cache import cache_identity, identity_differences

    edited = copy.deepcopy(tokenizer)
    edited.chat_template = tokenizer.chat_template + " "

    def identity(tok, size=16):
        return cache_identity(teacher="t", tokenizer=tok, vocab_size=size, data=[], max_length=8, k=4,
                              dtype="float32")

    (difference,) = identity_differences(identity(tokenizer_description(tokenizer)),
                                         identity(tokenizer_description(edited)))
    assert difference.startswith("tokenizer: cache '151665 tokens, sha256 ") and difference.endswith(
        "(the same number of tokens: the ids of the vocabulary or the chat template differ, e.g. a tokenizer saved "
        "with an edited chat_template)")
    (difference,) = identity_differences(identity("151665 tokens, sha256 ab"), identity("151666 tokens, sha256 cd"))
    assert difference == "tokenizer: cache '151665 tokens, sha256 ab', run '151666 tokens, sha256 cd'"


def test_a_stage_resumed_after_its_cache_was_replaced_is_refused(tmp_path, small_tokenizer, monkeypatch, capsys):
    """Killed mid-stage, the cache rebuilt at the same path with another k and dtype, then the same command:
    the stage resumed, its first steps trained against the old cache and the rest against the new one,
    without a word. Now it is refused up front, naming the cache, the run's files left as they were; with
    the original cache put back it resumes to the end."""
    from qwen_distillation.cache_teacher import cache_teacher
    from tests.conftest import kill_in_stages, run_cli, snapshot

    cache, out = tmp_path / "cache", tmp_path / "run"
    cache_teacher(_config(tmp_path / "x", small_tokenizer), cache, k=4)
    argv = _overrides(out, small_tokenizer, "stage1.teacher.source=cache", f"stage1.teacher.cache={cache}",
                      "stage1.save_every=1")

    def replaced_then_put_back(stage):
        assert (out / "stage1" / "checkpoint-1").is_dir()
        shutil.move(cache, tmp_path / "kept")
        cache_teacher(_config(tmp_path / "x", small_tokenizer), cache, k=2, dtype="bfloat16")
        before = snapshot(out)
        capsys.readouterr()  # only what the resumed command prints (not the cache command's log above)
        code, output = run_cli(argv, capsys)
        assert code == 2 and "Traceback" not in output
        assert (f"error: stage1.teacher.cache={cache}: holds another cache than the one stage1 started from (k/dtype "
                f"4/float32 -> 2/bfloat16") in output
        assert snapshot(out) == before
        shutil.rmtree(cache)
        shutil.move(tmp_path / "kept", cache)

    kill_in_stages(monkeypatch, lambda: run_cli(argv, capsys), stages=(1,), at_step=2,
                   after_each=replaced_then_put_back)
    assert json.loads((out / "run_state.json").read_text())["finished"]


def test_overwrite_keeps_the_old_cache_until_the_teacher_has_loaded(tmp_path, small_tokenizer, monkeypatch):
    """--overwrite deleted the old shards and wrote the new manifest before the teacher loaded: a
    damaged teacher (or Ctrl-C during a 72B load) left an empty cache of the new identity."""
    import qwen_distillation.modeling.loading as loading
    from qwen_distillation.cache_teacher import cache_teacher
    from qwen_distillation.data.teacher_cache import read_manifest

    cache_teacher(_config(tmp_path / "x", small_tokenizer), tmp_path / "cache", k=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}

    def damaged(*args, **kwargs):
        raise ConfigError("model.teacher.path: truncated")

    monkeypatch.setattr(loading, "load_causal_lm", damaged)
    with pytest.raises(ConfigError, match="truncated"):
        cache_teacher(_config(tmp_path / "x", small_tokenizer), tmp_path / "cache", k=8, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before
    monkeypatch.undo()
    cache_teacher(_config(tmp_path / "x", small_tokenizer), tmp_path / "cache", k=8, overwrite=True)
    assert read_manifest(tmp_path / "cache")["k"] == 8


def test_a_cache_missing_examples_is_refused_before_an_old_run_is_cleared(tmp_path, small_tokenizer):
    """A cache whose run was interrupted lacks some of the stage's examples: the run stops at start-up
    naming one, not at the first step that meets it, and overwrite_output_dir=true keeps the old run."""
    from qwen_distillation.app import run
    from qwen_distillation.cache_teacher import cache_teacher

    old = tmp_path / "old"
    run(compose_config(_overrides(old, small_tokenizer)))
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    cache_teacher(_config(tmp_path / "x", small_tokenizer), tmp_path / "cache", k=4, examples_per_shard=16)
    shard_files(tmp_path / "cache")[0].unlink()  # an interrupted cache: one of its shards never written
    # Named by its file and line, not only by its key (a content hash's first 16 digits and a record number).
    with pytest.raises(ConfigError, match=r"^package:qwen_distillation/data/demo/\w+\.jsonl line \d+: teacher cache "
                                          r".*: no entry for example"):
        run(compose_config(_overrides(old, small_tokenizer, "overwrite_output_dir=true",
                                      "stage1.teacher.source=cache", f"stage1.teacher.cache={tmp_path / 'cache'}")))
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == before
    assert json.loads((old / "run_state.json").read_text())["finished"]


def test_the_fp8_teacher_writes_a_cache_that_a_run_of_the_original_teacher_refuses(tmp_path, small_tokenizer,
                                                                                    monkeypatch):
    """model.teacher.fp8=true: the writer runs the FP8 teacher and the identity says so (an approximation
    of the teacher must not pass for it)."""
    from qwen_distillation.app import run
    from qwen_distillation.cache_teacher import cache_teacher
    from qwen_distillation.data.teacher_cache import read_manifest
    from qwen_distillation.modeling import fp8

    converted, convert = [], fp8.convert_to_fp8
    monkeypatch.setattr(fp8, "convert_to_fp8", lambda teacher, **kw: converted.append(convert(teacher, **kw)))
    cache_teacher(_config(tmp_path / "x", small_tokenizer, "model.teacher.fp8=true"), tmp_path / "cache", k=4)
    assert len(converted) == 1 and len(converted[0].converted) == 4 * 7
    assert read_manifest(tmp_path / "cache")["teacher"].endswith(":fp8")
    cached = ["stage1.teacher.source=cache", f"stage1.teacher.cache={tmp_path / 'cache'}"]
    with pytest.raises(ConfigError, match=r"stage1\.teacher\.cache=.*teacher: cache '.*:fp8', run '.*seed=42'"):
        run(compose_config(_overrides(tmp_path / "a", small_tokenizer, *cached)))


@pytest.mark.parametrize("extra, message", [
    (["stage1.teacher.source=cache"], "stage1.teacher.cache=None"),
    (["stage1.teacher.source=disk"], "stage1.teacher.source=disk"),
    (["stage1.teacher.source=cache", "stage1.teacher.cache=c", "stage1.loss.weights.feature=0.1"],
     "stage1.loss.weights.feature=0.1: needs the teacher's hidden states"),
    # Stage 2's three hidden-state terms at once, not one error (and one rerun) each.
    (["stage2.teacher.source=cache", "stage2.teacher.cache=c", "end_stage=2"],
     "stage2.loss.weights.feature=0.1, stage2.loss.weights.attention=0.1, stage2.loss.weights.contrastive=0.05: need "
     "the teacher's hidden states, which a top-k logit cache does not hold: set them to 0 or use the online teacher "
     "(override them, e.g. `stage2.loss.weights.feature=0 stage2.loss.weights.attention=0 "
     "stage2.loss.weights.contrastive=0`)"),
    (["stage1.teacher.source=cache", "stage1.teacher.cache=c", "stage1.loss.kd=tv"], "stage1.loss.kd=tv"),
])
def test_cache_options_are_checked_naming_them(tmp_path, small_tokenizer, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _config(tmp_path / "run", small_tokenizer, *extra)


def test_ranks_write_their_own_shards_and_together_equal_one_process(tmp_path, small_tokenizer, monkeypatch):
    """What `torchrun --nproc_per_node 2 -m qwen_distillation.cache_teacher` does, one rank after the other."""
    from qwen_distillation.cache_teacher import cache_teacher

    cfg = _config(tmp_path / "run", small_tokenizer)
    cache_teacher(cfg, tmp_path / "one", k=4)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stats = cache_teacher(cfg, tmp_path / "two", k=4)
        assert 0 < stats["examples_written"] < stats["examples_total"]
    assert {s.name[:12] for s in shard_files(tmp_path / "two")} == {"shard-R00000", "shard-R00001"}
    a, b = _entries(tmp_path / "one"), _entries(tmp_path / "two")
    assert a.keys() == b.keys()
    # Other micro-batches (other padding) move the teacher's fp32 sums by rounding only.
    assert all(torch.equal(a[key][0], b[key][0]) for key in a)
    assert all(torch.allclose(x, y, atol=1e-5) for key in a for x, y in zip(a[key][1:], b[key][1:]))


def _as_rank(monkeypatch, rank, world_size=2):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_overwrite_under_torchrun_replaces_the_cache_whatever_the_ranks_order(order, tmp_path, small_tokenizer,
                                                                             monkeypatch):
    """Rank 0 deleted every old shard and wrote the new manifest; the other ranks only read. A rank 1
    that ran before rank 0 took the examples of the old k=4 shards for done and skipped them, and rank 0
    then deleted those shards with any rank 1 had written: an incomplete cache. Rank 1 after rank 0
    meets the new manifest: it must not take its old shards for the new cache's."""
    from qwen_distillation.cache_teacher import cache_teacher

    cfg = _config(tmp_path / "run", small_tokenizer)
    cache_teacher(cfg, tmp_path / "one", k=8)
    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        cache_teacher(cfg, tmp_path / "two", k=4)
    for rank in order:
        _as_rank(monkeypatch, rank)
        stats = cache_teacher(cfg, tmp_path / "two", k=8, overwrite=True)
        assert 0 < stats["examples_written"] < stats["examples_total"]
    a, b = _entries(tmp_path / "one"), _entries(tmp_path / "two")
    assert a.keys() == b.keys() and all(b[key][0].shape[1] == 8 for key in b)
    assert all(torch.equal(a[key][0], b[key][0]) for key in a)
    assert sum(len(shard_index(s)) for s in shard_files(tmp_path / "two")) == len(b)  # the old shards are gone


def test_overwrite_of_an_unreadable_manifest_under_torchrun_whatever_the_ranks_order(tmp_path, small_tokenizer,
                                                                                     monkeypatch):
    """Rank 1 before rank 0 stopped at the unreadable manifest that rank 0 was to replace (or, once
    rank 0 had deleted it, counted the old shards rank 0 was deleting); rank 0 deleted every file it
    had listed, shards of other ranks among them."""
    from qwen_distillation.cache_teacher import cache_teacher
    from qwen_distillation.data.teacher_cache import read_manifest

    cfg = _config(tmp_path / "run", small_tokenizer)
    cache_teacher(cfg, tmp_path / "one", k=8)
    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        cache_teacher(cfg, tmp_path / "two", k=4)
    (tmp_path / "two" / "manifest.json").write_text('{"format_version": 1')  # damaged
    for rank in (1, 0):
        _as_rank(monkeypatch, rank)
        cache_teacher(cfg, tmp_path / "two", k=8, overwrite=True)
    assert read_manifest(tmp_path / "two")["k"] == 8
    a, b = _entries(tmp_path / "one"), _entries(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.equal(a[key][0], b[key][0]) for key in a)
    assert sum(len(shard_index(s)) for s in shard_files(tmp_path / "two")) == len(b)


# CacheWriter alone, two ranks in one process: six examples, example i of rank i % 2, whose rows
# (two per example) hold the identity's k in every cell, so a row tells which cache wrote it.
KEYS = [f"source:{i}" for i in range(6)]


def _identity(k):
    from qwen_distillation.data.teacher_cache import cache_identity

    return cache_identity(teacher="t", tokenizer="tok", vocab_size=16, data=[], max_length=8, k=k, dtype="float32")


def _writer(directory, k, rank, world_size=2):
    return CacheWriter(directory, _identity(k), rank=rank, world_size=world_size, overwrite=True)


def _write(writer, world_size=2):
    """The writer's share of KEYS that it has not done, one shard per example; returns those keys."""
    from qwen_distillation.data.teacher_cache import CachedExample

    k = writer.identity["k"]
    todo = [key for i, key in enumerate(KEYS) if i % world_size == writer.rank and key not in writer.done]
    for key in todo:
        writer.write([CachedExample(key, 0, torch.full((2, k), k), torch.full((2, k), -float(k)), torch.zeros(2))])
    return todo


def _cache(directory, k, world_size=2):
    """A whole cache of identity k, written by world_size ranks one after the other."""
    for rank in range(world_size):
        _write(_writer(directory, k, rank, world_size), world_size)


def _assert_whole(directory, k):
    reader = CacheReader(directory)
    assert reader.identity == _identity(k) and sorted(reader.where) == sorted(KEYS)
    assert all(torch.equal(reader.lookup(key, 0, 2)[0], torch.full((2, k), k)) for key in KEYS)


@pytest.mark.parametrize("steps", [
    "make 0, make 1, write 0, write 1",  # rank 1's writer meets rank 0's new manifest beside its old shards
    "make 1, write 1, make 0, write 0",  # rank 1 writes before rank 0 replaces the cache
    "make 1, make 0, write 0, write 1",  # rank 1's writer meets the old manifest and shards
])
def test_ranks_replacing_a_cache_in_any_order_leave_the_whole_new_cache(steps, tmp_path):
    """--overwrite of a k=4 cache by a k=8 run of two ranks that share no process group ("make R":
    rank R's writer is made; "write R": it writes its examples not done)."""
    _cache(tmp_path, 4)
    writers, written = {}, []
    for step in steps.split(", "):
        action, rank = step.split()
        if action == "make":
            writers[rank] = _writer(tmp_path, 8, int(rank))
        else:
            written += _write(writers[rank])
    assert sorted(written) == KEYS  # nothing of the old cache was taken for done
    _assert_whole(tmp_path, 8)
    assert len(shard_files(tmp_path)) == len(KEYS)  # every old shard deleted, by the rank that wrote it


def test_a_rank_that_dies_while_the_cache_is_replaced_leaves_no_old_rows_to_read(tmp_path):
    """Rank 1 stopped before its writer was made: its old shards stay (no other rank deletes a live
    rank's files), and a reader skips them, so training finds its examples missing rather than old;
    the cache command run again completes the cache. Old shards of a rank past the new world size are
    rank 0's to delete."""
    from qwen_distillation.data.teacher_cache import identity_digest, shard_header

    _cache(tmp_path, 4, world_size=3)
    _write(_writer(tmp_path, 8, 0))
    assert not list(tmp_path.glob("shard-R00002-*"))
    reader = CacheReader(tmp_path)
    assert sorted(reader.where) == KEYS[0::2] and [p.name[:12] for p in reader.stale] == ["shard-R00001"] * 2
    with pytest.raises(ConfigError, match="no entry for example source:1"):
        reader.lookup("source:1", 0, 2)
    _write(_writer(tmp_path, 8, 1))
    _assert_whole(tmp_path, 8)
    assert {shard_header(s)[1] for s in shard_files(tmp_path)} == {identity_digest(_identity(8))}


def _written_before_digests(directory):
    """The cache as written before shards recorded their identity: no digest in the shards, no
    shard_digests in the manifest."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for shard in shard_files(directory):
        with safe_open(str(shard), framework="pt") as handle:
            examples = handle.metadata()["examples"]
        save_file(load_file(str(shard)), str(shard), metadata={"examples": examples})
    manifest = directory / "manifest.json"
    manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items() if k != "shard_digests"}))


def test_a_cache_written_before_shard_digests_is_read_resumed_and_replaced(tmp_path):
    """Its shards (no digest) are its manifest's: read, and resumed. Replaced under --overwrite, they
    are of the old cache, also for a rank that meets the new manifest."""
    resumed = tmp_path / "resumed"
    _write(_writer(resumed, 8, 0))
    _written_before_digests(resumed)
    assert sorted(CacheReader(resumed).where) == KEYS[0::2]
    assert _write(_writer(resumed, 8, 0)) == [] and _write(_writer(resumed, 8, 1)) == KEYS[1::2]
    _assert_whole(resumed, 8)
    replaced = tmp_path / "replaced"
    _cache(replaced, 4)
    _written_before_digests(replaced)
    rank0 = _writer(replaced, 8, 0)
    assert list(CacheReader(replaced).where) == []  # rank 1's old shards are not the new manifest's
    rank1 = _writer(replaced, 8, 1)  # meets the new manifest, of its own identity, beside its old shards
    assert rank1.done.isdisjoint(KEYS[1::2])
    assert sorted(_write(rank0) + _write(rank1)) == KEYS
    _assert_whole(replaced, 8)


@pytest.mark.parametrize("command", ["cache_teacher", "prune"])
@pytest.mark.parametrize("engine", [["distributed=zero3"], ["distributed=fsdp2"], ["--deepspeed", "ds.json"]])
def test_the_one_device_commands_refuse_a_training_engine_saying_why(command, engine, tmp_path, capsys):
    """Neither command uses `distributed`: under torchrun each cache rank holds the whole teacher. The
    refusal names the option, not a training-only check (stage 2's GradNorm under ZeRO-3) it would
    otherwise trip over, and nothing is written."""
    import importlib

    main = importlib.import_module(f"qwen_distillation.{command}").main
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "out"), *engine])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    label = "distributed=" + engine[0].split("=")[1] if engine[0] != "--deepspeed" else "--deepspeed ds.json"
    assert f"error: {label}: the {command.split('_')[0]} command" in err and "distributed=none" in err, err
    assert "gradnorm" not in err.lower()
    assert not (tmp_path / "out").exists()


def test_an_out_that_holds_no_cache_or_lies_in_the_data_is_refused_before_the_teacher_loads(tmp_path, small_tokenizer,
                                                                                            monkeypatch):
    """The shards were written among a model directory's files, and into a directory read as data (a
    run over it then read them as records)."""
    import re

    import qwen_distillation.modeling.loading as loading
    import qwen_distillation.modeling.pair  # noqa: F401 - imported first, it binds the real loader, not the patch
    from qwen_distillation.cache_teacher import cache_teacher

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("the teacher was loaded"))
    model = tmp_path / "model"
    model.mkdir()
    names = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    for name in names:
        (model / name).write_text("{}")
    with pytest.raises(ConfigError, match=rf"^--out {re.escape(str(model))}: is not empty \(config\.json, "
                                          rf"generation_config\.json, model\.safetensors and 1 more\) and holds "
                                          rf"no teacher cache .*choose an empty or new directory"):
        cache_teacher(_config(tmp_path / "x", small_tokenizer), model, k=4, overwrite=True)
    assert sorted(p.name for p in model.iterdir()) == names
    data = tmp_path / "data"
    data.mkdir()
    (data / "general.jsonl").write_bytes((REPO / "qwen_distillation" / "data" / "demo" / "general.jsonl").read_bytes())
    out = data / "cache"
    with pytest.raises(ConfigError, match=rf"^--out {re.escape(str(out))} lies inside data\.general\[0\]="
                                          rf"{re.escape(str(data))}, a directory read as data"):
        cache_teacher(_config(tmp_path / "x", small_tokenizer, f"data.general=[{data}]"), out, k=4)
    assert [p.name for p in data.iterdir()] == ["general.jsonl"]


def test_a_file_given_as_the_cache_is_named_as_such(tmp_path):
    """It read '<file>/manifest.json: unreadable ([Errno 20] Not a directory); write the cache again'."""
    from qwen_distillation.data.teacher_cache import read_manifest

    data = tmp_path / "general.jsonl"
    data.write_text("{}\n")
    with pytest.raises(ConfigError, match=rf"^{data}: a file, not a teacher-cache directory"):
        read_manifest(data)


def test_examples_of_folders_and_hub_datasets_get_keys_of_their_own(tmp_path):
    """A folder or hub source had no content hash, and its examples were keyed by the first 16 characters of
    its name: /x/dataset_general and /x/dataset_medical (or two subsets of one hub dataset) shared keys, and a
    run met the other source's entry as 'cached with other tokens'; editing a folder's file left the cache
    stale, with an identity that --overwrite saw as unchanged."""
    from qwen_distillation.data.teacher_cache import example_key, source_hashes

    general, medical = tmp_path / "dataset_general", tmp_path / "dataset_medical"
    for folder, text in ((general, "a"), (medical, "b")):
        folder.mkdir()
        (folder / "part.jsonl").write_text(json.dumps({"instruction": text, "output": text}) + "\n")
    hashes = source_hashes({str(general): str(general), str(medical): str(medical), "acme/med": "acme/med"})
    assert hashes[str(general)] and hashes[str(medical)] and hashes["acme/med"] is None
    keys = {example_key({"source": str(folder), "index": 1}, hashes) for folder in (general, medical)}
    keys |= {example_key({"source": "acme/med", "index": 1, "part": part}, hashes) for part in ("en/train", "zh/train")}
    keys |= {example_key({"source": f"acme/medical-{name}", "index": 1}, hashes) for name in ("reasoning", "dialogue")}
    assert len(keys) == 6, keys
    (general / "part.jsonl").write_text(json.dumps({"instruction": "a", "output": "edited"}) + "\n")
    assert source_hashes({str(general): str(general)})[str(general)] != hashes[str(general)]


def test_a_hub_source_read_with_a_subset_or_split_tags_its_examples(monkeypatch, tokenizer):
    """The part (subset/split) keeps two subsets of one hub dataset apart in a teacher cache's keys; a local
    file (keyed by its content hash) carries none."""
    from qwen_distillation.data import sources
    from qwen_distillation.data.sources import DataSource, encode_source

    records = [(i, {"instruction": f"question {i}", "output": f"answer {i}"}) for i in range(3)]
    monkeypatch.setattr(sources, "load_records", lambda *args, **kwargs: records)
    tagged = encode_source(DataSource(path="acme/med", subset="en", split="train"), tokenizer, 64)
    assert [e["part"] for e in tagged] == ["en/train"] * 3
    assert [e["part"] for e in encode_source(DataSource(path="acme/med"), tokenizer, 64)] == ["/train"] * 3
    local = REPO / "qwen_distillation" / "data" / "demo" / "general.jsonl"
    assert "part" not in encode_source(DataSource(path=str(local)), tokenizer, 64)[0]


def test_the_cache_of_a_softcapped_teacher_holds_its_own_distribution():
    """The writer took `hidden @ lm_head.weight.T` for every teacher: a Gemma-2 teacher's final logit softcap
    was left out, and its cached top-1 log-probabilities were 0.0 where the model's own were -0.4 to -0.8."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from qwen_distillation.training.teacher_cache import teacher_entries

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    teacher = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(100.0)  # logits far beyond the softcap
    input_ids = torch.randint(3, 64, (2, 10))
    labels = input_ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    entries = teacher_entries(teacher, batch, vocab_size=64, k=4)
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(input_ids=input_ids).logits.float(), -1)
    for b, (ids, cached, _) in enumerate(entries):
        expected = logprobs[b, 3:9].gather(-1, ids)
        torch.testing.assert_close(cached, expected, rtol=1e-5, atol=1e-5)


def test_a_teachers_path_spelled_otherwise_is_the_same_teacher_when_its_weights_are():
    """`model.teacher.path=/m/t/` against a cache of `/m/t` was refused as another teacher (write a new cache:
    hours for a large one), as was `--teacher ../t` resuming generated data; the sampled fingerprints decide."""
    from qwen_distillation.data import generated
    from qwen_distillation.data.teacher_cache import cache_identity, identity_differences

    def identity(teacher, fingerprint="f1"):
        return cache_identity(teacher=teacher, tokenizer="tok", vocab_size=16, data=[], max_length=8, k=4,
                              dtype="float32", teacher_fingerprint=fingerprint)

    assert identity_differences(identity("/m/t"), identity("/m/t/")) == []
    assert identity_differences(identity("/m/t"), identity("../t")) == []
    assert identity_differences(identity("/m/t", None), identity("/m/t/", None)) == [
        "teacher: cache '/m/t', run '/m/t/'"]  # no fingerprints: the path alone
    assert identity_differences(identity("/m/t"), identity("/m/t:fp8")) == ["teacher: cache '/m/t', run '/m/t:fp8'"]
    (weights,) = identity_differences(identity("/m/t"), identity("/m/t/", "f2"))[1:]
    assert weights.startswith("teacher weights: /m/t/ now holds other weights")
    recorded = {"teacher": "/m/t", generated.TEACHER_FINGERPRINT: "f1", "format": "alpaca"}
    assert generated.identity_differences(recorded, {**recorded, "teacher": "/m/t/"}) == []
    assert generated.identity_differences(recorded, {**recorded, "teacher": "/m/t/", "format": "medical_o1"}) == [
        "format: 'alpaca' -> 'medical_o1'"]


def test_a_resume_after_the_cached_stage_finished_needs_its_cache_no_more(tmp_path, small_tokenizer, monkeypatch,
                                                                         capsys):
    """Stage 1 read a cache and finished, stage 2 (online) was killed, the cache was then deleted (disk, or
    rebuilt elsewhere): the same command refused to resume ('stage1.teacher.cache=...: no teacher cache
    here'), though only stage 2 trains again, and the only fix offered was to run the teacher over the whole
    data again. A stage the run state records complete is not trained again, so its cache is not asked for."""
    from qwen_distillation.cache_teacher import cache_teacher
    from tests.conftest import kill_in_stages, run_cli

    cache, out = tmp_path / "cache", tmp_path / "run"
    cache_teacher(_config(tmp_path / "x", small_tokenizer), cache, k=4)
    argv = [a if a != "end_stage=1" else "end_stage=2" for a in _overrides(out, small_tokenizer)] + [
        "stage1.teacher.source=cache", f"stage1.teacher.cache={cache}", "stage2.save_every=1", "stage2.eval_every=0"]

    def cache_deleted(stage):
        assert json.loads((out / "run_state.json").read_text())["completed_stages"] == [1]
        shutil.rmtree(cache)

    kill_in_stages(monkeypatch, lambda: run_cli(argv, capsys), stages=(2,), at_step=1, after_each=cache_deleted)
    state = json.loads((out / "run_state.json").read_text())
    assert state["finished"] and state["completed_stages"] == [1, 2]
    # A new run (another output_dir) still needs the cache, named, before anything loads.
    code, output = run_cli([a if not a.startswith("output_dir=") else f"output_dir={tmp_path / 'new'}" for a in argv],
                           capsys)
    assert code == 2 and f"error: stage1.teacher.cache={cache}: no teacher cache here" in output
