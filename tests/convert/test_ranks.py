"""A rank's engine error reaches the parent as the same class with the same message; a bug in a
rank keeps torch's report with its traceback."""

from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp

from engine.convert.ranks import run_ranks
from engine.errors import (CheckpointError, ConfigError, DocumentError, EngineError, FormatError, ImageError,
                           RankFailure)


def _bad_shard_on_rank_1(rank: int, spec: dict) -> None:
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["RANK"] == str(rank)
    if rank == 1:
        raise CheckpointError(f"{spec['shard']}: cannot load as a PyTorch state dict (truncated)")


def _bug(rank: int, spec: dict) -> None:
    raise KeyError("a bug, not bad input")


def _fine(rank: int, spec: dict) -> None:
    with open(os.path.join(spec["dir"], f"ran-{rank}"), "w") as f:
        f.write(os.environ["MASTER_PORT"])


@pytest.mark.parametrize("error", [
    CheckpointError("ckpt/iter_0000004: no model_config"),
    ConfigError("--tp 3: not divisible"),
    FormatError("data.idx: header checksum mismatch (the file is corrupt)"),
])
def test_failure_round_trip_keeps_class_and_message(tmp_path, error):
    RankFailure.of(3, error).write(tmp_path)
    (back,) = RankFailure.read_all(tmp_path)
    raised = back.error()
    assert type(raised) is type(error)
    assert str(raised) == f"rank 3: {error}"


def test_failure_of_a_class_with_a_kind_keeps_its_name(tmp_path):
    for rank, error in ((1, ImageError("missing_image", "image file not found: a.jpg")),
                        (0, DocumentError("bad_field", "missing field 'texts'"))):
        RankFailure.of(rank, error).write(tmp_path)
    first, second = RankFailure.read_all(tmp_path)  # lowest rank first
    assert (first.rank, second.rank) == (0, 1)
    assert type(second.error()) is EngineError
    assert str(second.error()) == "rank 1: ImageError: image file not found: a.jpg"


@pytest.mark.slow
def test_rank_error_is_raised_in_the_parent_as_its_class(tmp_path):
    shard = tmp_path / "pytorch_model-00002-of-00002.bin"
    before = dict(os.environ)
    with pytest.raises(CheckpointError) as e:
        run_ranks(_bad_shard_on_rank_1, 2, {"shard": str(shard)})
    assert str(e.value) == f"rank 1: {shard}: cannot load as a PyTorch state dict (truncated)"
    assert dict(os.environ) == before  # MASTER_ADDR/PORT etc. restored


@pytest.mark.slow
def test_a_bug_in_a_rank_keeps_its_traceback(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="KeyError: 'a bug, not bad input'"):
        run_ranks(_bug, 1, {})
    run_ranks(_fine, 2, {"dir": str(tmp_path)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ran-0", "ran-1"]
