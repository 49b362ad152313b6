"""Training flags: Megatron's names, grouped by concern, plus an optional YAML config file.

    llava-pretrain --config examples/configs/tiny.yaml --train-iters 50

A config file holds the same keys as the flags (``tensor-model-parallel-size`` or
``tensor_model_parallel_size``); flags given on the command line override it. `parse_args`
checks the flags and returns the frozen `TrainingConfig` (engine/training/config.py) with the
values they leave open resolved (global batch, training iterations, warmup and decay spans, bf16,
model preset, data blend and split, each parsed once), so every rank fails at start, with the
same clear message, on a bad configuration.

The flags themselves, with their defaults (the seed recipe's), are in engine/training/flags.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from pathlib import Path

import yaml

from engine.config import ModelConfig, get_preset
from engine.data.dataset import DataBlend, DataSplit
from engine.errors import ConfigError
from engine.training.config import (CheckpointSettings, DataSettings, FewshotEvalSettings, LoggingSettings,
                                    ModelSettings, OptimizerSettings, ParallelSettings, PrecisionSettings,
                                    TrainingConfig, TrainingSettings)
from engine.training.flags import build_parser


# --------------------------------------------------------------------------- YAML config file


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read a YAML config into {dest: value}, converted with each flag's own type."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    # Look keys up by flag name, so that 'train-vision: true' and 'freeze-vision: false' both
    # land on dest freeze_vision with the right sign.
    actions = {s: a for a in parser._actions for s in a.option_strings}
    out = {}
    for key, value in data.items():
        where = f"{path}:{lines.get(key, '?')}"
        flag = "--" + str(key).lstrip("-").replace("_", "-")
        action = actions.get(flag)
        if action is None or action.dest in ("config", "help"):
            raise ConfigError(f"{where}: unknown key {key!r} (keys are the flag names, e.g. 'lr', 'seq-length')")
        out[action.dest] = _convert(action, flag, value, where)
    return out


def _convert(action: argparse.Action, flag: str, value, where: str) -> object:
    key = flag[2:]
    if value is None:
        return None
    if action.nargs == 0:  # store_true / store_false / BooleanOptional
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key!r} must be true or false, got {value!r}")
        # 'train-vision: true' or 'no-bf16: true' set their dest to False.
        negative = action.const is False or (action.const is None and flag.startswith("--no-"))
        return (not value) if negative else value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(action, v, where, key) for v in items]
    return _convert_one(action, value, where, key)


def _convert_one(action: argparse.Action, value, where: str, key: str):
    try:
        value = action.type(value) if action.type is not None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key!r} has bad value {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {key!r} must be one of {sorted(action.choices)}, got {value!r}")
    return value


# --------------------------------------------------------------------------- flags -> config


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> TrainingConfig:
    """Flags (over an optional YAML config) → checked, frozen config. `world_size` defaults to
    torchrun's WORLD_SIZE."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_config_defaults(parser, pre.config))
    args = parser.parse_args(argv)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return build_config(args, world_size)


def build_config(args: argparse.Namespace, world_size: int, check_paths: bool = True) -> TrainingConfig:
    """Check the parsed flags and resolve what they leave open; raises ConfigError."""
    parallel = _parallel(args, world_size)
    training = _training(args, parallel.data_parallel_size)
    parallel = _sequence_parallel(parallel, args.seq_length)
    precision = _precision(args)
    model = _pick(ModelSettings, args, preset=args.model,
                  recompute_modules=tuple(args.recompute_modules) if args.recompute_modules else None)
    model_config = model_config_from_args(model)
    _check_model_layout(model_config, model, parallel, args.seq_length)
    optimizer = _optimizer(args, training.train_iters)
    _check_intervals(args)
    if args.max_num_images < 1 or (args.max_images_per_sample is not None and args.max_images_per_sample < 1):
        raise ConfigError("--max-num-images and --max-images-per-sample must be >= 1")
    if args.loader_timeout < 0:
        raise ConfigError(f"--loader-timeout must be >= 0 seconds (0 waits forever), got {args.loader_timeout:g}")
    if args.heartbeat_timeout != 0 and args.heartbeat_timeout < 2:
        raise ConfigError(f"--heartbeat-timeout must be 0 (off) or >= 2 seconds, got {args.heartbeat_timeout:g}")
    data = _pick(DataSettings, args, data_path=tuple(args.data_path or ()),
                 blend=_parse_blend(args, check_paths), split=_parse_split(args.split))
    checkpoint = _pick(CheckpointSettings, args)
    if check_paths:
        _check_checkpoint_paths(checkpoint)
    return TrainingConfig(config_file=args.config, model=model, parallel=parallel, data=data, training=training,
                          optimizer=optimizer, precision=precision, checkpoint=checkpoint,
                          logging=_pick(LoggingSettings, args), fewshot=_fewshot(args, parallel, checkpoint),
                          model_config=model_config)


