"""Pretraining entry point: flags → platform and process groups → model stage, DDP, optimizer,
schedule → checkpoint or pretrained weights → data from the resumed position → the loop.

    torchrun --nproc-per-node 8 -m engine.pretrain --config examples/configs/llava7b_textbook.yaml
    llava-pretrain --model tiny --data-path out/sample --train-iters 50 --seq-length 1536

Exit status: 0 after training or after a requested stop (SIGTERM/SIGINT, --exit-interval,
--exit-duration-in-mins), with a checkpoint saved when --save is given; 2 for a configuration,
data or checkpoint that cannot be used (the message says which and why); 3 when
--max-skipped-steps consecutive steps had a NaN/Inf loss or gradients (the last good state is
saved first). No batch within --loader-timeout is data that cannot be used: 2. 4 on every rank
when one rank was lost (no heartbeat for --heartbeat-timeout: engine/training/watchdog.py).
"""

from __future__ import annotations

import sys
import time
from functools import partial

import torch

from engine.training.arguments import ConfigError, parse_args
from engine.training.config import TrainingConfig


def _print_rank0(*a, **kw) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*a, **kw, flush=True)


def _fail(message: str) -> int:
    print(f"llava-pretrain: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        return _fail(str(e))

    from engine.data.format import FormatError
    from engine.data.loader import LoaderTimeoutError
    from engine.platform import destroy_distributed, init_distributed, setup_platform
    from engine.training.checkpoint import CheckpointError
    from engine.training.loop import DivergedError

    from engine.training.watchdog import start_watchdog

    info = setup_platform()
    init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                     seed=cfg.training.seed, timeout_minutes=cfg.parallel.distributed_timeout_minutes)
    watchdog = start_watchdog(cfg.parallel.heartbeat_timeout, log=_print_rank0)
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if info.device == "cuda" else torch.device("cpu")
        return run(cfg, device, started)
    except (ConfigError, CheckpointError, FormatError, LoaderTimeoutError) as e:
        return _fail(str(e))
    except DivergedError as e:
        _fail(str(e))
        return 3
    except Exception:
        if watchdog is not None:  # a collective that failed because a rank was lost: name it
            watchdog.explain()
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        destroy_distributed()


# --------------------------------------------------------------------------- building blocks


def kernel_plan(cfg: TrainingConfig):
    """The run's kernel plan (engine/model/specs.py), from the platform and the flags."""
    from engine.model.specs import plan_kernels

    try:
        return plan_kernels(attention_backend=cfg.model.attention_backend, half_precision=cfg.precision.bf16,
                            gradient_accumulation_fusion=cfg.training.gradient_accumulation_fusion,
                            cross_entropy_loss_fusion=cfg.training.cross_entropy_loss_fusion,
                            fp8=cfg.precision.fp8_plan)
    except ValueError as e:  # a kernel this machine cannot run; the message names the flag
        raise ConfigError(str(e)) from None


def build_model_and_optimizer(cfg: TrainingConfig):
    from engine.model.llava import build_model
    from engine.training.loop import PER_TOKEN_LOSS, configure_model_config
    from engine.training.optim import build_optimizer, build_scheduler, wrap_ddp

    kernels = kernel_plan(cfg)
    _print_rank0(kernels.describe())
    model = build_model(
        cfg.model_config,
        kernels=kernels,
        params_dtype=cfg.precision.params_dtype,
        bf16=cfg.precision.bf16,
        sequence_parallel=cfg.parallel.sequence_parallel,
        recompute=cfg.model.recompute,
        freeze_vision=cfg.model.freeze_vision,
        freeze_projector=cfg.model.freeze_projector,
        freeze_llm=cfg.model.freeze_llm,
        calculate_per_token_loss=PER_TOKEN_LOSS,  # loop.loss_func's contract
    )
    model = wrap_ddp(model, cfg)
    optimizer = build_optimizer([model], cfg)
    scheduler = build_scheduler(optimizer, cfg)
    configure_model_config(model, optimizer, cfg)
    return model, optimizer, scheduler


