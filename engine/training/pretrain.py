"""Pretraining entry point: flags → platform and process groups → model stage, DDP, optimizer,
schedule → checkpoint or pretrained weights → data from the resumed position → the loop.

    torchrun --nproc-per-node 8 -m engine.pretrain --config examples/configs/llava7b_textbook.yaml
    llava-pretrain --model tiny --data-path out/sample --train-iters 50 --seq-length 1536

Exit status: 0 after training or after a requested stop (SIGTERM/SIGINT, --exit-interval,
--exit-duration-in-mins), with a checkpoint saved when --save is given; 2 for a configuration,
data or checkpoint that cannot be used (the message says which and why); 3 when
--max-skipped-steps consecutive steps had a NaN/Inf loss or gradients (the last good state is
saved first). No batch within --loader-timeout is data that cannot be used: 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from functools import partial

import torch

from engine.training.arguments import ConfigError, parse_args


def _print_rank0(*a, **kw) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(*a, **kw, flush=True)


def _fail(message: str) -> int:
    print(f"llava-pretrain: error: {message}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        args = parse_args(argv)
    except ConfigError as e:
        return _fail(str(e))

    from engine.data.format import FormatError
    from engine.data.loader import LoaderTimeoutError
    from engine.platform import destroy_distributed, init_distributed, setup_platform
    from engine.training.checkpoint import CheckpointError
    from engine.training.loop import DivergedError

    info = setup_platform()
    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                     seed=args.seed, timeout_minutes=args.distributed_timeout_minutes)
    try:
        device = torch.device("cuda", torch.cuda.current_device()) if info.device == "cuda" else torch.device("cpu")
        return run(args, device, started)
    except (ConfigError, CheckpointError, FormatError, LoaderTimeoutError) as e:
        return _fail(str(e))
    except DivergedError as e:
        _fail(str(e))
        return 3
    finally:
        destroy_distributed()


# --------------------------------------------------------------------------- building blocks


def kernel_plan(args: argparse.Namespace):
    """The run's kernel plan (engine/model/specs.py), from the platform and the flags."""
    from engine.model.specs import plan_kernels

    try:
        return plan_kernels(attention_backend=args.attention_backend, half_precision=args.bf16,
                            gradient_accumulation_fusion=args.gradient_accumulation_fusion,
                            cross_entropy_loss_fusion=args.cross_entropy_loss_fusion)
    except ValueError as e:
        raise ConfigError(f"--attention-backend {args.attention_backend}: {e}") from None


def build_model_and_optimizer(args: argparse.Namespace):
    from engine.model.llava import build_model
    from engine.training.loop import configure_model_config
    from engine.training.optim import build_optimizer, build_scheduler, wrap_ddp

    kernels = kernel_plan(args)
    _print_rank0(kernels.describe())
    model = build_model(
        args.model_config,
        kernels=kernels,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        bf16=args.bf16,
        sequence_parallel=args.sequence_parallel,
        recompute_granularity=args.recompute_granularity,
        freeze_vision=args.freeze_vision,
        freeze_projector=args.freeze_projector,
        freeze_llm=args.freeze_llm,
        # loop.py: the loss is averaged over the supervised tokens of the whole global batch.
        calculate_per_token_loss=True,
    )
    model = wrap_ddp(model, args)
    optimizer = build_optimizer([model], args)
    scheduler = build_scheduler(optimizer, args)
    configure_model_config(model, optimizer, args)
    return model, optimizer, scheduler


def check_data(args: argparse.Namespace) -> None:
    """The data must be what this model was configured for; every rank checks (cheap: headers)."""
    from engine.data.dataset import split_ranges
    from engine.data.format import IndexedDataset

    cfg = args.model_config
    for _, prefix in args.data_blend:
        ds = IndexedDataset(prefix)
        # Checked here, on every rank: inside build_datasets only rank 0 would notice (the others
        # would wait for it at a barrier until the distributed timeout).
        (t0, t1), (v0, v1), _ = split_ranges(ds.num_documents, args.split)
        if t0 == t1 or (args.eval_interval and args.eval_iters and args.split_fractions[1] > 0 and v0 == v1):
            raise ConfigError(f"--data-path {prefix} has {ds.num_documents} documents: --split {args.split} "
                              f"leaves {t1 - t0} for training and {v1 - v0} for validation")
        if ds.image_token_id != cfg.image_token_id:
            raise ConfigError(f"--data-path {prefix}: <image> id {ds.image_token_id} in the data, "
                              f"{cfg.image_token_id} in model preset {cfg.name}")
        if ds.image_size != cfg.vision.image_size:
            raise ConfigError(f"--data-path {prefix}: images are {ds.image_size}px, the vision tower "
                              f"expects {cfg.vision.image_size}px")
        most = int(ds.doc_image_counts.max()) if ds.num_documents else 0
        if most > args.max_num_images:
            raise ConfigError(f"--data-path {prefix}: documents hold up to {most} images but "
                              f"--max-num-images is {args.max_num_images}; preprocess with "
                              f"tools/preprocess_interleaved.py --max-num-images {args.max_num_images}")


