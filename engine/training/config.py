"""The settings of one training run: typed, frozen, grouped by concern as the flags are.

`engine.training.arguments.parse_args` builds a `TrainingConfig` from the flags (over an optional
YAML file) once, after checking them; nothing changes it afterwards, so every part of the run
reads the same values. Values the flags leave open are resolved there and stored here (the
global batch, the training iterations from --train-samples, the warmup and decay spans, bf16, the
model preset with its overrides, the parsed data blend and split); values that follow from
others are properties (data-parallel size, micro-batches per step). The field names are the
flags' (`--lr-warmup-iters` -> `optimizer.lr_warmup_iters`), except the preset: `model.preset`
is `--model`.

`to_dict` flattens a config into one JSON-able mapping keyed by flag name, plus the derived
values; checkpoints and the metrics loggers record a run's settings in that form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from engine.config import LLAMA_SPECIAL_TOKENS, ModelConfig
from engine.data.dataset import DataBlend, DataSplit
from engine.model.recompute import Recompute


@dataclass(frozen=True)
class ModelSettings:
    preset: str  # --model
    num_layers: int | None
    hidden_size: int | None
    ffn_hidden_size: int | None
    num_attention_heads: int | None
    num_query_groups: int | None
    freeze_vision: bool
    freeze_projector: bool
    freeze_llm: bool
    recompute_granularity: str | None
    recompute_method: str | None  # full: uniform or block (default uniform)
    recompute_num_layers: int | None  # full: layers per chunk (uniform) or per stage (block); default 1
    recompute_modules: tuple[str, ...] | None  # selective: default core_attn
    attention_backend: str

    @property
    def recompute(self) -> Recompute | None:
        """The activation-recompute setting of the four --recompute-* flags (checked at parse time)."""
        return Recompute.from_flags(self.recompute_granularity, self.recompute_method,
                                    self.recompute_num_layers, self.recompute_modules)


@dataclass(frozen=True)
class ParallelSettings:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    sequence_parallel: bool  # False when TP is 1: nothing to shard over
    use_distributed_optimizer: bool
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    ddp_bucket_size: int | None
    distributed_timeout_minutes: int
    heartbeat_timeout: float  # seconds without a peer's heartbeat before it is lost; 0 = not watched
    world_size: int

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def overlap_param_gather_active(self) -> bool:
        """The parameter all-gather exists only with the distributed optimizer."""
        return self.overlap_param_gather and self.use_distributed_optimizer


@dataclass(frozen=True)
class DataSettings:
    data_path: tuple[str, ...]  # the flag's words, as given
    data_blend_file: str | None  # instead of --data-path: a YAML list of {path, weight, loss}
    loss_policy: str  # for datasets whose entry does not name one
    blend: DataBlend  # --data-path or --data-blend-file, parsed
    split: DataSplit  # --split, parsed
    seq_length: int
    max_num_images: int
    max_images_per_sample: int | None
    packing_policy: str
    num_workers: int
    data_cache_path: str | None
    loader_timeout: float  # seconds a batch may take before the stuck worker is named; 0 = forever

    @property
    def pad_id(self) -> int:
        """Token id of the padding at the end of a packed sample (the dataset header carries no
        special ids; the data is tokenized with the LLaMA vocabulary the presets use)."""
        return LLAMA_SPECIAL_TOKENS.pad


@dataclass(frozen=True)
class TrainingSettings:
    micro_batch_size: int
    global_batch_size: int  # default: micro-batch size x data-parallel size
    train_iters: int  # from --train-samples when that is given
    train_samples: int | None
    seed: int
    exit_interval: int | None
    exit_duration_in_mins: float | None
    max_skipped_steps: int
    gradient_accumulation_fusion: bool
    cross_entropy_loss_fusion: bool
    eval_interval: int
    eval_iters: int

    @property
    def evaluates(self) -> bool:
        """--eval-interval and --eval-iters both non-zero."""
        return bool(self.eval_interval and self.eval_iters)


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    min_lr: float
    lr_decay_style: str
    lr_warmup_fraction: float
    lr_warmup_iters: int  # from --lr-warmup-fraction of the decay span when not given
    lr_decay_iters: int  # default: the training iterations
    weight_decay: float
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    optimizer_cpu_offload: bool  # Adam state and update on the host (mcore's HybridDeviceOptimizer)
    optimizer_offload_fraction: float  # share of this rank's optimizer shard offloaded
    overlap_cpu_optimizer_d2h_h2d: bool  # one host optimizer per parameter, transfers on side streams


@dataclass(frozen=True)
class PrecisionSettings:
    bf16: bool  # default: on with CUDA, off on CPU
    fp8_format: str | None  # None: no FP8
    fp8_recipe: str
    fp8_amax_history_len: int
    fp8_amax_compute_algo: str
    first_last_layers_bf16: bool
    num_layers_at_start_in_bf16: int
    num_layers_at_end_in_bf16: int
    fp8_vision: bool

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def fp8_plan(self):
        """The FP8 part of the kernel plan (engine.model.specs.Fp8Plan), None without --fp8-format."""
        from engine.model.specs import Fp8Plan

        if self.fp8_format is None:
            return None
        bf16_layers = (self.num_layers_at_start_in_bf16, self.num_layers_at_end_in_bf16) \
            if self.first_last_layers_bf16 else (0, 0)
        return Fp8Plan(format=self.fp8_format, recipe=self.fp8_recipe, amax_history_len=self.fp8_amax_history_len,
                       amax_compute_algo=self.fp8_amax_compute_algo, bf16_layers_at_start=bf16_layers[0],
                       bf16_layers_at_end=bf16_layers[1], vision=self.fp8_vision)


@dataclass(frozen=True)
class CheckpointSettings:
    save: str | None
    load: str | None
    save_interval: int | None
    keep_last: int | None
    export_hf_interval: int | None  # every N-th saved checkpoint -> <save>/hf/iter_* in the background
    export_hf_keep: int | None
    tokenizer_model: str | None  # for those exports; default <save>/tokenizer.model
    async_save: bool
    dist_ckpt_optim_fully_reshardable: bool
    ckpt_save_threads: int
    pretrained_checkpoint: str | None
    no_save_optim: bool  # weights, schedule and data position only (resume with --no-load-optim)
    no_load_optim: bool
    no_load_rng: bool


@dataclass(frozen=True)
class LoggingSettings:
    log_interval: int
    log_jsonl: str | None
    tensorboard_dir: str | None
    wandb_project: str | None
    wandb_exp_name: str | None
    peak_tflops: float | None  # MFU's peak; None: looked up by device name


@dataclass(frozen=True)
class FewshotEvalSettings:
    """Few-shot evaluation of the live model during training (engine/evaluation/during_training.py)."""

    fewshot_eval: tuple[str, ...]  # BENCH:SHOTS, e.g. okvqa:0,4
    fewshot_eval_interval: int  # 0: never
    fewshot_eval_limit: int | None
    fewshot_eval_data_root: str | None
    fewshot_eval_demos: str
    fewshot_eval_template: str

    @property
    def enabled(self) -> bool:
        return bool(self.fewshot_eval) and self.fewshot_eval_interval > 0


GROUPS = {"model": ModelSettings, "parallel": ParallelSettings, "data": DataSettings,
          "training": TrainingSettings, "optimizer": OptimizerSettings, "precision": PrecisionSettings,
          "checkpoint": CheckpointSettings, "logging": LoggingSettings, "fewshot": FewshotEvalSettings}


@dataclass(frozen=True)
class TrainingConfig:
    config_file: str | None  # --config
    model: ModelSettings
    parallel: ParallelSettings
    data: DataSettings
    training: TrainingSettings
    optimizer: OptimizerSettings
    precision: PrecisionSettings
    checkpoint: CheckpointSettings
    logging: LoggingSettings
    fewshot: FewshotEvalSettings
    model_config: ModelConfig  # the preset with the flags' overrides

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.parallel.data_parallel_size)

    def num_samples(self) -> tuple[int, int, int]:
        """Samples the run draws from the train, valid and test splits."""
        t = self.training
        valid = t.eval_iters * t.global_batch_size if t.eval_interval else 0
        return t.train_iters * t.global_batch_size, valid, 0

    def to_dict(self) -> dict:
        """Every flag by its dest name, with the resolved values, plus the derived ones
        (world and data-parallel sizes, micro-batches, the model config, the normalised blend
        and split); JSON-able."""
        out: dict = {"config": self.config_file}
        for name in GROUPS:
            group = getattr(self, name)
            out.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group)})
        out["model"] = out.pop("preset")
        blend, split = out.pop("blend"), out.pop("split")
        out.update(
            data_path=list(self.data.data_path),
            split=split.spec,
            data_parallel_size=self.parallel.data_parallel_size,
            num_microbatches=self.num_microbatches,
            model_config=dataclasses.asdict(self.model_config),
            data_blend=list(blend),
            data_loss_policies=list(blend.loss_policies),
            split_fractions=list(split.fractions),
        )
        return out
