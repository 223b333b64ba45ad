"""The teacher-cache writer and reader given bad input: an empty data set, another tool's or an
unreadable manifest.json in --out, a student tokenizer with its own chat template. Tiny random Qwen2
models with the 256-token word-level tokenizer of tests/test_teacher_cache.py."""

from __future__ import annotations

import json

import pytest

from qwen_distillation.errors import CheckpointError, ConfigError
from tests.conftest import compose_config, snapshot
from tests.test_teacher_cache import _config, _overrides, small_tokenizer  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_teacher(monkeypatch):
    """The teacher must not load: what is refused is refused before it (minutes for a large one)."""
    import qwen_distillation.modeling.loading as loading
    import qwen_distillation.modeling.pair  # noqa: F401 - imported first, it binds the real loader, not the patch

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: pytest.fail("the teacher was loaded"))


def test_an_empty_data_set_is_refused_and_no_cache_is_written(tmp_path, small_tokenizer, no_teacher):  # noqa: F811
    """With data.general=[] data.medical=[] it wrote a manifest and no shard, and reported success
    (exit 0, examples_total 0): an empty cache that every run then refused example by example."""
    from qwen_distillation.cache_teacher import cache_teacher

    cfg = _config(tmp_path / "x", small_tokenizer, "data.general=[]", "data.medical=[]")
    with pytest.raises(ConfigError, match=r"^data\.general, data\.medical: no training examples to cache"):
        cache_teacher(cfg, tmp_path / "cache", k=4, overwrite=True)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("manifest", ['{"name": "my-dataset", "version": 3}', "[]"])
def test_another_tools_manifest_is_refused_even_with_overwrite(manifest, tmp_path, small_tokenizer,  # noqa: F811
                                                               no_teacher):
    """A directory of the user's with its own manifest.json was taken for a cache 'of other inputs':
    --overwrite replaced that manifest.json and wrote shards among the user's files; a JSON list
    there ended in an AttributeError traceback."""
    from qwen_distillation.cache_teacher import cache_teacher

    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text(manifest)
    (out / "notes.txt").write_text("important")
    before = snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"its manifest\.json is not a teacher cache's .*choose an empty or "
                                              r"new directory"):
            cache_teacher(_config(tmp_path / "x", small_tokenizer), out, k=4, overwrite=overwrite)
    assert snapshot(out) == before


def test_a_run_names_a_manifest_that_is_not_a_caches(tmp_path):
    """stageN.teacher.cache= a directory whose manifest.json is a JSON list: an AttributeError traceback."""
    from qwen_distillation.data.teacher_cache import CacheReader
    from qwen_distillation.training.teacher_cache import CachedTeacher, CacheSpec

    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(ConfigError, match=rf"^stage1\.teacher\.cache={tmp_path}: its manifest\.json is not a "
                                          rf"teacher cache's \(it holds a JSON list"):
        CachedTeacher(CacheReader(tmp_path), [], CacheSpec({}, {}), tail="bucket", where="stage1.teacher.cache")


def test_overwrite_replaces_a_cache_whose_manifest_cannot_be_read(tmp_path, small_tokenizer):  # noqa: F811
    """The error said 'unreadable ...; write the cache again with --overwrite', and --overwrite
    stopped at the same error: no way on but deleting the directory by hand."""
    from qwen_distillation.cache_teacher import cache_teacher
    from qwen_distillation.data.teacher_cache import read_manifest

    out = tmp_path / "cache"
    cfg = _config(tmp_path / "x", small_tokenizer)
    cache_teacher(cfg, out, k=4)
    (out / "manifest.json").write_text('{"format_version": 1')  # damaged
    with pytest.raises(CheckpointError, match="unreadable"):  # without --overwrite: kept, as it is
        cache_teacher(cfg, out, k=4)
    (out / "notes.txt").write_text("important")  # beside a file of the user's: refused even with --overwrite
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"cannot be read and it holds notes\.txt, which a teacher cache does not"):
        cache_teacher(cfg, out, k=4, overwrite=True)
    assert snapshot(out) == before
    (out / "notes.txt").unlink()
    stats = cache_teacher(cfg, out, k=8, overwrite=True)
    assert stats["examples_written"] == stats["examples_total"] > 0
    assert read_manifest(out)["k"] == 8
    # Shards record the identity they were written under: those of the run's own are kept.
    (out / "manifest.json").write_text('{"format_version": 1')
    assert cache_teacher(cfg, out, k=8, overwrite=True)["examples_written"] == 0
    assert read_manifest(out)["k"] == 8


def test_the_cache_holds_the_ids_a_run_with_its_own_student_tokenizer_reads(tmp_path, small_tokenizer):  # noqa: F811
    """The writer encoded the data with the teacher's tokenizer, the run with the student's: a student
    tokenizer of the same vocabulary but another chat template made every cache the command wrote,
    from the run's own config, one the run refused ('tokenizer: cache ..., run ...')."""
    import shutil

    from qwen_distillation.app import run
    from qwen_distillation.cache_teacher import cache_teacher

    student_tokenizer = tmp_path / "student_tokenizer"
    shutil.copytree(small_tokenizer, student_tokenizer)
    config_file = student_tokenizer / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    config_file.write_text(json.dumps(config))
    student = f"model.student.tokenizer={student_tokenizer}"
    cache_teacher(_config(tmp_path / "x", small_tokenizer, student), tmp_path / "cache", k=4)
    cached = ["stage1.teacher.source=cache", f"stage1.teacher.cache={tmp_path / 'cache'}", "stage1.max_steps=1"]
    run(compose_config(_overrides(tmp_path / "run", small_tokenizer, student, *cached)))
    assert json.loads((tmp_path / "run" / "run_state.json").read_text())["finished"]
