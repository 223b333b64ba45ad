"""Host time per training step: where the host spends a step of the real stage loop, and how often
it waits for the device (docs/performance.md, "Host time per step").

    python benchmarks/host_profile.py --out benchmarks/results/host_profile_cpu/after.json     # tiny pair, CPU
    python benchmarks/host_profile.py --pair 1.5b-0.5b --device cuda --steps 20 --out OUT.json   # Qwen2.5 shapes

Runs stage 1 of ``run_distillation.py`` in this process (the demo data set, ``end_stage=1``, no
evaluation or checkpoint during the stage) on a random-init pair built from config: the tiny Qwen2
pair of ``conf/model/tiny_qwen2.yaml``, or with ``--pair`` the Qwen2.5 shapes of
``benchmarks/qwen_shapes.py`` (nothing is downloaded). More Hydra overrides follow the options.

The instrumentation lives here, not in the package: the benchmark wraps the methods a step calls
and times each on the host (``time.perf_counter``), per step:

* ``sampler_s``: the sampler serving the step's examples (``next_step``);
* ``batches_s``: building the micro-batches and copying them to the device (``length_grouped_batches``,
  and ``response_positions`` and ``to_device`` where the step calls them);
* ``teacher_s``: launching the teacher's forward of each micro-batch (``TeacherRunner.__call__``);
* ``forward_s``: the student's forward and loss terms of each micro-batch (``engine.forward``; on a GPU
  the host's launches, plus any wait for the device inside it);
* ``backward_s``: ``engine.backward`` of each micro-batch;
* ``engine_step_s``: ``engine.step`` (clipping, with the gradient norm read back, and the optimizer step);
* ``rest_s``: the rest of ``Distiller._train_step``: counting the tokens, summing the logged loss
  terms, building the log row;
* ``log_s``: ``MetricsLogger.log`` of the step's row (metrics.jsonl, TensorBoard when on);
* ``step_s``: the whole step, ``_train_step`` plus the log call.

Waits for the device, per step and per phase (``syncs``):

* on CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call (a copy to
  the host, ``.item()``, a boolean-mask index's ``nonzero``, ``torch.cuda.synchronize``) raise a warning;
  the benchmark records them all (``warnings.simplefilter("always")``) and counts them. These are real
  synchronisations, counted by CUDA's own hook;
* on the CPU there is no device to wait for, so a second run of the same steps counts the *host
  reads of tensor values* that would be synchronisations on a GPU: ``Tensor.item``, ``float()``,
  ``int()``, ``bool()``, ``tolist``, ``nonzero`` and indexing with a boolean mask, outside the building
  of the micro-batches (whose tensors are still on the host there) and outside ``torch.optim`` (whose
  step counters stay on the host on a GPU too). The wrappers slow every indexing, so the timed run
  does not carry them.

With ``--trace`` on CUDA, a third run of the first ``--trace-steps`` steps goes under ``torch.profiler``
and the report adds each step's GPU-idle share (``traced``): 1 - (union of the kernel, copy and set
intervals in the step) / (the step's wall time), and the GPU kernels that took the most time per step;
the tracing slows the host, so its step times are reported apart.

The report (JSON) holds each step's figures and their medians over the steps after ``--warmup``.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter without a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qwen_shapes import PAIRS, QWEN  # noqa: E402

PHASES = ("sampler_s", "batches_s", "teacher_s", "forward_s", "backward_s", "engine_step_s", "rest_s", "log_s")


def overrides(args, output_dir: Path) -> list[str]:
    """The Hydra overrides of the profiled run: stage 1 of the demo set on a random-init pair."""
    out = ["model=tiny_qwen2", "data=demo", f"output_dir={output_dir}", "overwrite_output_dir=true", "end_stage=1",
           f"train.device={args.device}", f"data.max_length={args.max_length}", "logging.progress_bar=false",
           "eval.agreement=false", "eval.mcq=[]", "eval.samples=false", "data.max_eval_examples=4",
           f"stage1.max_steps={args.steps}", f"stage1.batch_size={args.batch_size}",
           f"stage1.grad_accum={args.grad_accum}", "stage1.eval_every=0", "stage1.save_every=0",
           "train.save_every_minutes=0"]
    if args.pair != "tiny":
        for role, size in zip(("teacher", "student"), PAIRS[args.pair]):
            out += [f"model.{role}.random_init.{key}={value}" for key, value in QWEN[size].items()]
    return out + list(args.overrides)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qwen_distillation.app import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


class StepProfile:
    """Per-step host times of the phases (wrapped methods) and the device waits counted in each."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current: dict | None = None
        self.phase: str | None = None
        self.count_reads = False  # CPU: count the host reads of tensor values (count_host_reads)

    def wrap(self, owner, name: str, phase: str) -> None:
        """Time ``owner.name`` (a method or module function) as ``phase`` while a step runs."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if self.current is None or self.phase is not None:  # outside a step, or inside another phase
                return original(*args, **kwargs)
            self.phase = phase
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - started
                self.phase = None

        setattr(owner, name, timed)

    def wait(self, what: str) -> None:
        """Count one device wait (``what``) in the current step and phase."""
        if self.current is None:
            return
        phase = self.phase or "rest_s"
        syncs = self.current.setdefault("syncs", {})
        syncs[phase] = syncs.get(phase, 0) + 1
        kinds = self.current.setdefault("sync_calls", {})
        kinds[what] = kinds.get(what, 0) + 1


def instrument(profile: StepProfile) -> None:
    """Wrap the methods a training step calls (the package is left as it is on disk)."""
    from qwen_distillation.data import hard_sampling, manager
    from qwen_distillation.training import distiller, engine, metrics, teacher, teacher_cache

    profile.wrap(manager.StageSampler, "next_step", "sampler_s")
    profile.wrap(hard_sampling.HardExampleSampler, "next_step", "sampler_s")
    # The micro-batches' building on the host, their labelled positions and their copy, where a step has them.
    for name in ("length_grouped_batches", "response_positions", "to_device"):
        if hasattr(distiller, name):
            profile.wrap(distiller, name, "batches_s")
    profile.wrap(teacher.TeacherRunner, "__call__", "teacher_s")
    profile.wrap(teacher_cache.CachedTeacher, "__call__", "teacher_s")
    for engine_class in _engine_classes(engine):
        profile.wrap(engine_class, "forward", "forward_s")
        profile.wrap(engine_class, "backward", "backward_s")
        profile.wrap(engine_class, "step", "engine_step_s")
    profile.wrap(metrics.MetricsLogger, "log", "log_s")

    train_step = distiller.Distiller._train_step

    def profiled_train_step(self, run):
        profile.current = {"step": run.step + 1}
        started = time.perf_counter()
        with torch.profiler.record_function("host_profile_step"):
            row, outcome = train_step(self, run)
        profile.current["train_step_s"] = time.perf_counter() - started
        profile.current["tokens"] = row["tokens"]
        return row, outcome

    distiller.Distiller._train_step = profiled_train_step
    log = metrics.MetricsLogger.log

    def log_and_close_step(self, row, **kwargs):
        log(self, row, **kwargs)
        step = profile.current
        if step is not None and "train_step_s" in step:
            step["step_s"] = step.pop("train_step_s") + step.get("log_s", 0.0)
            step["rest_s"] = step["step_s"] - sum(step.get(p, 0.0) for p in PHASES if p != "rest_s")
            profile.steps.append(step)
            profile.current = None

    metrics.MetricsLogger.log = log_and_close_step


def _engine_classes(engine_module) -> list[type]:
    classes = [engine_module.SingleDeviceEngine]
    for module_name, class_name in (("deepspeed_engine", "DeepSpeedEngine"), ("fsdp_engine", "FSDP2Engine")):
        with contextlib.suppress(ImportError, AttributeError):
            module = __import__(f"qwen_distillation.training.{module_name}", fromlist=[class_name])
            classes.append(getattr(module, class_name))
    return classes


def count_host_reads(profile: StepProfile) -> None:
    """On the CPU: count the host reads of tensor values (the calls that wait for a GPU)."""
    tensor = torch.Tensor

    def counting(name: str, reads=lambda *a: True):
        original = getattr(tensor, name)

        def wrapper(self, *args, **kwargs):
            if (profile.count_reads and profile.current is not None and profile.phase != "batches_s" and reads(*args)
                    and os.sep + "optim" + os.sep not in sys._getframe(1).f_code.co_filename):
                profile.wait(name)
            return original(self, *args, **kwargs)

        setattr(tensor, name, wrapper)

    def boolean_index(index, *_):
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "nonzero"):
        counting(name)
    counting("__getitem__", boolean_index)
    counting("__setitem__", boolean_index)


def count_cuda_syncs(profile: StepProfile):
    """On CUDA: every synchronising call warns (sync debug mode); each warning is counted."""
    torch.cuda.set_sync_debug_mode("warn")
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" in str(message):
            profile.wait("cuda_sync")
            return
        show(message, category, filename, lineno, file, line)

    warnings.simplefilter("always")
    warnings.showwarning = record


def gpu_idle_shares(trace: Path, skip: int = 0, top: int = 15) -> tuple[list[float], list[dict]]:
    """Each profiled step's GPU-idle share from a Chrome trace of ``torch.profiler``, and the ``top``
    GPU kernels by their summed time over the steps after the first ``skip`` (ms per step)."""
    events = json.loads(trace.read_text())["traceEvents"]
    steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "host_profile_step"
                   and e.get("ph") == "X")
    busy = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X"
                  and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    shares = []
    for start, end in steps:
        covered, reached = 0.0, start
        for a, b in busy:
            a, b = max(a, reached), min(b, end)
            if b > a:
                covered += b - a
                reached = b
        shares.append(round(1 - covered / max(end - start, 1e-9), 4))
    kept = steps[skip:] or steps
    starts = [a for a, _ in kept]
    totals: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("cat") != "kernel":
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] < kept[i][1]:
            entry = totals.setdefault(e["name"], [0.0, 0])
            entry[0] += e["dur"]
            entry[1] += 1
    kernels = [{"kernel": name[:160], "ms_per_step": round(us / 1000 / len(kept), 3), "calls_per_step": n / len(kept)}
               for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]]
    return shares, kernels


PROFILE = StepProfile()


def run_profiled(args, *, count: str | None, trace: Path | None = None) -> list[dict]:
    """Run the stage with the phase timers (and ``count``: ``cuda`` or ``reads``); the profiled steps."""
    from qwen_distillation.app import run

    profile = PROFILE
    profile.steps, profile.count_reads = [], count == "reads"
    if count == "cuda":
        count_cuda_syncs(profile)
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = compose(overrides(args, Path(output_dir)))
        if trace is None:
            run(cfg)
        else:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                run(cfg)
            prof.export_chrome_trace(str(trace))
    if count == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    return profile.steps


def summarise(steps: list[dict], warmup: int) -> dict:
    kept = steps[warmup:] or steps
    keys = ["step_s", *PHASES]
    summary = {f"median_{k}": round(statistics.median(s.get(k, 0.0) for s in kept), 6) for k in keys}
    summary["median_host_share"] = {k: round(summary[f"median_{k}"] / summary["median_step_s"], 4) for k in PHASES}
    if any("syncs" in s for s in kept):
        summary["syncs_per_step"] = statistics.median(sum(s.get("syncs", {}).values()) for s in kept)
        phases = sorted({p for s in kept for p in s.get("syncs", {})})
        summary["syncs_per_step_by_phase"] = {p: statistics.median(s.get("syncs", {}).get(p, 0) for s in kept)
                                              for p in phases}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="tiny", choices=["tiny", *sorted(PAIRS)])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=4)
    parser.add_argument("--grad_accum", "--grad-accum", type=int, default=4)
    parser.add_argument("--max_length", "--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-count", action="store_true", help="skip counting the device waits")
    parser.add_argument("--trace", action="store_true", help="CUDA: GPU-idle share per step from torch.profiler")
    parser.add_argument("--trace-steps", dest="trace_steps", type=int, default=6,
                        help="steps of the traced run (a trace of every step can outlast a 10-minute call)")
    parser.add_argument("--out", type=Path, help="write the report (JSON) here")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. train.packing=true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    instrument(PROFILE)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    # SIGTERM (`timeout`, a scheduler) exits as an exception does: the run's temporary output_dir is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # The timed run: on CUDA it counts the synchronisations as well (the hook costs only at a sync).
    steps = run_profiled(args, count="cuda" if cuda and not args.no_count else None)
    report = {"command": " ".join(["python", "benchmarks/host_profile.py", *sys.argv[1:]]),
              "pair": args.pair, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
              "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length,
              "overrides": args.overrides,
              "sync_counting": None if args.no_count else (
                  "cuda sync debug mode (synchronising CUDA calls)" if cuda else
                  "host reads of tensor values outside batch building (a separate run)")}
    if not cuda and not args.no_count:
        count_host_reads(PROFILE)  # after the timed run: the wrappers slow every indexing
        counted = run_profiled(args, count="reads")
        for step, other in zip(steps, counted):
            step["syncs"], step["sync_calls"] = other.get("syncs", {}), other.get("sync_calls", {})
    for step in steps:
        for key in ("step_s", *PHASES):
            step[key] = round(step.get(key, 0.0), 6)
    report["summary"] = summarise(steps, args.warmup)
    report["steps_profiled"] = steps
    write(report, args.out)
    if cuda and args.trace:  # a third run, under torch.profiler (its own step times, slowed by the tracing)
        try:
            with tempfile.TemporaryDirectory() as scratch:
                trace = Path(scratch) / "trace.json"
                traced_args = argparse.Namespace(**{**vars(args), "steps": min(args.steps, args.trace_steps)})
                traced = run_profiled(traced_args, count=None, trace=trace)
                shares, kernels = gpu_idle_shares(trace, skip=min(args.warmup, traced_args.steps - 1))
            report["traced"] = {"gpu_idle_share": shares, "top_kernels": kernels,
                                "median_gpu_idle_share": statistics.median(shares[args.warmup:] or shares),
                                "median_step_s": statistics.median(s["step_s"] for s in traced[args.warmup:] or traced),
                                "steps": traced_args.steps}
        except Exception as err:  # the untraced figures are already written
            report["traced"] = {"error": repr(err)}
        write(report, args.out)
    print(json.dumps(report, indent=2))


def write(report: dict, out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
