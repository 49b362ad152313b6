"""The training loop: one optimizer step = mcore's forward/backward schedule over the micro-batches
of a global batch, then the distributed optimizer's step and the LR schedule's.

Loss averaging: the loss of a step is the mean per-token cross-entropy over *every supervised
token of the global batch* (all micro-batches, all data-parallel ranks). `loss_func` returns
(sum of masked token losses, number of supervised tokens); with `calculate_per_token_loss`
(`PER_TOKEN_LOSS`, which the model is built with and `configure_model_config` checks) mcore's
schedule leaves the sum unnormalised and `finalize_model_grads` divides the gradients by the
global token count after the data-parallel reduction. Chosen over the per-micro-batch mean
because packed samples carry very different numbers of supervised tokens (images and text before
a document's first image carry none): every token then weighs the same, and the update does not
depend on how the global batch is cut into micro-batches or spread over ranks (DP=2 ≡ DP=1 with
twice the micro-batches).

A step makes one collective decision: one all-reduce (MAX) of [any loss or gradient not finite,
some rank wants to stop], read back with one host sync, before the optimizer step. So all ranks
skip a non-finite step together, count the same run of non-finite steps (--max-skipped-steps),
and stop after the same step (signals reach ranks at slightly different times).

`Trainer.train` runs the phases of each iteration in order: step, log, evaluate, stop?, save.
"""

from __future__ import annotations

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
from engine.training.config import TrainingConfig
from engine.training.metrics import MetricsLogger, Throughput, TimedIterator, mfu_peak, peak_memory_gib
from engine.training.optim import current_lr


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    start_time: float = field(default_factory=time.time)


# --------------------------------------------------------------------------- the loss contract

# `loss_func` returns the unnormalised sum of token losses and the token count: the model's
# TransformerConfig must say so (mcore then normalises by the global token count).
PER_TOKEN_LOSS = True


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(masked loss sum, supervised tokens, values to report) as mcore's schedule expects with
    `calculate_per_token_loss` (`PER_TOKEN_LOSS`)."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    tokens = mask.sum().detach()
    # [loss sum, supervised tokens, 1 for a micro-batch without any]: a micro-batch with no loss
    # token adds 0 to both sums (never a 0/0) and is counted.
    report = torch.stack([loss_sum.detach(), tokens, (tokens == 0).float()])
    return loss_sum, num_tokens, {"lm loss": report}


def check_loss_contract(config) -> None:
    """The model's TransformerConfig must be built with `calculate_per_token_loss=PER_TOKEN_LOSS`."""
    if getattr(config, "calculate_per_token_loss", None) is not PER_TOKEN_LOSS:
        raise AssertionError(f"the model config has calculate_per_token_loss="
                             f"{getattr(config, 'calculate_per_token_loss', None)}; loop.loss_func returns "
                             f"per-token sums and needs {PER_TOKEN_LOSS}")


def make_forward_step(device: torch.device) -> Callable:
    def forward_step(data_iterator: Iterator, model):
        # Every pipeline stage reads the micro-batch: the first embeds tokens and images, every
        # stage needs cu_seqlens/position_ids for packed attention, the last the labels and mask.
        batch = to_device(next(data_iterator), device)  # uint8 images are normalised there
        output = model(batch)
        return output, partial(loss_func, batch["loss_mask"])

    return forward_step


def _sum_reports(losses_reduced: list, device: torch.device) -> torch.Tensor:
    """[loss sum, tokens, micro-batches without loss tokens] over this rank's micro-batches
    (zeros off the last pipeline stage)."""
    total = torch.zeros(3, dtype=torch.float64, device=device)
    for report in losses_reduced:
        total += report["lm loss"].to(torch.float64)
    return total


def _global_mean(total: torch.Tensor) -> float | None:
    """The mean token loss over the data-parallel ranks (`total` is reduced in place); None when
    no token carried loss."""
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    loss, tokens = total[:2].tolist()
    return loss / tokens if tokens else None


# --------------------------------------------------------------------------- one step


