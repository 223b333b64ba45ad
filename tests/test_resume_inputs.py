"""Resuming a run and starting from a saved stage with inputs that changed or point elsewhere:
a LoRA adapter continued from ``checkpoint_path`` (or trained on a full-model ``checkpoint_path``
and resumed) exports adapters that load, and a run resumed after the model at its
``checkpoint_path`` was replaced is refused before anything is written."""

from __future__ import annotations

import itertools
import json
import logging
import shutil

from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import compose_config, kill_in_stages, run_cli, snapshot, tiny_overrides

LORA = ["lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj,v_proj]"]


def _base_of(adapter) -> str:
    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_an_adapter_continued_from_checkpoint_path_exports_adapters_that_load(tmp_path, capsys):
    """README: "A later run can continue training the adapter with --use_lora --checkpoint_path
    out/stage1/final". Its exports named that adapter's folder as their base model, which holds no
    config.json: they did not load."""
    first, continued = tmp_path / "first", tmp_path / "continued"
    code, output = run_cli(tiny_overrides(first, steps=1) + ["end_stage=1", *LORA], capsys)
    assert code == 0, output
    adapter = first / "stage1" / "final"
    code, output = run_cli(tiny_overrides(continued, steps=1) + ["end_stage=1", *LORA,
                                                                f"checkpoint_path={adapter}"], capsys)
    assert code == 0, output
    for export in ("best", "final"):
        assert _base_of(continued / "stage1" / export) == _base_of(adapter) == str((first / "student_base").resolve())
    assert AutoModelForCausalLM.from_pretrained(continued / "stage1" / "final")


def test_a_resumed_lora_run_over_a_full_model_checkpoint_exports_adapters_that_load(finished_run, tmp_path,
                                                                                      monkeypatch, capsys):
    """A LoRA run whose base is a full-model checkpoint_path, killed after its stage 1 and resumed: the
    later stages' adapters named OUTPUT_DIR/student_base (which such a run never writes) as their base."""
    out, base = tmp_path / "run", finished_run / "stage1" / "final"
    argv = tiny_overrides(out, steps=1) + ["end_stage=2", *LORA, f"checkpoint_path={base}"]

    def run_once():
        code, output = run_cli(argv, capsys)
        assert code == 0, output

    kill_in_stages(monkeypatch, run_once, stages=(2,), at_step=1)
    assert not (out / "student_base").exists()
    for stage in (1, 2):
        assert _base_of(out / f"stage{stage}" / "final") == str(base.resolve())
    assert AutoModelForCausalLM.from_pretrained(out / "stage2" / "final")


def test_resume_refuses_a_checkpoint_path_that_now_holds_other_weights(finished_run, tmp_path, monkeypatch,
                                                                         capsys):
    """Killed mid-stage with checkpoints saved, then the model at checkpoint_path replaced (a stage re-run
    with overwrite_output_dir=true): the resume failed on each checkpoint (a shape error for a model of
    another shape) and advised deleting them all, or continued a LoRA adapter over the other weights.
    Now it is refused up front, naming checkpoint_path, and the run's files are left as they were; with
    the original model put back it resumes."""
    start, out = tmp_path / "start", tmp_path / "run"
    shutil.copytree(finished_run / "stage1" / "final", start)
    argv = tiny_overrides(out, steps=2) + ["end_stage=1", "stage1.save_every=1", f"checkpoint_path={start}"]

    def replaced_then_put_back(stage):
        assert (out / "stage1" / "checkpoint-1").is_dir()
        weights = start / "model.safetensors"
        kept = weights.read_bytes()
        save_file({name: tensor * 2 for name, tensor in load_file(weights).items()}, weights)
        before = snapshot(out)
        code, output = run_cli(argv, capsys)
        assert code == 2
        assert f"error: checkpoint_path={start}: holds other weights than when this run started" in output
        assert "put that model back to resume" in output and "Traceback" not in output
        assert snapshot(out) == before
        weights.write_bytes(kept)

    # Killed after step 2 of stage 1 is logged; after the kill the weights are replaced, then put back.
    kill_in_stages(monkeypatch, lambda: run_cli(argv, capsys), stages=(1,), at_step=2,
                   after_each=replaced_then_put_back)
    assert json.loads((out / "run_state.json").read_text())["finished"]