def _fewshot(args: argparse.Namespace, parallel: ParallelSettings, checkpoint: CheckpointSettings) -> FewshotEvalSettings:
    from engine.evaluation.during_training import FewshotSettings

    root = args.fewshot_eval_data_root
    fewshot = _pick(FewshotEvalSettings, args, fewshot_eval=tuple(args.fewshot_eval),
                    fewshot_eval_data_root=str(root) if root is not None else None)
    try:
        FewshotSettings.from_config(fewshot)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if fewshot.enabled and (parallel.pipeline_model_parallel_size > 1 or parallel.sequence_parallel):
        raise ConfigError("--fewshot-eval generates with the live model, which needs the whole model on each "
                          "rank and no sequence parallelism: use --pipeline-model-parallel-size 1 without --sequence-parallel (or "
                          "evaluate saved checkpoints with llava-evaluate)")
    if fewshot.enabled and not checkpoint.tokenizer_model:
        raise ConfigError("--fewshot-eval needs --tokenizer-model (the tokenizer the data was made with)")
    return fewshot


def _pick(cls, args: argparse.Namespace, **resolved):
    """`cls` from the flags of the same names, with `resolved` values in place of some."""
    return cls(**{f.name: resolved[f.name] if f.name in resolved else getattr(args, f.name)
                  for f in dataclasses.fields(cls)})


def _parallel(args: argparse.Namespace, world_size: int) -> ParallelSettings:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor-parallel {tp} x pipeline-parallel {pp}")
    return _pick(ParallelSettings, args, world_size=world_size)


def _sequence_parallel(parallel: ParallelSettings, seq_length: int) -> ParallelSettings:
    tp = parallel.tensor_model_parallel_size
    if parallel.sequence_parallel and tp == 1:
        return dataclasses.replace(parallel, sequence_parallel=False)  # nothing to shard over, as Megatron does
    if parallel.sequence_parallel and seq_length % tp:
        raise ConfigError(f"--sequence-parallel needs --seq-length {seq_length} divisible by TP {tp}")
    return parallel


def _training(args: argparse.Namespace, dp: int) -> TrainingSettings:
    if args.micro_batch_size < 1:
        raise ConfigError("--micro-batch-size must be >= 1")
    per_step = args.micro_batch_size * dp
    global_batch_size = per_step if args.global_batch_size is None else args.global_batch_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"--global-batch-size {global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp} (= {per_step}); choose a multiple of {per_step}")
    if (args.train_iters is None) == (args.train_samples is None):
        raise ConfigError("give exactly one of --train-iters and --train-samples")
    train_iters = args.train_iters
    if args.train_samples is not None:
        train_iters = math.ceil(args.train_samples / global_batch_size)
    if train_iters < 1:
        raise ConfigError("--train-iters must be >= 1")
    return _pick(TrainingSettings, args, global_batch_size=global_batch_size, train_iters=train_iters)


def _precision(args: argparse.Namespace) -> PrecisionSettings:
    bf16 = args.bf16
    if bf16 is None:
        import torch

        bf16 = torch.cuda.is_available()
    if args.cross_entropy_loss_fusion and not bf16:
        raise ConfigError("--cross-entropy-loss-fusion needs --bf16 (megatron-core's fused kernel "
                          "returns bf16 logit gradients)")
    if args.optimizer_cpu_offload and not bf16:
        raise ConfigError("--optimizer-cpu-offload needs --bf16: megatron-core offloads the fp32 main weights "
                          "a bf16 model keeps beside its own (an fp32 model's optimizer updates the weights in place)")
    precision = _pick(PrecisionSettings, args, bf16=bf16)
    try:
        _ = precision.fp8_plan  # checks the FP8 settings
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return precision