def configure_model_config(model, optimizer, cfg: TrainingConfig) -> None:
    """Hook the DDP wrapper and optimizer into the TransformerConfig the schedules read."""
    config = model.config
    check_loss_contract(config)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if cfg.parallel.overlap_grad_reduce:
        # The schedule runs all but the last micro-batch under no_sync, so bucket reductions are
        # launched (overlapped with compute) only during the last backward.
        config.no_sync_func = model.no_sync
    if cfg.parallel.overlap_param_gather_active:
        config.param_sync_func = model.start_param_sync


def _forward_backward(forward_step, data_iterator, model, cfg: TrainingConfig, forward_only: bool) -> list:
    """mcore's schedule over one global batch's micro-batches. The activations pipeline stages
    exchange are [B*S, 1, hidden]: the model runs a micro-batch as one packed sequence."""
    seq, mbs = pipeline_shape(cfg.training.micro_batch_size, cfg.data.seq_length)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
        num_microbatches=cfg.num_microbatches, seq_length=seq, micro_batch_size=mbs,
        forward_only=forward_only)


def _local_nonfinite(total: torch.Tensor, model) -> torch.Tensor:
    """Is this rank's loss (on a last-stage rank) or any of its gradients NaN/Inf? One sum per
    gradient buffer: a NaN or Inf anywhere makes it non-finite."""
    bad = ~torch.isfinite(total[0].float())
    buffers = getattr(model, "buffers", None)  # mcore DDP: the contiguous gradient buffers
    if isinstance(buffers, list):
        grads = [b.grad_data for b in buffers + getattr(model, "expert_parallel_buffers", [])]
    else:
        grads = [getattr(p, "main_grad", p.grad) for p in model.parameters() if p.requires_grad]
    for g in grads:
        if g is not None:
            bad |= ~torch.isfinite(g.sum().float()).to(bad.device)
    return bad


def _agree(total: torch.Tensor, model, wants_stop: bool, device: torch.device) -> tuple[bool, bool]:
    """(loss and gradients finite on every rank, some rank wants to stop): one all-reduce, one
    host sync."""
    flags = torch.zeros(2, dtype=torch.float32, device=device)
    flags[0] = _local_nonfinite(total, model).to(device)
    flags[1] = float(wants_stop)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    nonfinite, stop = flags.tolist()
    return not nonfinite, bool(stop)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step. `loss` is [masked loss sum, supervised tokens, micro-batches without
    supervised tokens] over this rank's micro-batches (zeros off the last pipeline stage)."""

    loss: torch.Tensor
    grad_norm: float | None  # None when the step was not finite
    skipped: bool  # no update (non-finite, or the optimizer skipped it)
    finite: bool  # the loss and every gradient, on every rank
    stop: bool  # some rank asked to stop after this step


def train_step(forward_step, data_iterator, model, optimizer, scheduler, cfg: TrainingConfig,
               device: torch.device, wants_stop: Callable[[], bool] = lambda: False) -> StepResult:
    """One optimizer step. `wants_stop()` is this rank's vote to stop, asked once the gradients
    exist and agreed in the same all-reduce as the finite check. A non-finite step changes
    nothing: no update of the weights, the optimizer state or the learning-rate schedule."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _forward_backward(forward_step, data_iterator, model, cfg, forward_only=False)
    total = _sum_reports(losses, device)
    finite, stop = _agree(total, model, wants_stop(), device)
    if not finite:
        return StepResult(total, None, skipped=True, finite=False, stop=stop)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    return StepResult(total, grad_norm, skipped=not updated, finite=True, stop=stop)


@torch.no_grad()
def evaluate(forward_step, make_valid_iterator: Callable[[], Iterator], model, cfg: TrainingConfig,
             device: torch.device) -> float | None:
    """Mean per-token loss over the first --eval-iters global batches of the validation split
    (the same batches every time, so evaluations are comparable and resume-exact)."""
    model.eval()
    iterator = make_valid_iterator()
    total = torch.zeros(3, dtype=torch.float64, device=device)
    for _ in range(cfg.training.eval_iters):
        total += _sum_reports(_forward_backward(forward_step, iterator, model, cfg, forward_only=True), device)
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


def stop_reason(cfg: TrainingConfig, iteration: int, start_time: float, stop: StopSignal) -> str | None:
    """Why this rank wants to stop after `iteration`, if it does."""
    t = cfg.training
    if stop.received:
        return f"received {stop.received}"
    if t.exit_interval and iteration % t.exit_interval == 0:
        return f"--exit-interval {t.exit_interval}"
    if t.exit_duration_in_mins and (time.time() - start_time) / 60 > t.exit_duration_in_mins:
        return f"--exit-duration-in-mins {t.exit_duration_in_mins}"
    return None


def is_logging_rank() -> bool:
    """The global last rank: it sits on the last pipeline stage, where the loss is known."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