def test_resume_refuses_a_held_out_split_that_moved_with_the_project(tmp_path, monkeypatch, capsys, tokenizer):
    """A data file outside the project is named in the held-out split by its path from the project
    root, so a resume from a clone of the project in another folder (a job that copies the code, a
    container that mounts it elsewhere) held out other records of the same file: the pools kept their
    sizes, the checkpoint's sampler state fit them, and the resumed steps trained on the records the
    run had held out. Now it is refused, naming both folders; from the original folder it resumes."""
    from qwen_distillation import paths
    from qwen_distillation.data.encode import split_heldout
    from qwen_distillation.data.sources import DataSource, encode_source
    from qwen_distillation.paths import locate

    data = tmp_path / "data" / "general.jsonl"
    data.parent.mkdir()
    shutil.copyfile(locate("package:qwen_distillation/data/demo/general.jsonl"), data)
    out = tmp_path / "run"
    argv = tiny_overrides(out, steps=2) + ["end_stage=1", "stage1.save_every=1", f"data.general=[{data}]"]
    original = paths.PROJECT_ROOT
    config = compose_config(argv).data
    logging.disable(logging.WARNING)  # its cut-at-max_length warning would reach a handler an earlier test's run
    try:  # left on that test's closed stderr: a "Logging error" traceback in this test's output
        examples = encode_source(DataSource(str(data)), tokenizer, config.max_length)
    finally:
        logging.disable(logging.NOTSET)

    def held_out(root):  # the indices of the records the split holds out with the project at ``root``
        monkeypatch.setattr(paths, "PROJECT_ROOT", root)
        held = split_heldout(examples, config.eval_fraction, config.max_eval_examples, config.split_seed)[1]
        monkeypatch.setattr(paths, "PROJECT_ROOT", original)
        return [e["index"] for e in held]

    # From the project, the file's path holds the tmp folder's: for about 1 tmp path in 600,000 (e.g. basetemp
    # /tmp/bt76615/pytest-0 from /tmp/probeA_1796693577) its split held out the same 4 records as from
    # elsewhere/project, and the resume rightly went on. The other clone is the first, one folder deeper each
    # time, whose split differs.
    elsewhere = next(root for root in (tmp_path.joinpath("elsewhere", *["deeper"] * depth, "project")
                                       for depth in itertools.count()) if held_out(root) != held_out(original))

    def resumed_from_another_clone(stage):
        assert (out / "stage1" / "checkpoint-1").is_dir()
        monkeypatch.setattr(paths, "PROJECT_ROOT", elsewhere)
        before = snapshot(out)
        code, output = run_cli(argv, capsys)
        assert code == 2, output
        assert "differ from those this run started with" in output and "Traceback" not in output
        assert f"which was {original} and is now {elsewhere}" in output
        assert snapshot(out) == before
        monkeypatch.setattr(paths, "PROJECT_ROOT", original)

    kill_in_stages(monkeypatch, lambda: run_cli(argv, capsys), stages=(1,), at_step=2,
                   after_each=resumed_from_another_clone)
    assert json.loads((out / "run_state.json").read_text())["finished"]


def test_resume_refuses_checkpoints_of_another_engine_or_launch_before_writing(tmp_path, monkeypatch, capsys):
    """A stage killed with checkpoints written by another engine (or a launch of other size) and resumed:
    each checkpoint was refused only as the stage opened, after the teacher loaded and after config.yaml had
    been rewritten with this launch's options (nothing on disk then said which engine wrote them). Now the
    resume is refused up front, from the checkpoints' meta.json, and the run's files are left as they were."""
    out = tmp_path / "run"
    argv = tiny_overrides(out, steps=2) + ["end_stage=1", "stage1.save_every=1"]

    def another_launch(stage):
        checkpoint = out / "stage1" / "checkpoint-1"
        meta = json.loads((checkpoint / "meta.json").read_text())
        assert meta == {"step": 1, "world_size": 1, "kind": "single-device"}
        for changed, expected in (({"kind": "deepspeed-zero2"}, "another engine (deepspeed-zero2, this run: "
                                   "single-device); resume it with distributed=zero2 (and the same launch)"),
                                  ({"world_size": 2}, "written by a launch of 2 process(es), this one has 1")):
            (checkpoint / "meta.json").write_text(json.dumps({**meta, **changed}))
            before = snapshot(out)
            code, output = run_cli(argv, capsys)
            assert code == 2, output
            assert f"{checkpoint / 'state.pt'}: " in output and expected in output, output
            assert "Traceback" not in output and "loading" not in output.lower()
            assert snapshot(out) == before
        (checkpoint / "meta.json").write_text(json.dumps(meta))

    kill_in_stages(monkeypatch, lambda: run_cli(argv, capsys), stages=(1,), at_step=2, after_each=another_launch)
    assert json.loads((out / "run_state.json").read_text())["finished"]
