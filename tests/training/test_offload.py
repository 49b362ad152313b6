"""The CPU-offloaded optimizer (--optimizer-cpu-offload) trains exactly as the on-device one.

On a machine without CUDA nothing can leave a GPU, so the CPU mode runs megatron-core's
HybridDeviceOptimizer with the model's own parameters in the GPU's part (engine.patches,
hybrid-optimizer): the offloaded share is copied, its gradients transferred, updated by the host
AdamW and copied back, as on a GPU. Checked here: that path is the one built; the losses of a bf16
run with it equal the on-device optimizer's bit for bit; a resume from its checkpoint is exact;
and checkpoints load across offload settings (with and without, another fraction, overlap).
"""

from __future__ import annotations

import pytest
import torch

import helpers

pytestmark = pytest.mark.slow

FLAGS = ["--model", "tiny", "--bf16", "--seq-length", 1536, "--micro-batch-size", 1, "--global-batch-size", 2,
         "--train-iters", 4, "--lr", 1e-3, "--min-lr", 1e-4, "--lr-decay-style", "cosine", "--lr-warmup-iters", 2,
         "--split", "80,20,0", "--log-interval", 1, "--eval-interval", 0, "--num-workers", 0]
OFFLOAD = ["--optimizer-cpu-offload"]


def _run(tmp_path, name: str, data: str, *extra) -> list[tuple]:
    log = tmp_path / f"{name}.jsonl"
    helpers.run_ranks([*FLAGS, "--data-path", data, "--log-jsonl", log, *extra], 1, tmp_path / f"logs_{name}")
    return [(r["iteration"], r["loss"], r["grad_norm"]) for r in helpers.read_jsonl(log, "train")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dataset):
    """Four steps on the device optimizer and on the offloaded one, each saving at step 2."""
    if torch.cuda.is_available():
        pytest.skip("CPU-mode test (with CUDA the offload is real: run the benchmark)")
    root = tmp_path_factory.mktemp("offload")
    out = {"root": root}
    for name, extra in (("device", []), ("offload", OFFLOAD)):
        out[name] = _run(root, name, tiny_dataset, *extra, "--save", root / f"ckpt_{name}", "--save-interval", 2)
    return out


def test_offloaded_optimizer_gives_the_same_losses(runs):
    assert [r[0] for r in runs["offload"]] == [1, 2, 3, 4]
    assert runs["offload"] == runs["device"]
    assert runs["offload"][-1][1] < runs["offload"][0][1]  # it learns


@pytest.mark.parametrize("saved, resumed", [
    ("offload", OFFLOAD),
    ("offload", []),
    ("device", OFFLOAD),
    ("offload", OFFLOAD + ["--optimizer-offload-fraction", 0.5, "--overlap-cpu-optimizer-d2h-h2d"]),
])
def test_resume_is_exact_across_offload_settings(runs, tiny_dataset, tmp_path, saved, resumed):
    got = _run(tmp_path, "resume", tiny_dataset, *resumed, "--load", runs["root"] / f"ckpt_{saved}" / "iter_0000002")
    assert got == runs["device"][2:]


def _built_optimizer(argv: list) -> dict:
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    from engine.platform import init_distributed
    from engine.training.arguments import parse_args
    from engine.training.pretrain import build_model_and_optimizer

    cfg = parse_args(argv, world_size=1)
    init_distributed(1, 1, seed=cfg.training.seed)
    _, optimizer, _ = build_model_and_optimizer(cfg)
    hybrid = optimizer.optimizer
    assert isinstance(hybrid, HybridDeviceOptimizer), type(hybrid)
    params = [p for group in hybrid.param_groups for p in group["params"]]
    host = [p for p in params if p in hybrid.gpu_params_map_cpu_copy]
    # Each offloaded parameter is updated through its own copy by a host AdamW.
    assert all(hybrid.gpu_params_map_cpu_copy[p] is not p for p in host)
    return {"params": sum(p.numel() for p in params), "host": sum(p.numel() for p in host),
            "host_optimizers": len(hybrid.cpu_optimizers), "device_optimizer": hybrid.gpu_optimizer is not None,
            "host_kind": {type(o).__name__ for o in hybrid.cpu_optimizers},
            # mcore's own fp32 copies of the bf16 weights (precision-aware mode keeps none: the
            # hybrid optimizer holds the main weights)
            "distopt_fp32_copies": sum(
                p is not None for o in getattr(optimizer, "chained_optimizers", [optimizer])
                for g in o.shard_fp32_from_float16_groups for p in g)}


@pytest.mark.parametrize("extra, check", [
    ([], lambda r: r["host"] == r["params"] and r["host_optimizers"] == 1 and not r["device_optimizer"]),
    (["--optimizer-offload-fraction", 0.5],
     lambda r: 0 < r["host"] < r["params"] and r["device_optimizer"]),
    (["--overlap-cpu-optimizer-d2h-h2d"], lambda r: r["host_optimizers"] > 1),  # one per parameter
])
def test_the_offload_path_is_built(tiny_dataset, extra, check):
    if torch.cuda.is_available():
        pytest.skip("CPU-mode test")
    argv = [str(a) for a in [*FLAGS, "--data-path", tiny_dataset, *OFFLOAD, *extra]]
    (report,) = helpers.run_distributed(_built_optimizer, 1, argv, timeout=200)
    assert report["host_kind"] == {"AdamW"}
    assert report["distopt_fp32_copies"] == 0
    assert check(report), report