# --------------------------------------------------------------------------- the loop


class Trainer:
    """Runs from `state.iteration` to --train-iters (or an exit condition).

    count_batch(batch) -> (tokens, images, useful FLOPs) of one micro-batch, for throughput.
    save_fn(state) writes a checkpoint (None: no --save); poll_fn() runs after every step (it
    publishes finished background checkpoint writes); sources_fn(consumed_samples) -> what each
    blended dataset has given, logged with each record; fewshot_fn(iteration) -> few-shot scores to
    log ({} when none is due; engine/evaluation/during_training.py leaves training untouched).
    """

    def __init__(self, *, cfg: TrainingConfig, model, optimizer, scheduler, train_iterator: Iterator,
                 make_valid_iterator: Callable[[], Iterator] | None, count_batch, state: TrainState,
                 save_fn=None, poll_fn=None, logger: MetricsLogger | None, device: torch.device, log=print,
                 sources_fn: Callable[[int], dict] | None = None,
                 fewshot_fn: Callable[[int], dict] | None = None):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.make_valid_iterator, self.state, self.device, self.log = make_valid_iterator, state, device, log
        self.save_fn, self.poll_fn, self.logger = save_fn, poll_fn, logger
        self.sources_fn = sources_fn  # consumed samples -> per-source consumption, for the log
        self.fewshot_fn = fewshot_fn
        self.forward_step = make_forward_step(device)
        peak = mfu_peak(cfg.logging.peak_tflops)
        if device.type == "cuda":  # on a CPU there is no MFU to speak of
            log(peak.describe())
        self.meter = Throughput(peak.flops)
        self.batches = TimedIterator(train_iterator, self.meter, count_batch)
        self.dp_group = parallel_state.get_data_parallel_group()
        self.world = torch.distributed.get_world_size()
        self.signal: StopSignal | None = None
        self.last_saved = state.iteration
        self.interval_loss = torch.zeros(3, dtype=torch.float64, device=device)  # since the last log line
        self.interval_skipped = 0
        self.bad_streak = 0  # consecutive steps with a non-finite loss or gradients
        self.stop_vote: str | None = None  # why this rank voted to stop in the current step

    def train(self) -> TrainState:
        """Each iteration: step, log, evaluate, stop?, save. Returns the final state."""
        self.signal = StopSignal()
        self.model.train()
        try:
            while self.state.iteration < self.cfg.training.train_iters:
                lr = current_lr(self.scheduler)  # the rate this step uses (the schedule moves after it)
                result = self.step()
                self.log_step(result, lr)
                self.maybe_evaluate()
                self.maybe_fewshot()
                if self.poll_fn is not None:
                    self.poll_fn()
                diverged = self.divergence()
                reason = diverged or self.agreed_stop(result)
                self.maybe_save(force=reason is not None)
                if reason is not None:
                    self.log(f"stopping after iteration {self.state.iteration}: {reason}")
                    if diverged:
                        raise DivergedError(reason + (f"; saved as iteration {self.state.iteration} in "
                                                      f"{self.cfg.checkpoint.save}" if self.save_fn is not None else ""))
                    break
            if self.save_fn is not None and self.last_saved != self.state.iteration:
                self.save_fn(self.state)
        finally:
            self.signal.restore()
        return self.state

    def step(self) -> StepResult:
        result = train_step(self.forward_step, self.batches, self.model, self.optimizer, self.scheduler, self.cfg,
                            self.device, wants_stop=self._vote_to_stop)
        state = self.state
        state.iteration += 1
        state.consumed_samples += self.cfg.training.global_batch_size
        self.meter.steps += 1
        self.interval_loss += result.loss
        self.interval_skipped += int(result.skipped)
        self.bad_streak = 0 if result.finite else self.bad_streak + 1
        if not result.finite:
            self.log(f"iteration {state.iteration}: the loss or the gradients are NaN/Inf (loss sum "
                     f"{result.loss[0].item():.6g}); update skipped ({self.bad_streak} in a row, "
                     f"--max-skipped-steps {self.cfg.training.max_skipped_steps})")
        return result

    def _vote_to_stop(self) -> bool:
        self.stop_vote = stop_reason(self.cfg, self.state.iteration + 1, self.state.start_time, self.signal)
        return self.stop_vote is not None

    def log_step(self, result: StepResult, lr: float) -> None:
        """Every --log-interval steps: one record of the steps since the last one."""
        if self.state.iteration % self.cfg.logging.log_interval:
            return
        loss = _global_mean(self.interval_loss)
        record = {
            "iteration": self.state.iteration,
            "consumed_samples": self.state.consumed_samples,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(result.grad_norm) if result.grad_norm is not None else None,
            **self.meter.summary(self.dp_group, self.world, self.device),
            "peak_mem_gib": _max_over_ranks(peak_memory_gib(self.device), self.device),
            "skipped": self.interval_skipped,
            "no_loss_microbatches": int(self.interval_loss[2].item()),  # reduced by _global_mean
        }
        if self.logger is not None:
            if self.sources_fn is not None:
                record["sources"] = self.sources_fn(self.state.consumed_samples)
            self.logger.log(record, "train")
        self.interval_loss.zero_()
        self.interval_skipped = 0
        self.meter.reset()

    def maybe_evaluate(self) -> None:
        t = self.cfg.training
        if not (t.evaluates and self.make_valid_iterator is not None and self.state.iteration % t.eval_interval == 0):
            return
        eval_loss = evaluate(self.forward_step, self.make_valid_iterator, self.model, self.cfg, self.device)
        if self.logger is not None:
            self.logger.log({"iteration": self.state.iteration, "consumed_samples": self.state.consumed_samples,
                             "loss": eval_loss}, "valid")
        self.meter.reset()  # evaluation time is not training throughput

    def maybe_fewshot(self) -> None:
        scores = self.fewshot_fn(self.state.iteration) if self.fewshot_fn is not None else {}
        if not scores:
            return
        if self.logger is not None:
            self.logger.log({"iteration": self.state.iteration, "consumed_samples": self.state.consumed_samples,
                             **scores}, "fewshot")
        self.meter.reset()  # evaluation time is not training throughput

    def divergence(self) -> str | None:
        """Why the run diverged, after --max-skipped-steps non-finite steps in a row (the same on
        every rank: the finite flag of each step is agreed)."""
        limit = self.cfg.training.max_skipped_steps
        if self.bad_streak < limit:
            return None
        return (f"{self.bad_streak} consecutive steps with a NaN/Inf loss or gradients (--max-skipped-steps "
                f"{limit}); the weights are those of iteration {self.state.iteration - self.bad_streak}")

    def agreed_stop(self, result: StepResult) -> str | None:
        if not result.stop:
            return None
        return self.stop_vote or "another rank is stopping"

    def maybe_save(self, force: bool) -> None:
        """At a stop, and every --save-interval steps."""
        interval = self.cfg.checkpoint.save_interval
        if self.save_fn is None or not (force or (interval and self.state.iteration % interval == 0)):
            return
        self.save_fn(self.state)
        self.last_saved = self.state.iteration
        self.meter.reset()
