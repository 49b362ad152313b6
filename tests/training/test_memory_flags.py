"""The recompute and optimizer-offload flags: parsed into the frozen config, and every combination
that cannot run refused at start with the flag's name."""

import pytest

from engine.errors import ConfigError
from engine.model.recompute import Recompute
from engine.training.arguments import parse_args


def _args(data: str, *extra, world_size: int = 1):
    return parse_args(["--model", "tiny", "--data-path", data, "--seq-length", "1536", "--train-iters", "10",
                       *map(str, extra)], world_size=world_size)


def test_recompute_flags_reach_the_config(tiny_dataset):
    assert _args(tiny_dataset).model.recompute is None
    assert _args(tiny_dataset, "--recompute-granularity", "full").model.recompute == Recompute("full", "uniform", 1)
    cfg = _args(tiny_dataset, "--recompute-granularity", "full", "--recompute-method", "block",
                "--recompute-num-layers", 2, "--pipeline-model-parallel-size", 2, world_size=2)
    assert cfg.model.recompute == Recompute("full", "block", 2)
    cfg = _args(tiny_dataset, "--recompute-granularity", "selective", "--recompute-modules", "mlp", "layernorm")
    assert cfg.model.recompute_modules == ("mlp", "layernorm") and cfg.model.recompute.modules == ("mlp", "layernorm")
    assert cfg.to_dict()["recompute_modules"] == ("mlp", "layernorm")


@pytest.mark.parametrize("extra, message", [
    (["--recompute-num-layers", 2], "--recompute-num-layers without --recompute-granularity"),
    (["--recompute-granularity", "selective", "--recompute-modules", "moe"], "mixture-of-experts"),
    (["--recompute-granularity", "full", "--recompute-modules", "mlp"], "needs --recompute-granularity selective"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", 3,
      "--pipeline-model-parallel-size", 2], "exceeds the 2 language layers of each pipeline stage"),
    (["--optimizer-cpu-offload", "--no-bf16"], "--optimizer-cpu-offload needs --bf16"),
    (["--optimizer-cpu-offload", "--bf16", "--no-use-distributed-optimizer"], "needs --use-distributed-optimizer"),
    (["--overlap-cpu-optimizer-d2h-h2d", "--bf16"], "needs --optimizer-cpu-offload"),
    (["--optimizer-cpu-offload", "--bf16", "--optimizer-offload-fraction", 0], "must be in (0, 1]"),
])
def test_bad_combinations_are_refused(tiny_dataset, extra, message):
    world_size = 2 if "--pipeline-model-parallel-size" in extra else 1
    with pytest.raises(ConfigError) as e:
        _args(tiny_dataset, *extra, world_size=world_size)
    assert message in str(e.value)


def test_offload_flags_reach_the_config(tiny_dataset):
    opt = _args(tiny_dataset, "--bf16", "--optimizer-cpu-offload", "--optimizer-offload-fraction", 0.25,
                "--overlap-cpu-optimizer-d2h-h2d").optimizer
    assert (opt.optimizer_cpu_offload, opt.optimizer_offload_fraction, opt.overlap_cpu_optimizer_d2h_h2d) == (
        True, 0.25, True)
