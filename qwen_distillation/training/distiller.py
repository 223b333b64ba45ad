"""The Distiller: runs stages ``start_stage..end_stage`` over one teacher/student pair.

setup (output dir, models, data, evaluator, logger) -> evaluate the teacher and the initial
student -> for each stage: train, evaluate, export ``stageN/best`` and ``stageN/final``, write
the quality samples -> summary and report.
A killed run resumes from ``stageN/checkpoint`` when the same command is run again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from qwen_distillation.config.schema import DistillationConfig, StageConfig
from qwen_distillation.data.hard_sampling import HardExampleSampler, score_indices
from qwen_distillation.data.manager import StageSampler, collate, length_grouped_batches, micro_batches
from qwen_distillation.data.sources import DomainData, build_domain_data
from qwen_distillation.errors import ConfigError, DistillationError
from qwen_distillation.evaluation.direction import best_direction, improves
from qwen_distillation.evaluation.samples import PROMPT_FIELDS, samples_markdown
from qwen_distillation.losses.fused import resolve_kernel
from qwen_distillation.modeling.pair import ModelPair, build_pair
from qwen_distillation.modeling.speed import apply_speedups
from qwen_distillation.training import checkpoint as ckpt
from qwen_distillation.training.metrics import MetricsLogger, scrub_secrets
from qwen_distillation.training.balancing import Balancer
from qwen_distillation.training.evaluator import Evaluator, build_evaluator
from qwen_distillation.training.plan import build_heads, build_plan, loss_weights, shared_parameter
from qwen_distillation.training.step import lr_lambda, micro_batch_terms, per_example_nll

log = logging.getLogger(__name__)

STAGE_KEYS = {1: "stage1", 2: "stage2", 3: "stage3"}
# Sections whose change makes an existing output_dir a different run.
RUN_IDENTITY = ("model", "data", "stage1", "stage2", "stage3", "eval", "lora", "seed", "start_stage", "end_stage",
                "checkpoint_path")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


class NonFiniteLossError(DistillationError):
    pass


class Distiller:
    """Multi-stage teacher->student distillation driven by a :class:`DistillationConfig`."""

    def __init__(self, config: DistillationConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.run_config = scrub_secrets(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))
        self.run_hash = hashlib.sha256(json.dumps({k: self.run_config[k] for k in RUN_IDENTITY}, sort_keys=True,
                                                  default=str).encode()).hexdigest()[:16]

    # ----------------------------------------------------------------- set-up
    def _check_output_dir(self) -> dict | None:
        """Decide between a new run and a resume, reading only: never overwrite a finished
        run silently. Returns the run state to resume, or None for a new run."""
        cfg = self.config
        state = ckpt.read_run_state(self.output_dir)
        if state is not None:
            if cfg.overwrite_output_dir:
                return None
            if state.get("finished"):
                raise ConfigError(f"output_dir={self.output_dir} holds a finished run (stages "
                                  f"{state.get('completed_stages')}); choose another output_dir or pass "
                                  f"overwrite_output_dir=true to replace it")
            elif state.get("run_hash") != self.run_hash or not cfg.resume:
                raise ConfigError(f"output_dir={self.output_dir} holds an unfinished run with a different "
                                  f"configuration (or resume=false); rerun the same command to resume it, choose "
                                  f"another output_dir, or pass overwrite_output_dir=true to start over")
        elif self.output_dir.exists() and any(self.output_dir.iterdir()) and not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir={self.output_dir} exists, is not empty and holds no qwen_distillation run; "
                              f"choose a new directory or pass overwrite_output_dir=true to write into it")
        return state

    def _prepare_output_dir(self, state: dict | None) -> dict:
        """Create the output directory (clearing a previous run's files when overwriting);
        called only once models and data have loaded, so bad input never costs old outputs."""
        if state is None and self.output_dir.exists() and self.config.overwrite_output_dir:
            for child in self.output_dir.iterdir():
                if child.name.startswith(("stage", ".stage")) or child.name in (
                        "metrics.jsonl", "tensorboard", "config.yaml", "summary.json", ckpt.RUN_STATE,
                        "report.md", "report", ".report.tmp", ".report.old"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            state = {"run_hash": self.run_hash, "finished": False, "completed_stages": [], "initial_eval": None}
        (self.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.run_config))
        ckpt.write_json_atomic(self.output_dir / ckpt.RUN_STATE, state)
        return state

    def _select_device(self) -> None:
        train = self.config.train
        if train.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(train.device)
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
        precision = train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 (--fp16) needs a CUDA GPU; use bf16 or fp32 on the CPU")
        self.precision = precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # Student master weights stay fp32 and autocast runs the matmuls in low precision;
        # the frozen teacher is stored in the low-precision dtype directly.
        self.teacher_dtype = self.autocast_dtype or torch.float32
        if train.num_threads > 0:
            torch.set_num_threads(train.num_threads)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------- evaluation
    def evaluate(self, model) -> dict[str, float]:
        """Every metric the ``eval`` node asks for (always held-out NLL/PPL); see
        :meth:`Evaluator.metrics` for the keys."""
        return self.evaluator.metrics(model)

    def _check_best_metrics(self, metrics: dict[str, float], indices: list[int]) -> None:
        """Fail before training, not at a stage's first evaluation, on a best_metric that no
        evaluation produces (every evaluation yields the keys of the initial one)."""
        for index in indices:
            key = STAGE_KEYS[index]
            metric = getattr(self.config, key).best_metric
            if metric not in metrics:
                raise ConfigError(f"{key}.best_metric={metric} is not among the evaluation metrics {sorted(metrics)}; "
                                  f"choose one of them (agreement and MCQ metrics need eval.agreement=true / "
                                  f"eval.mcq)")

    def _write_samples(self, index: int, stage: StageConfig, state: dict) -> None:
        """The teacher's and the student's greedy answers to the prompts, side by side, in
        ``stageN/samples.jsonl`` and ``stageN/samples.md`` (and a wandb table). The teacher's
        answers are generated once per run and kept in the run state."""
        teacher_rows = state.get("teacher_samples")
        if not self.evaluator.prompts_match(teacher_rows):
            teacher_rows = self.evaluator.teacher_samples()
            state["teacher_samples"] = teacher_rows
        rows = self.evaluator.student_samples(self.pair.student, teacher_rows)
        stage_dir = self.output_dir / f"stage{index}"
        ckpt.write_text_atomic(stage_dir / "samples.jsonl",
                               "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        header = (f"# Quality samples after stage {index} ({stage.name})\n\n"
                  f"Greedy answers (chat template, at most {self.config.eval.max_new_tokens} new tokens) of the "
                  f"teacher and of the student at the end of stage {index} (global step {self.global_step}).\n\n")
        ckpt.write_text_atomic(stage_dir / "samples.md", header + samples_markdown(rows))
        columns = [*PROMPT_FIELDS, "teacher", "student"]
        self.logger.log_table(f"samples/stage{index}", columns, [[row[c] for c in columns] for row in rows],
                              step=self.global_step)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ stage
    def _stage_steps(self, stage: StageConfig) -> int:
        if stage.max_steps:
            return stage.max_steps
        ratio = stage.medical_ratio
        sizes = {"general": len(self.data.general), "medical": len(self.data.medical)}
        if max(ratio.start, ratio.end) == 0:
            pool = sizes["general"]
        elif min(ratio.start, ratio.end) == 1:
            pool = sizes["medical"]
        else:
            pool = sizes["general"] + sizes["medical"]
        return max(1, math.ceil(stage.epochs * pool / (stage.batch_size * stage.grad_accum)))

    def _sampler(self, key: str, stage: StageConfig, total_steps: int, index: int):
        per_step = stage.batch_size * stage.grad_accum
        seed = self.config.seed + index
        if stage.sampling.mode == "hard":
            domain = "medical" if stage.medical_ratio.start == 1.0 else "general"
            return HardExampleSampler(getattr(self.data, domain), examples_per_step=per_step, seed=seed,
                                      domain=domain, stage=key,
                                      uniform_floor=stage.sampling.uniform_floor,
                                      temperature=stage.sampling.temperature,
                                      rescore_every=stage.sampling.rescore_every)
        ratio = stage.medical_ratio
        return StageSampler(self.data.general, self.data.medical, examples_per_step=per_step,
                            total_steps=total_steps, schedule=ratio.schedule, start=ratio.start, end=ratio.end,
                            num_steps=ratio.num_steps, seed=seed, stage=key)

    def _score_examples(self, sampler: HardExampleSampler, stage: StageConfig) -> None:
        """Score (a subset of) the pool with the student's current loss, for hard-example sampling."""
        indices = score_indices(len(sampler.examples), stage.sampling.max_scored, sampler.step, sampler.seed)
        examples = [sampler.examples[i] for i in indices]
        scores: list[float] = []
        was_training = self.pair.student.training
        self.pair.student.eval()
        with self._autocast():
            for chunk in micro_batches(examples, max(stage.batch_size, 8)):
                batch = self._to_device(collate(chunk, self.pair.pad_token_id))
                scores.extend(per_example_nll(self.pair.student, batch, self.pair.vocab_size).tolist())
        self.pair.student.train(was_training)
        sampler.update_scores(indices, scores)
        finite = torch.tensor([x for x in scores if math.isfinite(x)])
        if finite.numel():
            counts = torch.histc(finite, bins=10, min=float(finite.min()), max=float(finite.max()))
            edges = torch.linspace(float(finite.min()), float(finite.max()), 11)
            # Logged with the step it prepares, so a resume past it drops and redoes it.
            self.logger.log({"stage": self._stage_index, "step": sampler.step + 1, "global_step": self.global_step,
                             "sampler/scored": len(scores),
                             "sampler/score_histogram": {"edges": [round(float(e), 4) for e in edges],
                                                         "counts": [int(c) for c in counts]}})

    def _run_stage(self, index: int, state: dict) -> None:
        key = STAGE_KEYS[index]
        self._stage_index = index
        stage: StageConfig = getattr(self.config, key)
        student, plan = self.pair.student, self.plans[index]
        stage_dir = self.output_dir / f"stage{index}"
        total_steps = self._stage_steps(stage)
        sampler = self._sampler(key, stage, total_steps, index)
        params = [p for p in student.parameters() if p.requires_grad] + list(self.heads.parameters())
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay,
                                      fused=self.device.type == "cuda")
        warmup = math.ceil(stage.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total_steps, warmup, stage.lr_scheduler, stage.min_lr_ratio))
        scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        weights = loss_weights(plan)
        balancing = stage.loss.balancing
        balancer = Balancer(balancing.method, list(weights), weights, alpha=balancing.gradnorm_alpha,
                            lr=balancing.gradnorm_lr, seed=self.config.seed + index)
        shared = shared_parameter(student, plan)
        step, best, bad_total = 0, None, 0
        resume_dir = ckpt.recover(stage_dir / "checkpoint")
        if resume_dir.exists():
            saved = ckpt.load_training_state(resume_dir, model=student, optimizer=optimizer, scheduler=scheduler,
                                             sampler=sampler)
            extra = saved["extra"]
            step, best, bad_total = saved["step"], extra.get("best"), extra.get("bad_total", 0)
            self.global_step = extra["global_step"]
            self.heads.load_state_dict(extra["heads"])
            balancer.load_state_dict(extra["balancer"])
            log.info("%s: resuming at step %d/%d from %s", key, step, total_steps, resume_dir)
        self.logger.truncate(index, step)
        teacher = self.pair.teacher if plan.needs_teacher else None
        student.train()
        progress = self._progress(key, total_steps, step)
        bad_in_row = 0
        while step < total_steps:
            started = time.perf_counter()
            if isinstance(sampler, HardExampleSampler) and sampler.needs_scores():
                self._score_examples(sampler, stage)
            served = sampler.next_step()
            batches = length_grouped_batches(served.examples, stage.batch_size, self.pair.pad_token_id, self.device)
            n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            sums: dict[str, float] = {}
            balance_log: dict[str, float] = {}
            finite = True
            for batch in batches:
                with self._autocast():
                    terms, info = micro_batch_terms(student, teacher, batch, plan, self.heads)
                # Token-level sums are normalised by the step's valid tokens; the contrastive
                # term (per sequence) is averaged over the micro-batches.
                terms = {name: value / (len(batches) if name == "contrastive" else max(n_tokens, 1))
                         for name, value in terms.items()}
                if not all(torch.isfinite(v) for v in terms.values()):
                    finite = False
                    break
                if scaler:
                    terms = {name: scaler.scale(value) for name, value in terms.items()}
                balance_log = balancer.backward(terms, params, shared=shared)
                for name, value in info.items():
                    sums[name] = sums.get(name, 0.0) + value
            grad_norm = float("nan")
            if finite:
                if scaler:
                    scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    params, stage.max_grad_norm if stage.max_grad_norm > 0 else float("inf")))
                finite = math.isfinite(grad_norm)
            lr = scheduler.get_last_lr()[0]
            if finite:
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                bad_in_row = 0
            else:
                bad_in_row += 1
                bad_total += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            self.global_step += 1
            per_token = {f"loss/{name}": (value / (len(batches) if name == "contrastive" else max(n_tokens, 1)))
                         if finite else float("nan") for name, value in sums.items()}
            total = sum(plan.weights.get(name[5:], 0.0) * value for name, value in per_token.items())
            row = {"stage": index, "stage_name": stage.name, "step": step, "global_step": self.global_step,
                   "loss": total, "loss/ce": float("nan"), "loss/kd": float("nan"), **per_token, "lr": lr,
                   "medical_ratio": served.medical_ratio, "medical_ratio_target": served.medical_ratio_target,
                   "tokens": n_tokens, "tokens_per_s": n_tokens / max(time.perf_counter() - started, 1e-9),
                   "grad_norm": grad_norm, "skipped": not finite, "bad_steps": bad_total}
            if balancing.method != "none":
                row.update(balance_log)
            if isinstance(sampler, HardExampleSampler):
                row.update(sampler.stats())
            self.logger.log(row)
            if progress is not None:
                progress.set_postfix(loss=f"{row['loss']:.3f}", medical_ratio=f"{served.medical_ratio:.2f}")
                progress.update(1)
            if bad_in_row >= self.config.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"{key} step {step}: {bad_in_row} non-finite losses or gradients in a row (loss/ce="
                    f"{row['loss/ce']}, loss/kd={row['loss/kd']}); lower {key}.lr, check the data, or use "
                    f"train.precision=fp32")
            is_last = step == total_steps
            if (stage.eval_every and step % stage.eval_every == 0) or is_last:
                metrics = self.evaluate(student)
                self.logger.log({"stage": index, "step": step, "global_step": self.global_step, **metrics})
                value = metrics.get(stage.best_metric)
                if value is None:
                    raise ConfigError(f"{key}.best_metric={stage.best_metric} is not among the evaluation metrics "
                                      f"{sorted(metrics)}; choose one of them")
                if improves(value, best, best_direction(stage.best_metric, stage.best_mode)):
                    best = value
                    ckpt.export_model(student, self.pair.tokenizer, stage_dir / "best",
                                      base_model_dir=self.pair.base_model_dir, merge=self.config.lora.merge_on_export)
                self.last_eval = metrics
            if (stage.save_every and step % stage.save_every == 0) and not is_last:
                ckpt.save_training_state(stage_dir / "checkpoint", model=student, optimizer=optimizer,
                                         scheduler=scheduler, sampler=sampler, step=step,
                                         extra={"best": best, "bad_total": bad_total,
                                                "global_step": self.global_step, "heads": self.heads.state_dict(),
                                                "balancer": balancer.state_dict()})
        if progress is not None:
            progress.close()
        ckpt.export_model(student, self.pair.tokenizer, stage_dir / "final", base_model_dir=self.pair.base_model_dir,
                          merge=self.config.lora.merge_on_export)
        ckpt.save_heads(stage_dir / "heads.pt", self.heads)
        if self.evaluator.prompts:
            self._write_samples(index, stage, state)
        state["completed_stages"] = sorted(set(state["completed_stages"]) | {index})
        state.setdefault("stage_eval", {})[str(index)] = self.last_eval
        state["global_step"] = self.global_step
        ckpt.write_json_atomic(self.output_dir / ckpt.RUN_STATE, state)
        shutil.rmtree(stage_dir / "checkpoint", ignore_errors=True)

    def _progress(self, key: str, total: int, initial: int):
        if not self.config.logging.progress_bar:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=key, unit="step", dynamic_ncols=True)

    # -------------------------------------------------------------------- run
    def run(self) -> dict:
        cfg = self.config
        state = self._check_output_dir()
        self._select_device()
        seed_everything(cfg.seed)
        resume_from = max(state["completed_stages"], default=0) if state else 0
        self.pair: ModelPair = build_pair(cfg, device=self.device, teacher_dtype=self.teacher_dtype,
                                          output_dir=self.output_dir, resume_after_stage=resume_from)
        self.teacher_stream = bool(cfg.train.teacher_stream and self.device.type == "cuda"
                                   and self.pair.teacher is not None)
        self.speedups = apply_speedups([m for m in (self.pair.student, self.pair.teacher) if m is not None],
                                       device=self.device, compile=cfg.train.compile,
                                       liger_kernels=cfg.train.liger_kernels)
        self.data: DomainData = build_domain_data(cfg.data, self.pair.tokenizer, seed=cfg.data.split_seed)
        # Built before the output directory is touched: a bad MCQ or prompts file costs no old outputs.
        self.evaluator: Evaluator = build_evaluator(
            cfg.eval, teacher=self.pair.teacher, tokenizer=self.pair.tokenizer, vocab_size=self.pair.vocab_size,
            eval_sets=self.data.eval_sets, pad_token_id=self.pair.pad_token_id, device=self.device,
            autocast=self._autocast)
        state = self._prepare_output_dir(state)
        indices = [i for i in range(cfg.start_stage, cfg.end_stage + 1) if getattr(cfg, STAGE_KEYS[i]).enabled]
        self.plans = {i: build_plan(getattr(cfg, STAGE_KEYS[i]), STAGE_KEYS[i], self.pair.student, self.pair.teacher,
                                    self.pair.vocab_size) for i in indices}
        for i, plan in self.plans.items():
            try:  # a kernel that cannot run here fails now, naming the stage, not at its first step
                plan.kernel = resolve_kernel(plan.kernel, self.device, plan.kd)
            except ValueError as err:
                raise ConfigError(f"{STAGE_KEYS[i]}.{err}") from err
            plan.teacher_stream = self.teacher_stream
        self.heads = build_heads([getattr(cfg, STAGE_KEYS[i]) for i in indices], list(self.plans.values()),
                                 self.pair.student, self.pair.teacher).to(self.device)
        if resume_from:
            ckpt.load_heads(self.output_dir / f"stage{resume_from}" / "heads.pt", self.heads)
        self.logger = MetricsLogger(self.output_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                                    wandb_cfg=cfg.logging.wandb, run_config=self.run_config)
        self.global_step = state.get("global_step", 0)
        self.last_eval = {}
        try:
            if state.get("initial_eval") is None:
                state["initial_eval"] = {"student": self.evaluate(self.pair.student),
                                         "teacher": self.evaluate(self.pair.teacher)}
                ckpt.write_json_atomic(self.output_dir / ckpt.RUN_STATE, state)
            self._check_best_metrics(state["initial_eval"]["student"],
                                     [i for i in indices if i not in state["completed_stages"]])
            for index in range(cfg.start_stage, cfg.end_stage + 1):
                stage = getattr(cfg, STAGE_KEYS[index])
                if index in state["completed_stages"] or not stage.enabled:
                    continue
                seed_everything(cfg.seed + index)
                self._run_stage(index, state)
        finally:
            self.logger.close()
        state["finished"] = True
        ckpt.write_json_atomic(self.output_dir / ckpt.RUN_STATE, state)
        summary = self._summary(state)
        ckpt.write_json_atomic(self.output_dir / "summary.json", summary)
        try:
            from qwen_distillation.evaluation.report import write_report

            summary["report"] = str(write_report(self.output_dir, summary))
        except Exception as err:  # noqa: BLE001 - a finished run must not fail on its report
            log.warning("could not write the run report: %s", err)
        print(self._summary_text(summary))
        return summary

    def _summary(self, state: dict) -> dict:
        return {"output_dir": str(self.output_dir), "stages": state["completed_stages"],
                "device": str(self.device), "precision": self.precision,
                "final_models": {s: str(self.output_dir / f"stage{s}" / "final") for s in state["completed_stages"]},
                "metrics": str(self.output_dir / "metrics.jsonl"),
                "tensorboard": str(self.output_dir / "tensorboard"),
                "teacher": state["initial_eval"]["teacher"], "student_before": state["initial_eval"]["student"],
                "student_after_stage": state.get("stage_eval", {}),
                "loss_kernels": {str(i): plan.kernel for i, plan in self.plans.items()},
                "speedups": self.speedups,
                "teacher_stream": self.teacher_stream,
                "samples": {s: str(self.output_dir / f"stage{s}" / "samples.md") for s in state["completed_stages"]
                            if (self.output_dir / f"stage{s}" / "samples.md").exists()}}

    @staticmethod
    def _summary_text(summary: dict) -> str:
        from qwen_distillation.evaluation.report import TABLE_NOTE, results_table

        lines = ["", f"Before and after training ({TABLE_NOTE}):", *results_table(summary)]
        lines += ["", f"Models:  {', '.join(summary['final_models'].values())}",
                  f"Metrics: {summary['metrics']} (TensorBoard: {summary['tensorboard']})",
                  f"Summary: {Path(summary['output_dir']) / 'summary.json'}"]
        if summary.get("samples"):
            lines.append(f"Samples: {', '.join(summary['samples'].values())}")
        if summary.get("report"):
            lines.append(f"Report:  {summary['report']}")
        return "\n".join(lines)