def model_config_from_args(model: ModelSettings) -> ModelConfig:
    """The --model preset with the override flags (--num-layers, --hidden-size, ...) applied."""
    overrides = {
        k: getattr(model, k)
        for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
        if getattr(model, k) is not None
    }
    try:
        return get_preset(model.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--model {model.preset} with overrides {overrides}: {e}") from None


def _check_model_layout(cfg: ModelConfig, model: ModelSettings, parallel: ParallelSettings,
                        seq_length: int) -> None:
    from engine.model.llava import validate_layout

    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    try:
        validate_layout(cfg, tp, pp, parallel.sequence_parallel)
    except ValueError as e:
        raise ConfigError(f"--model {cfg.name} with --tensor-model-parallel-size "
                          f"{tp} --pipeline-model-parallel-size {pp}: {e}") from None
    lang, vis = cfg.language, cfg.vision
    if seq_length > lang.max_position_embeddings:
        raise ConfigError(
            f"--seq-length {seq_length} exceeds the model's max_position_embeddings "
            f"{lang.max_position_embeddings} (preset {cfg.name})")
    if seq_length < vis.tokens_per_image + 2:
        raise ConfigError(
            f"--seq-length {seq_length} cannot hold one image ({vis.tokens_per_image} positions) plus text")
    if model.freeze_vision and model.freeze_projector and model.freeze_llm:
        raise ConfigError("everything is frozen (--freeze-vision, --freeze-projector, --freeze-llm): nothing to train")
    if model.freeze_llm and pp > 1:
        raise ConfigError("--freeze-llm trains only what lives on the first pipeline stage (projector, vision): "
                          "the other stages would have nothing to train; use --pipeline-model-parallel-size 1")
    recompute = model.recompute  # raises ConfigError for a bad combination of the --recompute-* flags
    if recompute is not None:
        recompute.check_layers(lang.num_layers // pp)


def _optimizer(args: argparse.Namespace, train_iters: int) -> OptimizerSettings:
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise ConfigError(f"need 0 <= --min-lr ({args.min_lr}) <= --lr ({args.lr}) and --lr > 0")
    if not 0.0 <= args.lr_warmup_fraction < 1.0:
        raise ConfigError(f"--lr-warmup-fraction {args.lr_warmup_fraction} must be in [0, 1)")
    decay = args.lr_decay_iters or train_iters
    warmup = int(args.lr_warmup_fraction * decay) if args.lr_warmup_iters is None else args.lr_warmup_iters
    if warmup >= decay:
        raise ConfigError(
            f"warmup ({warmup} iterations) must be shorter than the decay span ({decay} iterations)")
    if args.clip_grad < 0 or args.weight_decay < 0:
        raise ConfigError("--clip-grad and --weight-decay must be >= 0")
    if not 0.0 < args.optimizer_offload_fraction <= 1.0:
        raise ConfigError(f"--optimizer-offload-fraction {args.optimizer_offload_fraction} must be in (0, 1]")
    if args.optimizer_cpu_offload and not args.use_distributed_optimizer:
        raise ConfigError("--optimizer-cpu-offload needs --use-distributed-optimizer (megatron-core offloads "
                          "the distributed optimizer's shards)")
    if args.overlap_cpu_optimizer_d2h_h2d and not args.optimizer_cpu_offload:
        raise ConfigError("--overlap-cpu-optimizer-d2h-h2d needs --optimizer-cpu-offload")
    return _pick(OptimizerSettings, args, lr_decay_iters=decay, lr_warmup_iters=warmup)


def _check_intervals(args: argparse.Namespace) -> None:
    for flag in ("log_interval", "save_interval", "exit_interval", "keep_last", "max_skipped_steps",
                 "export_hf_interval", "export_hf_keep"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_interval < 0 or args.eval_iters < 0:
        raise ConfigError("--eval-interval and --eval-iters must be >= 0 (0 turns evaluation off)")


def _parse_blend(args: argparse.Namespace, check_paths: bool) -> DataBlend:
    """Megatron's `p` or `w1 p1 w2 p2 ...` (each prefix optionally `:all`), or a
    --data-blend-file → the blend, weights normalised, a loss policy per dataset."""
    items, blend_file = args.data_path, args.data_blend_file
    if items and blend_file:
        raise ConfigError("give --data-path or --data-blend-file, not both")
    if not items and not blend_file:
        raise ConfigError("--data-path is required: one dataset prefix (or weight/prefix pairs) made by "
                          "tools/preprocess_interleaved.py (or --data-blend-file FILE.yaml)")
    try:
        blend = (DataBlend.from_file(blend_file, args.loss_policy) if blend_file
                 else DataBlend.parse(items, args.loss_policy))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for prefix in blend.prefixes:
        if check_paths and not Path(prefix + ".idx").is_file():
            raise ConfigError(
                f"--data-path {prefix}: {prefix}.idx not found (give the prefix written by "
                f"tools/preprocess_interleaved.py --output-prefix)")
    return blend


def _parse_split(split: str) -> DataSplit:
    try:
        parsed = DataSplit.parse(split)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if parsed.fractions[0] <= 0:
        raise ConfigError(f"--split {split!r}: the train share must be positive")
    return parsed


def _check_checkpoint_paths(checkpoint: CheckpointSettings) -> None:
    load, save = checkpoint.load, checkpoint.save
    # --load may name a directory that does not exist yet only when the run saves there (the
    # usual `--save D --load D` of a job that resumes itself); otherwise it is a typo.
    if load and not Path(load).is_dir() and (not save or Path(load).resolve() != Path(save).resolve()):
        raise ConfigError(f"--load {load}: no such directory")
    if checkpoint.export_hf_interval:
        if not save:
            raise ConfigError("--export-hf-interval exports saved checkpoints: give --save too")
        tokenizer = checkpoint.tokenizer_model or str(Path(save) / "tokenizer.model")
        if not Path(tokenizer).exists():
            raise ConfigError(f"--export-hf-interval needs the tokenizer the data was made with: --tokenizer-model "
                              f"PATH ({tokenizer} not found)")
    if checkpoint.pretrained_checkpoint and not Path(checkpoint.pretrained_checkpoint).is_dir():
        raise ConfigError(f"--pretrained-checkpoint {checkpoint.pretrained_checkpoint}: no such directory")
