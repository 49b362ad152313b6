"""Expected conditions are not problems: the warnings the engine's libraries print for them.

megatron-core, torch and torch.distributed.checkpoint announce every optional kernel they fall
back from and every default they assume, on every rank. On a machine without Transformer Engine,
apex or a GPU these are the normal state of affairs, and which path actually runs is said once,
in one line, by the kernel plan (`engine.model.specs.KernelPlan.describe`). Only the messages
listed here are hidden, by their text: any other warning still reaches the user.

`silence_expected()` runs when the `engine` package is first imported, before megatron-core is,
because several of these are emitted at import time.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, start of the message, issuing module or "") of each expected warning, grouped by why
# it is expected.
EXPECTED_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # optional kernels: the kernel plan names what runs instead
    (UserWarning, r"Transformer Engine and Apex are not installed", ""),
    (UserWarning, r"Apex is not installed", ""),
    # megatron-core's notices about defaults it fills in itself and APIs it is migrating
    (DeprecationWarning, r"Warning: tp_group is None, using default tp group", ""),
    (DeprecationWarning, r"MLP requires ffn_hidden_size, but it was not provided", ""),
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_modules", ""),
    (UserWarning, r"MimoModelConfig is experimental", ""),
    # mcore's optimizer probes `param.grad` on the bf16/fp32 views of its gradient buffers
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     r"megatron\.core\.optimizer\.optimizer"),
    # torch.distributed.checkpoint's notices about the APIs megatron-core's dist-checkpointing calls
    (UserWarning, r"The argument order of load has been changed", ""),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", ""),
    # conversion and inference read a distributed checkpoint in one process, on purpose
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
                  r"in a single process", ""),
)

# (logger, start of the message): log records of the same kind.
EXPECTED_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("torch.utils.cpp_extension", r"No CUDA runtime is found"),  # a CPU-only machine
    # we build the LLaMA decoder from GPTModel's pieces on purpose (engine/model/llava.py says why)
    ("megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED"),
    # DDP computes the parameter layout itself, as for every caller that builds it directly
    ("megatron.core.distributed.distributed_data_parallel", r"DistributedDataParallel: full_param_layout not provided"),
)


class _DropExpected(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_DONE = False


def silence_expected() -> None:
    """Install the filters (idempotent)."""
    global _DONE
    if _DONE:
        return
    for category, message, module in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, message in EXPECTED_LOG_RECORDS:
        logging.getLogger(name).addFilter(_DropExpected(message))
    _DONE = True
