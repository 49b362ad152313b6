"""Model tests run megatron-core in this process as a one-rank gloo group (TP=PP=1)."""

import os

import pytest
import torch

from helpers import free_port


@pytest.fixture(scope="session")
def mcore():
    """torch.distributed (world of 1) + megatron-core parallel state with TP=PP=1, on the CPU."""
    from engine.platform import init_distributed

    if torch.cuda.is_available():
        pytest.skip("CPU model suite (megatron-core CPU mode); with CUDA, tests/gpu runs these checks")

    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    return init_distributed(1, 1)


@pytest.fixture(scope="session")
def sp(tokenizer_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
