"""The training loop: one optimizer step = mcore's forward/backward schedule over the micro-batches
of a global batch, then the distributed optimizer's step and the LR schedule's.

Loss averaging: the loss of a step is the mean per-token cross-entropy over *every supervised
token of the global batch* (all micro-batches, all data-parallel ranks). `loss_func` returns
(sum of masked token losses, number of supervised tokens); with `calculate_per_token_loss` mcore's
schedule leaves the sum unnormalised and `finalize_model_grads` divides the gradients by the
global token count after the data-parallel reduction. Chosen over the per-micro-batch mean
because packed samples carry very different numbers of supervised tokens (images and text before
a document's first image carry none): every token then weighs the same, and the update does not
depend on how the global batch is cut into micro-batches or spread over ranks (DP=2 ≡ DP=1 with
twice the micro-batches).
"""

from __future__ import annotations

import argparse
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from engine.data.loader import to_device
from engine.errors import DivergedError
from engine.model.llava import pipeline_shape
from engine.training.metrics import MetricsLogger, Throughput, TimedIterator, mfu_peak, peak_memory_gib
from engine.training.optim import current_lr


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    start_time: float = field(default_factory=time.time)


# --------------------------------------------------------------------------- one micro-batch


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(masked loss sum, supervised tokens, values to report) as mcore's schedule expects."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def make_forward_step(device: torch.device) -> Callable:
    def forward_step(data_iterator: Iterator, model):
        # Every pipeline stage reads the micro-batch: the first embeds tokens and images, every
        # stage needs cu_seqlens/position_ids for packed attention, the last the labels and mask.
        batch = to_device(next(data_iterator), device)  # uint8 images are normalised there
        output = model(batch)
        return output, partial(loss_func, batch["loss_mask"])

    return forward_step


def _sum_reports(losses_reduced: list, device: torch.device) -> torch.Tensor:
    """[loss sum, tokens] over this rank's micro-batches (zeros off the last pipeline stage)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for report in losses_reduced:
        total += report["lm loss"].to(torch.float64)
    return total


def _global_mean(total: torch.Tensor) -> float:
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()


# --------------------------------------------------------------------------- steps


def configure_model_config(model, optimizer, args: argparse.Namespace) -> None:
    """Hook the DDP wrapper and optimizer into the TransformerConfig the schedules read."""
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if args.overlap_grad_reduce:
        # The schedule runs all but the last micro-batch under no_sync, so bucket reductions are
        # launched (overlapped with compute) only during the last backward.
        config.no_sync_func = model.no_sync
    if args.overlap_param_gather and args.use_distributed_optimizer:
        config.param_sync_func = model.start_param_sync


def _shape(args) -> dict:
    """The activation shape pipeline stages exchange: the model runs a micro-batch as one packed
    [B*S, 1, hidden] sequence (engine/model/llava.py)."""
    seq, mbs = pipeline_shape(args.micro_batch_size, args.seq_length)
    return {"seq_length": seq, "micro_batch_size": mbs}


def _all_finite(total: torch.Tensor, model, device: torch.device) -> bool:
    """Are this step's loss (on every last-stage rank) and every gradient (on every rank) finite?
    One sum per gradient buffer (a NaN or Inf anywhere makes it non-finite) and one all-reduce,
    so that all ranks skip together."""
    bad = ~torch.isfinite(total[0].float())
    buffers = getattr(model, "buffers", None)  # mcore DDP: the contiguous gradient buffers
    if isinstance(buffers, list):
        grads = [b.grad_data for b in buffers + getattr(model, "expert_parallel_buffers", [])]
    else:
        grads = [getattr(p, "main_grad", p.grad) for p in model.parameters() if p.requires_grad]
    for g in grads:
        if g is not None:
            bad |= ~torch.isfinite(g.sum().float()).to(bad.device)
    flag = bad.to(device=device, dtype=torch.float32).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return not bool(flag.item())


def train_step(forward_step, data_iterator, model, optimizer, scheduler, args, device):
    """One optimizer step. Returns ([masked loss sum, supervised tokens] over this rank's
    micro-batches (zeros off the last pipeline stage), grad norm, whether the update was skipped,
    whether the loss and gradients were finite). A non-finite step changes nothing: no update of
    the weights, the optimizer state or the learning-rate schedule."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=[model],
        num_microbatches=args.num_microbatches,
        **_shape(args),
        forward_only=False,
    )
    total = _sum_reports(losses, device)
    if not _all_finite(total, model, device):
        return total, None, True, False
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    return total, grad_norm, not updated, True


@torch.no_grad()
def evaluate(forward_step, make_valid_iterator: Callable[[], Iterator], model, args, device) -> float | None:
    """Mean per-token loss over the first --eval-iters global batches of the validation split
    (the same batches every time, so evaluations are comparable and resume-exact)."""
    model.eval()
    iterator = make_valid_iterator()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for _ in range(args.eval_iters):
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterator,
            model=[model],
            num_microbatches=args.num_microbatches,
            **_shape(args),
            forward_only=True,
        )
        total += _sum_reports(losses, device)
    model.train()
    return _global_mean(total)