def check_data(cfg: TrainingConfig) -> None:
    """The data must be what this model was configured for; every rank checks (cheap: headers)."""
    from engine.data.dataset import split_ranges
    from engine.data.format import IndexedDataset

    model, split, max_images = cfg.model_config, cfg.data.split, cfg.data.max_num_images
    for prefix in cfg.data.blend.prefixes:
        ds = IndexedDataset(prefix)
        # Checked here, on every rank: inside build_datasets only rank 0 would notice (the others
        # would wait for it at a barrier until the distributed timeout).
        (t0, t1), (v0, v1), _ = split_ranges(ds.num_documents, split)
        if t0 == t1 or (cfg.training.evaluates and split.fractions[1] > 0 and v0 == v1):
            raise ConfigError(f"--data-path {prefix} has {ds.num_documents} documents: --split {split} "
                              f"leaves {t1 - t0} for training and {v1 - v0} for validation")
        if ds.image_token_id != model.image_token_id:
            raise ConfigError(f"--data-path {prefix}: <image> id {ds.image_token_id} in the data, "
                              f"{model.image_token_id} in model preset {model.name}")
        if ds.image_size != model.vision.image_size:
            raise ConfigError(f"--data-path {prefix}: images are {ds.image_size}px, the vision tower "
                              f"expects {model.vision.image_size}px")
        most = int(ds.doc_image_counts.max()) if ds.num_documents else 0
        if most > max_images:
            raise ConfigError(f"--data-path {prefix}: documents hold up to {most} images but "
                              f"--max-num-images is {max_images}; preprocess with "
                              f"tools/preprocess_interleaved.py --max-num-images {max_images}")


def build_train_valid(cfg: TrainingConfig, train_origin=None):
    """(train dataset, valid dataset or None); `train_origin` places the train blend from a later
    sample (a blend changed on resume: engine/data/sources.py)."""
    from engine.data.dataset import build_datasets
    from engine.data.packing import PackingConfig

    data = cfg.data
    packing = PackingConfig(
        seq_length=data.seq_length,
        tokens_per_image=cfg.model_config.vision.tokens_per_image,
        max_images_per_sample=data.max_images_per_sample,
        policy=data.packing_policy,
        seed=cfg.training.seed,
    )
    try:
        train_ds, valid_ds, _ = build_datasets(
            data.blend, packing, split=data.split, num_samples=cfg.num_samples(),
            pad_id=data.pad_id, cache_dir=data.data_cache_path, train_origin=train_origin)
    except ValueError as e:  # e.g. a --split share that gets no documents of a small dataset
        raise ConfigError(f"--data-path / --split: {e}") from None
    _print_rank0(f"train data: {train_ds!r}\nvalid data: {valid_ds!r}")
    return train_ds, valid_ds


def build_data(cfg: TrainingConfig, consumed_samples: int, datasets=None):
    """(train iterator from `consumed_samples`, factory of fresh validation iterators or None),
    over `datasets` (train, valid) or those `build_train_valid` makes."""
    from megatron.core import parallel_state

    from engine.data.loader import build_loader

    data = cfg.data
    train_ds, valid_ds = datasets if datasets is not None else build_train_valid(cfg)
    loader = partial(build_loader, micro_batch_size=cfg.training.micro_batch_size,
                     data_parallel_rank=parallel_state.get_data_parallel_rank(),
                     data_parallel_size=parallel_state.get_data_parallel_world_size(),
                     num_workers=data.num_workers, timeout=data.loader_timeout)
    train_iter = iter(loader(train_ds, consumed_samples=consumed_samples))
    make_valid = None
    if valid_ds is not None and cfg.training.eval_iters:
        make_valid = lambda: iter(loader(valid_ds, consumed_samples=0, num_workers=0))  # noqa: E731
    return train_iter, make_valid


