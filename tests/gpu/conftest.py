"""GPU checks (`pytest -q tests/gpu`): skipped without CUDA. One process, NCCL world of 1."""

import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import free_port

# The real-photo / real-tokenizer batch builder and the Hugging Face twins are shared with the
# CPU model suite.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mcore_cuda():
    from engine.platform import init_distributed

    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    # exact fp32 references: no TF32 in matmuls or the vision tower's convolution
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return init_distributed(1, 1)


@pytest.fixture(scope="session")
def sp(tokenizer_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
