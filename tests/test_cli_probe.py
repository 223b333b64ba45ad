"""Command lines that used to give a wrong result without a word: ``evaluate --out`` over earlier
results, a sweep into the output_dir of a single run, and a classic flag whose key ``~key`` deletes."""

from __future__ import annotations

import io
import json

import pytest
from omegaconf import OmegaConf

import qwen_distillation.evaluate as evaluate_module
from conftest import run_cli as _cli
from conftest import snapshot as _snapshot
from conftest import tiny_overrides
from qwen_distillation.cli import UsageError, check_sweep, translate

NLL = "m=package:qwen_distillation/data/demo/medical.jsonl"


# ------------------------------------------------------------------------------ evaluate --out
@pytest.fixture
def fake_evaluation(monkeypatch):
    """evaluate's main with the evaluation itself stubbed: the --out rules alone, in milliseconds."""
    calls = []

    def fake_evaluate(models, **kwargs):
        calls.append(models)
        return {name: {"eval/m_nll": 1.5} for name in models}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    monkeypatch.setattr(evaluate_module, "check_model_path", lambda *args, **kwargs: None)
    return calls


def _evaluate(out, *flags) -> int:
    return evaluate_module.main(["--model", "a=some/model", "--nll", NLL, "--device", "cpu", "--out", str(out), *flags])


def test_evaluate_refuses_an_out_holding_earlier_results_unless_overwrite(fake_evaluation, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("old json")
    (out / "results.md").write_text("old table")
    (out / "notes.txt").write_text("mine")
    assert _evaluate(out) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: --out {out}: holds earlier results (results.json, results.md); choose another "
                           f"directory or pass --overwrite to replace them"), err
    assert not fake_evaluation, "refused before any model loads"
    assert (out / "results.json").read_text() == "old json" and (out / "results.md").read_text() == "old table"
    (out / "results.json").unlink()  # one of the two is enough to refuse
    assert _evaluate(out) == 2 and "holds earlier results (results.md)" in capsys.readouterr().err
    assert _evaluate(out, "--overwrite") == 0
    assert json.loads((out / "results.json").read_text()) == {"a": {"eval/m_nll": 1.5}}
    assert (out / "results.md").read_text().startswith("| model |")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.json", "results.md"]
    assert _evaluate(tmp_path / "empty") == 0 and _evaluate(tmp_path / "empty", "--overwrite") == 0