def batch_counter(cfg: TrainingConfig):
    """count(batch) -> (tokens, images, useful FLOPs) for throughput accounting (metrics.py)."""
    from engine.training.metrics import TrainableParts, batch_documents, step_flops

    trainable = TrainableParts(vision=not cfg.model.freeze_vision, projector=not cfg.model.freeze_projector,
                               llm=not cfg.model.freeze_llm)
    pad_id = cfg.data.pad_id

    def count(batch):
        lengths, images = batch_documents(batch, pad_id)
        return sum(lengths), images, step_flops(cfg.model_config, lengths, images, trainable)

    return count


# --------------------------------------------------------------------------- the run


def run(cfg: TrainingConfig, device: torch.device, started: float) -> int:
    from engine.training.loop import TrainState, Trainer, is_logging_rank
    from engine.training.metrics import MetricsLogger

    check_data(cfg)
    model, optimizer, scheduler = build_model_and_optimizer(cfg)
    n_params = sum(p.numel() for p in model.module.parameters())
    n_train = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
    par = cfg.parallel
    _print_rank0(f"model {cfg.model_config.name}: {n_params / 1e6:.2f} M parameters on this stage "
                 f"({n_train / 1e6:.2f} M trained); TP={par.tensor_model_parallel_size} "
                 f"PP={par.pipeline_model_parallel_size} DP={par.data_parallel_size}, "
                 f"{cfg.num_microbatches} micro-batch(es) of {cfg.training.micro_batch_size} per step, "
                 f"{'bf16' if cfg.precision.bf16 else 'fp32'} on {device}")

    state = _initial_state(cfg, model, optimizer, scheduler, TrainState())
    train_ds, valid_ds, sources = _data_with_sources(cfg, state.consumed_samples)
    train_iter, make_valid = build_data(cfg, state.consumed_samples, datasets=(train_ds, valid_ds))
    saver, save_fn = _saver(cfg, model, optimizer, scheduler, sources)
    exporter = _exporter(cfg)
    if exporter is not None:
        save_fn = _then(save_fn, exporter.poll)
    logger = None
    if is_logging_rank():
        log = cfg.logging
        logger = MetricsLogger(log.log_jsonl, log.tensorboard_dir, log.wandb_project, log.wandb_exp_name,
                               run_config=cfg.to_dict())
    _print_rank0(f"setup took {time.perf_counter() - started:.1f} s; training from iteration {state.iteration} "
                 f"to {cfg.training.train_iters}")
    try:
        state = Trainer(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler,
                        train_iterator=train_iter, make_valid_iterator=make_valid, count_batch=batch_counter(cfg),
                        state=state, save_fn=save_fn, logger=logger,
                        poll_fn=_then(saver.finalize, exporter.poll) if exporter else saver.finalize if saver else None,
                        device=device, log=_print_rank0, sources_fn=sources.at,
                        fewshot_fn=_fewshot(cfg, model)).train()
    finally:
        if saver is not None:
            saver.close()
        if exporter is not None:
            exporter.close()
        if logger is not None:
            logger.close()
    _print_rank0(f"done: iteration {state.iteration}, consumed samples {state.consumed_samples}"
                 + (f", checkpoints in {cfg.checkpoint.save}" if cfg.checkpoint.save else ""))
    return 0


def _initial_state(cfg: TrainingConfig, model, optimizer, scheduler, state):
    """`state` where the run starts: from the --load checkpoint, else the --pretrained-checkpoint
    weights, else scratch."""
    from engine.training import checkpoint as ckpt

    c = cfg.checkpoint
    if c.load and ckpt.resolve_checkpoint_dir(c.load) is not None:
        state.iteration, state.consumed_samples = ckpt.load_checkpoint(
            c.load, model, optimizer, scheduler, cfg.model_config,
            load_optimizer=not c.no_load_optim, load_rng=not c.no_load_rng, log=_print_rank0)
    elif c.pretrained_checkpoint:
        ckpt.load_pretrained(c.pretrained_checkpoint, model, optimizer, cfg.model_config, log=_print_rank0)
    elif c.load:
        _print_rank0(f"no checkpoint under --load {c.load}: starting from scratch")
    return state


def _then(first, second):
    """A function that calls `first` with its arguments, then `second()`."""
    def both(*args, **kwargs):
        first(*args, **kwargs)
        second()

    return both