def build_data(args: argparse.Namespace, consumed_samples: int):
    """(train iterator from `consumed_samples`, factory of fresh validation iterators or None)."""
    from megatron.core import parallel_state

    from engine.data.dataset import build_datasets
    from engine.data.loader import build_loader
    from engine.data.packing import PackingConfig

    packing = PackingConfig(
        seq_length=args.seq_length,
        tokens_per_image=args.model_config.vision.tokens_per_image,
        max_images_per_sample=args.max_images_per_sample,
        policy=args.packing_policy,
        seed=args.seed,
    )
    train_samples = args.train_iters * args.global_batch_size
    valid_samples = args.eval_iters * args.global_batch_size if args.eval_interval else 0
    data_path = [x for w, p in args.data_blend for x in (str(w), p)] if len(args.data_blend) > 1 \
        else [args.data_blend[0][1]]
    try:
        train_ds, valid_ds, _ = build_datasets(
            data_path, packing, split=args.split, num_samples=(train_samples, valid_samples, 0),
            pad_id=PAD_ID, cache_dir=args.data_cache_path)
    except ValueError as e:  # e.g. a --split share that gets no documents of a small dataset
        raise ConfigError(f"--data-path / --split: {e}") from None
    _print_rank0(f"train data: {train_ds!r}\nvalid data: {valid_ds!r}")
    loader = partial(build_loader, micro_batch_size=args.micro_batch_size,
                     data_parallel_rank=parallel_state.get_data_parallel_rank(),
                     data_parallel_size=parallel_state.get_data_parallel_world_size(),
                     num_workers=args.num_workers, timeout=args.loader_timeout)
    train_iter = iter(loader(train_ds, consumed_samples=consumed_samples))
    make_valid = None
    if valid_ds is not None and args.eval_iters:
        make_valid = lambda: iter(loader(valid_ds, consumed_samples=0, num_workers=0))  # noqa: E731
    return train_iter, make_valid


# LLaMA tokenizers define no pad piece; LLaVA pads with <unk> = 0 (engine/data/tokenizer.py).
PAD_ID = 0


def batch_counter(args: argparse.Namespace):
    """count(batch) -> (tokens, images, useful FLOPs) for throughput accounting (metrics.py)."""
    from engine.training.metrics import TrainableParts, batch_documents, step_flops

    trainable = TrainableParts(vision=not args.freeze_vision, projector=not args.freeze_projector,
                               llm=not args.freeze_llm)

    def count(batch):
        lengths, images = batch_documents(batch, PAD_ID)
        return sum(lengths), images, step_flops(args.model_config, lengths, images, trainable)

    return count


def _args_for_checkpoint(args: argparse.Namespace) -> dict:
    out = {}
    for k, v in vars(args).items():
        if dataclasses.is_dataclass(v):
            v = dataclasses.asdict(v)
        out[k] = v
    return out


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, device: torch.device, started: float) -> int:
    from engine.training import checkpoint as ckpt
    from engine.training.loop import TrainState, is_logging_rank, train
    from engine.training.metrics import MetricsLogger

    check_data(args)
    model, optimizer, scheduler = build_model_and_optimizer(args)
    n_params = sum(p.numel() for p in model.module.parameters())
    n_train = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
    _print_rank0(f"model {args.model_config.name}: {n_params / 1e6:.2f} M parameters on this stage "
                 f"({n_train / 1e6:.2f} M trained); TP={args.tensor_model_parallel_size} "
                 f"PP={args.pipeline_model_parallel_size} DP={args.data_parallel_size}, "
                 f"{args.num_microbatches} micro-batch(es) of {args.micro_batch_size} per step, "
                 f"{'bf16' if args.bf16 else 'fp32'} on {device}")

    state = TrainState()
    if args.load and ckpt.resolve_checkpoint_dir(args.load) is not None:
        state.iteration, state.consumed_samples = ckpt.load_checkpoint(
            args.load, model, optimizer, scheduler, args.model_config,
            load_optimizer=not args.no_load_optim, load_rng=not args.no_load_rng, log=_print_rank0)
    elif args.pretrained_checkpoint:
        ckpt.load_pretrained(args.pretrained_checkpoint, model, optimizer, args.model_config, log=_print_rank0)
    elif args.load:
        _print_rank0(f"no checkpoint under --load {args.load}: starting from scratch")

    train_iter, make_valid = build_data(args, state.consumed_samples)

    saver = save_fn = None
    if args.save:
        saver = ckpt.Saver(args.save, keep_last=args.keep_last, async_save=args.async_save, log=_print_rank0,
                           optim_layout="reshardable" if args.dist_ckpt_optim_fully_reshardable else "dp",
                           threads=args.ckpt_save_threads)
        run_args = _args_for_checkpoint(args)
        save_fn = lambda s: saver.save(s.iteration, model, optimizer, scheduler, s.consumed_samples,  # noqa: E731
                                       args.model_config, run_args)
    logger = None
    if is_logging_rank():
        logger = MetricsLogger(args.log_jsonl, args.tensorboard_dir, args.wandb_project, args.wandb_exp_name,
                               run_config=_args_for_checkpoint(args))
    _print_rank0(f"setup took {time.perf_counter() - started:.1f} s; training from iteration {state.iteration} "
                 f"to {args.train_iters}")
    try:
        state = train(args=args, model=model, optimizer=optimizer, scheduler=scheduler,
                      train_iterator=train_iter, make_valid_iterator=make_valid, count_batch=batch_counter(args),
                      state=state, save_fn=save_fn, poll_fn=saver.finalize if saver else None, logger=logger,
                      device=device, log=_print_rank0)
    finally:
        if saver is not None:
            saver.close()
        if logger is not None:
            logger.close()
    _print_rank0(f"done: iteration {state.iteration}, consumed samples {state.consumed_samples}"
                 + (f", checkpoints in {args.save}" if args.save else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