class _Interrupted(io.TextIOBase):
    """A file that receives half of what is written to it, then is interrupted (Ctrl-C, a kill)."""

    def __init__(self, file):
        self.file = file

    def write(self, text):
        self.file.write(text[:len(text) // 2])
        self.file.flush()
        raise KeyboardInterrupt

    def close(self):
        self.file.close()


def test_evaluate_writes_its_results_atomically(fake_evaluation, tmp_path, monkeypatch):
    """Interrupted while writing the second file: no half-written results file, no temporary left, and
    the earlier results (with --overwrite) intact."""
    real_open = io.open

    def interrupt_the_second_write(monkeypatch):
        opened = []

        def fake_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if "w" in mode:
                opened.append(file)
                if len(opened) == 2:
                    return _Interrupted(handle)
            return handle

        monkeypatch.setattr(io, "open", fake_open)

    out = tmp_path / "eval"
    with monkeypatch.context() as patch:
        interrupt_the_second_write(patch)
        with pytest.raises(KeyboardInterrupt):
            _evaluate(out)
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text("old json")
    (out / "results.md").write_text("old table")
    with monkeypatch.context() as patch:
        interrupt_the_second_write(patch)
        with pytest.raises(KeyboardInterrupt):
            _evaluate(out, "--overwrite")
    assert (out / "results.json").read_text() == "old json" and (out / "results.md").read_text() == "old table"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]


# ------------------------------------------------------------------------------ sweeps
def test_a_sweep_into_the_output_dir_of_a_single_run_is_refused(finished_run, capsys):
    before = _snapshot(finished_run)
    code, output = _cli(tiny_overrides(finished_run, steps=1) + ["end_stage=1", "-m", "seed=1,2"], capsys)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert lines == [f"error: output_dir={finished_run} holds a finished single run, not a sweep: the sweep would "
                     f"write its job0/, job1/, ... folders among that run's files; choose a new output_dir for the "
                     f"sweep (e.g. output_dir={finished_run}_sweep); no job was started"], output
    assert _snapshot(finished_run) == before  # no job*/, no multirun.yaml
    # overwrite_output_dir=true reruns a sweep's jobs; it never clears the single run around them.
    code, output = _cli(tiny_overrides(finished_run, steps=1) + ["overwrite_output_dir=true", "-m", "seed=1,2"],
                        capsys)
    assert code == 2 and "holds a finished single run, not a sweep" in output, output
    assert _snapshot(finished_run) == before


def test_a_sweep_over_an_earlier_sweep_or_elsewhere_is_not_refused(finished_run, tmp_path):
    """Only a run_state.json at the top of the sweep's directory is refused: an earlier sweep's jobN/
    folders are the jobs' own to skip, resume or refuse (a job's run of another config: tests/test_errors.py);
    hydra.sweep.dir moves the sweep elsewhere."""
    sweep = tmp_path / "sweep"
    (sweep / "job7").mkdir(parents=True)  # an earlier sweep of more points
    (sweep / "job7" / "run_state.json").write_text(json.dumps({"finished": True, "completed_stages": [1]}))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    check_sweep(tiny_overrides(sweep, steps=1) + ["seed=1,2"])
    check_sweep(tiny_overrides(finished_run, steps=1) + ["seed=1,2", f"hydra.sweep.dir={tmp_path / 'elsewhere'}"])
    with pytest.raises(UsageError, match=r"hydra\.sweep\.dir=.* holds a finished single run, not a sweep"):
        check_sweep(tiny_overrides(sweep, steps=1) + ["seed=1,2", f"hydra.sweep.dir={finished_run}"])
    (sweep / "run_state.json").write_text(json.dumps({"finished": False, "completed_stages": []}))
    with pytest.raises(UsageError, match=f"output_dir={sweep} holds an unfinished single run, not a sweep"):
        check_sweep(tiny_overrides(sweep, steps=1) + ["seed=1,2"])


def test_a_sweep_of_output_dir_is_refused_before_any_job_starts(tmp_path, capsys, monkeypatch):
    """`-m output_dir=A,B` ran job0 in A/job0 and job1 in B/job1, and Hydra wrote multirun.yaml into the
    default outputs/run, which then refused a plain run as a folder holding no run."""
    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    code, output = _cli(tiny_overrides(a, steps=1) + ["end_stage=1", "-m", f"output_dir={a},{b}"], capsys)
    assert code == 2 and f"error: the sweep's jobs have 2 output_dirs ({a}, {b}): a sweep has one" in output, output
    assert "no job was started" in output
    assert not a.exists() and not b.exists() and not (tmp_path / "outputs").exists()


def test_a_sweep_into_a_home_relative_output_dir_goes_to_the_home_directory(tmp_path, monkeypatch, capsys):
    """A single run reads `output_dir='~/x'` as the home directory, but Hydra made the sweep's folder itself from
    `hydra.sweep.dir: ${output_dir}`: a folder named `~` in the working directory, with every job under it.
    The jobs are stubbed (only where Hydra puts them matters here)."""
    import qwen_distillation.training.distiller as distiller_module

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    jobs = []

    class Recording:
        def __init__(self, config):
            jobs.append(config.output_dir)

        def finished_summary(self):
            return None

        def run(self):
            return {}

    monkeypatch.setattr(distiller_module, "Distiller", Recording)
    code, output = _cli(tiny_overrides("'~/sweep'", steps=1) + ["end_stage=1", "-m", "seed=1,2"], capsys)
    assert code == 0, output
    assert jobs == [str(home / "sweep" / "job0"), str(home / "sweep" / "job1")]
    assert (home / "sweep" / "multirun.yaml").is_file()
    assert list(cwd.iterdir()) == []  # no folder named `~`
    # hydra.sweep.dir is Hydra's own: a `~` there is refused before Hydra makes the folder.
    code, output = _cli(tiny_overrides("'~/sweep'", steps=1) + ["-m", "seed=1,2", "hydra.sweep.dir='~/other'"], capsys)
    assert code == 2 and output.strip() == (
        f"error: hydra.sweep.dir='~/other': Hydra would create a folder named `~` in the working directory, not use "
        f"the home directory; write the path out (hydra.sweep.dir={home / 'other'}) or leave hydra.sweep.dir out (the "
        f"sweep then goes to output_dir, where `~` is the home directory); no job was started"), output
    assert list(cwd.iterdir()) == [] and len(jobs) == 2


# ------------------------------------------------------------------------------ a flag and ~key
@pytest.mark.parametrize("argv,message", [
    (["--seed", "1", "~seed"], "seed is set by --seed 1 and deleted by ~seed; keep one"),
    (["~seed", "--seed", "1"], "seed is set by --seed 1 and deleted by ~seed; keep one"),
    (["--seed=1", "~seed=1"], "seed is set by --seed 1 and deleted by ~seed=1; keep one"),
    (["--fp16", "~train.precision"], "train.precision is set by --fp16 and deleted by ~train.precision; keep one"),
    (["--teacher_model", "t", "~model.teacher"],
     "model.teacher.path is set by --teacher_model t and deleted by ~model.teacher; keep one"),
])
def test_a_classic_flag_and_a_deletion_of_its_key_are_refused(argv, message):
    with pytest.raises(UsageError) as err:
        translate(argv)
    assert str(err.value) == message


@pytest.mark.parametrize("argv,overrides", [
    (["seed=3", "~seed"], ["seed=3", "~seed"]),  # overrides among themselves: Hydra's
    (["~seed", "seed=3"], ["~seed", "seed=3"]),
    (["--seed", "1", "~stage1.lr"], ["seed=1", "~stage1.lr"]),  # another key
    (["~seeds", "--seed", "1"], ["~seeds", "seed=1"]),  # not a section above seed
])
def test_deletions_that_meet_no_classic_flag_stay_hydras(argv, overrides):
    assert translate(argv) == overrides


def test_seed_flag_then_its_deletion_exits_2_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    code, output = _cli(tiny_overrides(out, steps=1) + ["end_stage=1", "--seed", "1", "~seed"], capsys)
    assert code == 2 and output.strip() == "error: seed is set by --seed 1 and deleted by ~seed; keep one", output
    assert not out.exists()


# ------------------------------------------------------------------------------ paths of a run to start from
@pytest.mark.parametrize("argv", [
    ["--output_dir=~/run", "--checkpoint_path=~/out/stage1/best"],  # the shell leaves `--flag=~/x` alone
    ["output_dir='~/run'", "checkpoint_path='~/out/stage1/best'"],
])
def test_a_home_relative_output_dir_and_checkpoint_path_are_the_home_directory(argv, tmp_path, monkeypatch):
    """Hydra's lexer refused `--output_dir=~/run`; quoted, the run wrote a folder named `~` into the working
    directory and found no checkpoint under `~/...`."""
    from qwen_distillation.cli import compose_run_config

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose_run_config(translate(argv))
    assert (cfg.output_dir, cfg.checkpoint_path) == (str(tmp_path / "run"), str(tmp_path / "out" / "stage1" / "best"))


def test_home_relative_outputs_of_the_tools_and_a_teacher_cache_are_the_home_directory(tmp_path, monkeypatch):
    """`--out=~/cache` (left alone by the shell) wrote a folder named `~` into the working directory, and
    `stage1.teacher.cache='~/cache'` found no cache there: each is the home directory, as output_dir is."""
    from qwen_distillation import cache_teacher, generate_data, prune
    from qwen_distillation.cli import compose_run_config

    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_teacher._parser().parse_known_args(["--out=~/cache"])[0].out == str(tmp_path / "cache")
    assert prune._parser().parse_known_args(["--out=~/pruned"])[0].out == str(tmp_path / "pruned")
    args = generate_data.parse_args(["--teacher", "t", "--data", "d.jsonl", "--output=~/gen/x.jsonl"])
    assert args.output == str(tmp_path / "gen" / "x.jsonl")
    cfg = compose_run_config(["stage1.teacher.source=cache", "stage1.teacher.cache='~/cache'"])
    assert cfg.stage1.teacher.cache == str(tmp_path / "cache")


def test_an_empty_checkpoint_path_is_refused_not_taken_for_none(tmp_path, capsys):
    """`checkpoint_path=$CKPT` with CKPT unset trained stage 2 from the initial student, with a log line."""
    out = tmp_path / "run"
    code, output = _cli(tiny_overrides(out, steps=1) + ["start_stage=2", "end_stage=2", "checkpoint_path="], capsys)
    assert code == 2 and output.strip().startswith("error: checkpoint_path is empty, which would start from the "
                                                   "initial student; give the saved stage to start from"), output
    assert not out.exists()


def test_a_run_warns_of_the_lora_options_it_ignores(tmp_path, capsys):
    """`lora.r=8` without `lora.enabled=true` trained all of the student's weights without a word."""
    out = tmp_path / "run"
    code, output = _cli(tiny_overrides(out, steps=1) + ["end_stage=1", "lora.r=8",
                                                        f"checkpoint_path={tmp_path / 'missing'}"], capsys)
    assert code == 2 and "lora.r=8: ignored, LoRA is off (lora.enabled=false)" in output, output


# ------------------------------------------------------------------------------ --config-dir
def _user_conf(tmp_path):
    """The user's own config folder: a good preset and one that sets a stage number a run refuses."""
    conf = tmp_path / "my_conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "experiment" / "mine.yaml").write_text("# @package _global_\nexperiment: mine\nstage1: {lr: 7.0e-4}\n")
    (conf / "experiment" / "bad.yaml").write_text("# @package _global_\nend_stage: 5\n")
    return conf


def test_a_users_preset_without_an_experiment_line_is_recorded_by_its_name(tmp_path, capsys):
    """A preset of --config-dir that does not name itself (no `experiment: NAME` line) left `experiment: null` in
    the run's config.yaml, which reads as experiment=none: the stage options as written."""
    conf, out = _user_conf(tmp_path), tmp_path / "run"
    (conf / "experiment" / "quiet.yaml").write_text("# @package _global_\nseed: 7\n")
    code, output = _cli(["--config-dir", str(conf), "experiment=quiet"] + tiny_overrides(out, steps=1) +
                        ["end_stage=1"], capsys)
    assert code == 0, output
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.experiment == "quiet" and saved.seed == 7


@pytest.mark.parametrize("flag", ["--config-dir {}", "--config-dir={}", "-cd {}"])
def test_a_sweep_with_a_config_dir_is_checked_before_any_job_starts(tmp_path, capsys, flag):
    """With --config-dir the sweep's checks were skipped (`-m --config-dir C experiment=mine end_stage=1,5`
    trained job0, then stopped at job1) or composed without the user's folder (`--config-dir=C`)."""
    conf, out = _user_conf(tmp_path), tmp_path / "sweep"
    code, output = _cli(flag.format(conf).split() + ["-m", "experiment=mine"] + tiny_overrides(out, steps=1) +
                        ["end_stage=1,5"], capsys)
    assert code == 2 and "error: sweep job 1 (end_stage=5): end_stage=5: stages are numbered 1..3" in output, output
    assert not out.exists()


def test_cfg_job_and_the_tools_compose_with_the_users_config_dir(tmp_path, capsys):
    """`--cfg job` printed a preset of --config-dir that a run refuses with exit status 0, and the prune and
    cache_teacher commands stopped on Hydra's `LexerNoViableAltException: --config-dir`."""
    from qwen_distillation.cli import compose_run_config

    conf = _user_conf(tmp_path)
    code, output = _cli(["--config-dir", str(conf), "experiment=bad", "--cfg", "job"], capsys)
    assert code == 2 and "error: end_stage=5: stages are numbered 1..3" in output, output
    assert compose_run_config(translate(["--config-dir", str(conf), "experiment=mine"])).stage1.lr == 7.0e-4
    with pytest.raises(UsageError, match="--config-dir .*missing: no such directory"):
        compose_run_config(["--config-dir", str(tmp_path / "missing"), "experiment=mine"])


@pytest.mark.parametrize("flag", ["-cn {}", "--config-name {}", "--config-name={}"])
def test_a_primary_config_of_the_users_own_is_what_the_checks_compose(flag, tmp_path, capsys):
    """With `-cn NAME` (a primary config of the user's own folder, on conf/config.yaml) a sweep's checks were
    skipped (`-cn` reached Hydra's override parser) and `--cfg job` checked conf/config.yaml instead: a data file
    NAME names that is missing was found only as a job started, after the jobs before it had trained."""
    from qwen_distillation.cli import compose_run_config

    conf = _user_conf(tmp_path)
    (conf / "mine.yaml").write_text(f"defaults: [config, _self_]\nstage1: {{lr: 3.0e-4}}\n"
                                    f"data: {{medical: [{{path: {tmp_path / 'missing.jsonl'}}}]}}\n")
    (conf / "fine.yaml").write_text("defaults: [config, _self_]\nstage1: {lr: 3.0e-4}\nseed: 5\n")
    name = flag.format("mine").split()
    missing = f"data.medical[0]={tmp_path / 'missing.jsonl'}: file not found"
    out = tmp_path / "sweep"
    code, output = _cli(["-m", "--config-dir", str(conf)] + name + tiny_overrides(out, steps=1) + ["seed=1,2"],
                        capsys)
    assert code == 2 and f"error: sweep job 0 (seed=1): {missing}" in output and "no job was started" in output, output
    assert not out.exists()
    code, output = _cli(["--config-dir", str(conf)] + name + ["--cfg", "job"], capsys)
    assert code == 2 and f"error: {missing}" in output, output
    fine = compose_run_config(["--config-dir", str(conf)] + flag.format("fine").split() + ["stage2.lr=1e-5"])
    assert (fine.stage1.lr, fine.seed, fine.stage2.lr) == (3.0e-4, 5, 1e-5)
    # conf/ comes first, as in a run: a primary config named as one of conf/'s is conf/'s.
    (conf / "config.yaml").write_text("seed: 99\n")
    assert compose_run_config(["--config-dir", str(conf)]).seed == 42
    assert compose_run_config(["--config-dir", str(conf), "experiment=mine"]).stage1.lr == 7.0e-4


def test_a_sweep_over_a_config_groups_glob_is_checked_before_any_job_starts(tmp_path, capsys):
    """`-m stage1=glob(*)` (Hydra's sweep over a group's options) ended in a `HydraException: ConfigLoader is not
    set` traceback before any job started; its jobs are now listed as Hydra's sweeper lists them, the user's
    --config-dir's options included, and checked like any sweep's."""
    from qwen_distillation.cli import config_dir_override, sweep_jobs

    out = tmp_path / "sweep"
    code, output = _cli(["-m", "stage1=glob(*,exclude=general_kd)", "end_stage=1,5"] + tiny_overrides(out, steps=1),
                        capsys)
    assert code == 2 and "error: sweep job 1 (stage1=domain_kd end_stage=5): end_stage=5: stages are numbered " \
        "1..3" in output, output
    assert not out.exists()
    searchpath, rest = config_dir_override(["--config-dir", str(_user_conf(tmp_path)), "experiment=glob(*)"])
    assert [swept for _, swept in sweep_jobs(rest, searchpath)] == [
        [f"experiment={name}"] for name in ("arms", "bad", "demo", "mine", "none", "smoke")]


@pytest.mark.parametrize("flags", [["-m", "model.student.keep_layers=1,2"], ["--cfg", "job"]])
def test_the_tools_name_a_hydra_flag_they_do_not_take(flags, tmp_path, capsys):
    """`python -m qwen_distillation.prune --out X -m ...` (or `--cfg job`) ended in Hydra's
    `LexerNoViableAltException: -m`, which named neither the flag's problem nor a fix; --config-dir is taken."""
    from qwen_distillation import prune

    with pytest.raises(SystemExit) as exit_:
        prune.main(["--out", str(tmp_path / "pruned"), "--config-dir", str(tmp_path), "model=tiny_qwen2", *flags])
    output = capsys.readouterr().err
    assert exit_.value.code == 2 and output.startswith(
        f"error: {flags[0]}: python -m qwen_distillation.prune takes classic flags, Hydra overrides and --config-dir, "
        f"not Hydra's other flags"), output
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("override,named", [
    ("stage2.loss.weights={kdd:0.3}", "stage2.loss.weights.kdd (did you mean stage2.loss.weights.kd?)"),
    ("+stage2.loss.weights={kdd:0.3}", "stage2.loss.weights.kdd (did you mean stage2.loss.weights.kd?)"),
    ("stage2.loss={weights:{kd:0.3},balancng:{method:pcgrad}}", "stage2.loss.balancng (did you mean "
                                                                "stage2.loss.balancing?)"),
    ("eval={agreemnt:true}", "eval.agreemnt (did you mean eval.agreement?)"),
])
def test_a_mapping_override_with_an_unknown_key_inside_names_it(override, named, tmp_path, capsys):
    """`stage2.loss.weights={kdd:0.3}` ended with Hydra's "Could not override 'stage2.loss.weights'. To append to
    your config use +stage2.loss.weights={kdd:0.3}", advice that fails the same way, and no valid key."""
    code, output = _cli(["--cfg", "job", override], capsys)
    assert code == 2 and f"error: {override}: no such config key: {named}" in output, output
    assert "To append" not in output
    code, output = _cli(["-m", f"output_dir={tmp_path / 'sweep'}", "stage2.temperature=1,2", override], capsys)
    assert code == 2 and f"): {override}: no such config key: {named}" in output, output
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("mcq", ["[nothere.jsonl]", "[{path:package:qwen_distillation/data/demo/medical_mcq.jsonl,"
                                                   "fromat:cmexam}]"])
def test_a_sweep_over_multiple_choice_sets_is_checked_before_any_job_starts(mcq, tmp_path, capsys, monkeypatch):
    """`-m eval.mcq=[good.jsonl],[missing.jsonl]` trained job0 before job1 stopped on its missing file: the sweep's
    checks read the data entries and paths of every job, not those of eval.mcq."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep"
    code, output = _cli(["-m", "eval.mcq=[],[package:qwen_distillation/data/demo/medical_mcq.jsonl]," + mcq]
                        + [o for o in tiny_overrides(out, steps=1) if o != "eval.mcq=[]"] + ["end_stage=1"], capsys)
    assert code == 2 and "error: sweep job 2 (eval.mcq=" in output and "eval.mcq[0]" in output, output
    assert "no job was started" in output
    assert not out.exists()


@pytest.mark.parametrize("sweep,job,message", [
    ("data.medical=[package:qwen_distillation/data/demo/medical.jsonl],[]", "data.medical=[]",
     "stage2 serves medical data (medical_ratio above 0) but data.medical is empty"),
    ("stage2.enabled=true,false", "stage2.enabled=False", "no stage to run: stage2.enabled=false"),
])
def test_a_sweep_job_without_a_stage_to_run_or_its_data_is_refused_before_any_job_starts(sweep, job, message,
                                                                                         tmp_path, capsys):
    """`-m data.medical=[FILE],[]` trained job0 in full, then stopped at job1, refused from its config alone (stage 2
    serves medical data): the sweep's checks composed and validated each job but left out the Distiller's checks
    of the stages it trains."""
    out = tmp_path / "sweep"
    code, output = _cli(["-m"] + tiny_overrides(out, steps=1) + ["start_stage=2", "end_stage=2", sweep], capsys)
    assert code == 2 and f"error: sweep job 1 ({job}): {message}" in output and "no job was started" in output, output
    assert not out.exists()


def test_a_sweep_checks_the_teacher_caches_and_prompts_of_its_jobs_before_any_job_starts(tmp_path, capsys):
    """`-m stage2.teacher.source=online,cache stage2.teacher.cache=TYPO` trained job0 (online) in full, then job1
    stopped on the missing cache; so did a swept eval.prompts. A rerun sweep still skips a job whose earlier run
    completed the stage that read the cache, though the cache is gone."""
    from qwen_distillation.cli import compose_run_config
    from qwen_distillation.training.outputs import recorded_config, run_hash

    out = tmp_path / "sweep"
    cache = ["end_stage=2", f"stage2.teacher.cache={tmp_path / 'no_cache'}", "stage2.loss.weights.feature=0",
             "stage2.loss.weights.attention=0", "stage2.loss.weights.contrastive=0"]
    code, output = _cli(["-m"] + tiny_overrides(out, steps=1) + cache + ["stage2.teacher.source=online,cache"], capsys)
    assert code == 2 and "error: sweep job 1 (stage2.teacher.source=cache): stage2.teacher.cache=" in output and \
        "no teacher cache here" in output and "no job was started" in output, output
    assert not out.exists()
    prompts = ["eval.samples=true",
               f"eval.prompts=package:qwen_distillation/data/demo/prompts.jsonl,{tmp_path}/no.jsonl"]
    code, output = _cli(["-m"] + tiny_overrides(out, steps=1) + prompts, capsys)
    assert code == 2 and f"error: sweep job 1 (eval.prompts={tmp_path}/no.jsonl): eval.prompts=" in output, output
    assert not out.exists()
    # job0 of an earlier sweep finished both stages of the cached config: skipped, its cache not needed
    job = tiny_overrides(out, steps=1) + cache + ["stage2.teacher.source=cache"]
    (out / "job0").mkdir(parents=True)
    (out / "job0" / "run_state.json").write_text(json.dumps({
        "run_hash": run_hash(recorded_config(compose_run_config(job))), "finished": True, "completed_stages": [1, 2]}))
    check_sweep(job)
    # A new sweep whose jobs write into folders of the user's naming (hydra.sweep.subdir) is checked the same way;
    # in an earlier sweep's folder, where a job may have completed its stages, each job checks its own.
    own = ["hydra.sweep.subdir=run_${seed}", "stage2.teacher.source=online,cache"]
    with pytest.raises(UsageError, match=r"sweep job 1 \(stage2.teacher.source=cache\): stage2.teacher.cache=.*no "
                                         r"teacher cache here"):
        check_sweep(tiny_overrides(tmp_path / "new_sweep", steps=1) + cache + own)
    check_sweep(tiny_overrides(out, steps=1) + cache + own)


def test_a_sweep_whose_jobs_would_start_different_process_groups_is_refused_before_any_job_starts(tmp_path, capsys):
    """`-m distributed=fsdp2 distributed.timeout_minutes=10,20` (or a swept backend) ran every job on the process
    group job 0 started, which lasts the launch: the later jobs' values had no effect, without a word. Sweeps whose
    jobs start the same group (an engine beside distributed=none, `auto` where it means gloo) still run."""
    out = tmp_path / "sweep"
    tiny = tiny_overrides(out, steps=1) + ["end_stage=1"]
    code, output = _cli(["-m"] + tiny + ["distributed=fsdp2", "distributed.timeout_minutes=10,10,20"], capsys)
    assert code == 2 and ("error: sweep job 2 (distributed.timeout_minutes=20): its process group (backend gloo, "
                          "timeout 20 min) is not the one job 0 starts (backend gloo, timeout 10 min)") in output, \
        output
    assert "no job was started" in output and not out.exists()
    with pytest.raises(UsageError, match=r"sweep job 1 \(distributed=fsdp2 distributed.backend=nccl\): its process "
                                         r"group \(backend nccl, timeout 30 min\) is not the one job 0 starts "
                                         r"\(backend gloo"):
        check_sweep(tiny + ["distributed=fsdp2,zero2", "distributed.backend=gloo,nccl"])
    check_sweep(tiny + ["distributed=none,fsdp2,zero2", "distributed.backend=auto,gloo"])
    assert not out.exists()