def _exporter(cfg: TrainingConfig):
    """Rank 0's background Hugging Face exporter (--export-hf-interval), else None."""
    c = cfg.checkpoint
    if not c.export_hf_interval or torch.distributed.get_rank() != 0:
        return None
    from pathlib import Path

    from engine.training.hf_export import HfExporter

    tokenizer = c.tokenizer_model or str(Path(c.save) / "tokenizer.model")
    return HfExporter(c.save, c.export_hf_interval, c.export_hf_keep, tokenizer, log=_print_rank0)


def _data_with_sources(cfg: TrainingConfig, consumed_samples: int):
    """(train dataset, valid dataset, SourceCounter): the train blend placed where the checkpoint
    left each source when the blend changed since (one line says so), else as it was saved."""
    from engine.data.sources import SourceCounter, plan_origin
    from engine.training import checkpoint as ckpt

    saved = ckpt.read_data_state(cfg.checkpoint.load) if cfg.checkpoint.load and consumed_samples else None
    origin, line = plan_origin(cfg.data.blend, saved, consumed_samples)
    if line:
        _print_rank0(line)
    train_ds, valid_ds = build_train_valid(cfg, origin)
    return train_ds, valid_ds, SourceCounter(train_ds, cfg.data.blend)


def _fewshot(cfg: TrainingConfig, model):
    """fewshot_fn(iteration) for the Trainer (--fewshot-eval), else None: the live model wrapped in
    a generator, questions sharded over the data-parallel ranks. A Transformer Engine spec model
    is generated with through its torch-native copy (engine/inference/live.py), whose weights
    exist only while an evaluation runs."""
    if not cfg.fewshot.enabled:
        return None
    from engine.data.tokenizer import build_tokenizer
    from engine.evaluation.during_training import FewshotSettings, fewshot_eval
    from engine.evaluation.sharding import World
    from engine.inference import EngineGenerator
    from engine.inference.live import TorchNativeCopy

    settings = FewshotSettings.from_config(cfg.fewshot)
    tokenizer = build_tokenizer("sentencepiece", cfg.checkpoint.tokenizer_model)
    world = World.current(tensor_parallel=cfg.parallel.tensor_model_parallel_size)
    live = model.module  # the DDP-wrapped LLaVAModel
    # With --overlap-param-gather the updated weights of other data-parallel ranks' shards arrive in
    # the next forward's pre-hooks; a copy reads them before that, so it first gathers them at once
    # (as megatron-core's disable_forward_pre_hook does before evaluating or saving).
    gather = (lambda: model.start_param_sync(force_sync=True)) if cfg.parallel.overlap_param_gather_active else None
    copy = TorchNativeCopy(cfg.model_config, before_copy=gather)

    def run(iteration: int) -> dict:
        try:
            return fewshot_eval(live, cfg.fewshot, iteration, world=world, settings=settings,
                                make_generator=lambda m: EngineGenerator(copy(m), cfg.model_config, tokenizer))
        finally:
            copy.release()

    return run


def _saver(cfg: TrainingConfig, model, optimizer, scheduler, sources=None):
    """(checkpoint Saver, save_fn(state)), both None without --save. `sources` (a SourceCounter)
    puts the per-source data state into each checkpoint."""
    from engine.training.saver import Saver

    c = cfg.checkpoint
    if not c.save:
        return None, None
    saver = Saver(c.save, keep_last=c.keep_last, async_save=c.async_save, log=_print_rank0,
                       optim_layout="reshardable" if c.dist_ckpt_optim_fully_reshardable else "dp",
                       threads=c.ckpt_save_threads, with_optimizer=not c.no_save_optim)
    run_args = cfg.to_dict()
    return saver, lambda s: saver.save(s.iteration, model, optimizer, scheduler, s.consumed_samples,
                                       cfg.model_config, run_args,
                                       data_state=sources.data_state(s.consumed_samples) if sources else None)


if __name__ == "__main__":
    raise SystemExit(main())