# --------------------------------------------------------------------------- stopping


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits 0."""

    def __init__(self):
        self.received = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _agree_to_stop(local: bool, device: torch.device) -> bool:
    """All ranks stop together if any wants to (signals reach ranks at slightly different times)."""
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


# --------------------------------------------------------------------------- the loop


def is_logging_rank() -> bool:
    """The global last rank: it sits on the last pipeline stage, where the loss is known."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def train(*, args, model, optimizer, scheduler, train_iterator: Iterator, make_valid_iterator,
          count_batch, state: TrainState, save_fn=None, poll_fn=None, logger: MetricsLogger | None,
          device: torch.device, log=print) -> TrainState:
    """Run from `state.iteration` to --train-iters (or an exit condition). Returns the final state.

    count_batch(batch) -> (tokens, images, useful FLOPs) of one micro-batch, for throughput.
    save_fn(state) writes a checkpoint (None: no --save); poll_fn() runs after every step (it
    publishes finished background checkpoint writes).
    """
    forward_step = make_forward_step(device)
    peak = mfu_peak(args.peak_tflops)
    log(peak.describe())
    meter = Throughput(peak.flops)
    timed = TimedIterator(train_iterator, meter, count_batch)
    stop = StopSignal()
    dp_group = parallel_state.get_data_parallel_group()
    world = torch.distributed.get_world_size()
    last_saved = state.iteration
    interval_loss = torch.zeros(2, dtype=torch.float64, device=device)
    skipped = 0
    bad_streak = 0  # consecutive steps with a non-finite loss or gradients
    model.train()
    try:
        while state.iteration < args.train_iters:
            lr = current_lr(scheduler)  # the rate this step uses (the schedule moves after it)
            total, grad_norm, was_skipped, finite = train_step(forward_step, timed, model, optimizer, scheduler,
                                                               args, device)
            state.iteration += 1
            state.consumed_samples += args.global_batch_size
            meter.steps += 1
            interval_loss += total
            skipped += int(was_skipped)
            bad_streak = 0 if finite else bad_streak + 1
            if not finite:
                log(f"iteration {state.iteration}: the loss or the gradients are NaN/Inf (loss sum {total[0].item():.6g}); "
                    f"update skipped ({bad_streak} in a row, --max-skipped-steps {args.max_skipped_steps})")

            if state.iteration % args.log_interval == 0:
                loss = _global_mean(interval_loss)
                record = {
                    "iteration": state.iteration,
                    "consumed_samples": state.consumed_samples,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    **meter.summary(dp_group, world, device),
                    "peak_mem_gib": _max_over_ranks(peak_memory_gib(device), device),
                    "skipped": skipped,
                }
                if logger is not None:
                    logger.log(record, "train")
                interval_loss.zero_()
                skipped = 0
                meter.reset()

            if args.eval_interval and args.eval_iters and make_valid_iterator is not None \
                    and state.iteration % args.eval_interval == 0:
                eval_loss = evaluate(forward_step, make_valid_iterator, model, args, device)
                if logger is not None:
                    logger.log({"iteration": state.iteration, "consumed_samples": state.consumed_samples,
                                "loss": eval_loss}, "valid")
                meter.reset()  # evaluation time is not training throughput

            if poll_fn is not None:
                poll_fn()
            diverged = bad_streak >= args.max_skipped_steps
            reason = (f"{bad_streak} consecutive steps with a NaN/Inf loss or gradients (--max-skipped-steps "
                      f"{args.max_skipped_steps}); the weights are those of iteration "
                      f"{state.iteration - bad_streak}") if diverged else _stop_reason(args, state, stop)
            if _agree_to_stop(reason is not None, device) and reason is None:
                reason = "another rank is stopping"
            if save_fn is not None and (reason is not None or (
                    args.save_interval and state.iteration % args.save_interval == 0)):
                save_fn(state)
                last_saved = state.iteration
                meter.reset()
            if reason is not None:
                log(f"stopping after iteration {state.iteration}: {reason}")
                if diverged:
                    raise DivergedError(reason + (f"; saved as iteration {state.iteration} in {args.save}"
                                                  if save_fn is not None else ""))
                break
        if save_fn is not None and last_saved != state.iteration:
            save_fn(state)
    finally:
        stop.restore()
    return state


def _stop_reason(args, state: TrainState, stop: StopSignal) -> str | None:
    if stop.received:
        return f"received {stop.received}"
    if args.exit_interval and state.iteration % args.exit_interval == 0:
        return f"--exit-interval {args.exit_interval}"
    if args.exit_duration_in_mins and (time.time() - state.start_time) / 60 > args.exit_duration_in_mins:
        return f"--exit-duration-in-mins {args.exit_duration_in_mins}"
    return None


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()
