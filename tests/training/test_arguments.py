"""Flags, YAML config files and start-up validation: a bad configuration fails before any process
group or model exists, with a message that names the flag (or file:line) and the fix."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from engine.data.dataset import DataBlend, DataSplit
from engine.training.arguments import ConfigError, parse_args
from engine.training.pretrain import check_data, main


def _args(data: str, *extra, world_size: int = 1):
    return parse_args(["--model", "tiny", "--data-path", data, "--seq-length", "1536", "--train-iters", "100",
                       "--split", "80,20,0", *map(str, extra)], world_size=world_size)


def test_defaults_reproduce_the_seed_recipe(tiny_dataset):
    cfg = parse_args(["--data-path", tiny_dataset, "--train-iters", "1000"], world_size=8)
    opt = cfg.optimizer
    assert cfg.model.preset == "llava-1.5-7b" and cfg.model_config.name == "llava-1.5-7b"
    assert opt.lr == 2e-5 and opt.min_lr == 0.0
    assert opt.lr_decay_style == "constant"
    assert (opt.lr_warmup_iters, opt.lr_decay_iters) == (30, 1000)  # 3 % of the training iterations
    assert opt.weight_decay == 0.0
    assert (opt.adam_beta1, opt.adam_beta2, opt.clip_grad) == (0.9, 0.999, 1.0)
    assert cfg.precision.bf16 == torch.cuda.is_available()
    assert cfg.model.freeze_vision and not cfg.model.freeze_projector and not cfg.model.freeze_llm
    assert cfg.data.max_num_images == 12
    assert cfg.parallel.use_distributed_optimizer and cfg.parallel.overlap_grad_reduce
    assert cfg.training.gradient_accumulation_fusion and not cfg.training.cross_entropy_loss_fusion
    assert (cfg.parallel.data_parallel_size, cfg.training.global_batch_size, cfg.num_microbatches) == (8, 8, 1)
    assert cfg.data.blend == DataBlend((tiny_dataset,), (1.0,))
    assert cfg.data.split == DataSplit("969,30,1", (0.969, 0.03, 0.001))


def test_the_config_is_frozen(tiny_dataset):
    cfg = _args(tiny_dataset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.train_iters = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model_config = None


def test_blend_and_split_are_parsed_once_into_types(tiny_dataset, tmp_path):
    other = tmp_path / "other"
    for suffix in (".idx", ".tokens.bin", ".images.bin"):
        (tmp_path / f"other{suffix}").write_bytes(b"")
    cfg = parse_args(["--model", "tiny", "--data-path", "3", tiny_dataset, "1", str(other), "--seq-length", "1536",
                      "--train-iters", "100", "--split", "98/2"], world_size=1)
    assert cfg.data.blend.prefixes == (tiny_dataset, str(other))
    assert cfg.data.blend.weights == (0.75, 0.25)
    assert list(cfg.data.blend) == [(0.75, tiny_dataset), (0.25, str(other))]
    assert cfg.data.split.fractions == (0.98, 0.02, 0.0) and str(cfg.data.split) == "98/2"
    with pytest.raises(ConfigError, match=r"--split '0,1,0': the train share must be positive"):
        _args(tiny_dataset, "--split", "0,1,0")


def test_loss_policies_per_dataset(tiny_dataset, tmp_path):
    other = tmp_path / "other"
    for suffix in (".idx", ".tokens.bin", ".images.bin"):
        (tmp_path / f"other{suffix}").write_bytes(b"")
    base = ["--model", "tiny", "--seq-length", "1536", "--train-iters", "10"]
    cfg = parse_args(base + ["--data-path", "0.7", tiny_dataset, "0.3", f"{other}:all"], world_size=1)
    assert cfg.data.blend.prefixes == (tiny_dataset, str(other))
    assert cfg.data.blend.loss_policies == ("after-first-image", "all")
    cfg = parse_args(base + ["--data-path", tiny_dataset, "--loss-policy", "all"], world_size=1)
    assert cfg.data.blend.loss_policies == ("all",)
    blend_file = tmp_path / "blend.yaml"
    blend_file.write_text(f"- {{path: {tiny_dataset}, weight: 3}}\n- {{path: {other}, weight: 1, loss: all}}\n")
    cfg = parse_args(base + ["--data-blend-file", str(blend_file)], world_size=1)
    assert cfg.data.blend == DataBlend((tiny_dataset, str(other)), (0.75, 0.25), ("after-first-image", "all"))
    blend_file.write_text(f"- {{path: {tiny_dataset}, loss: some}}\n")
    with pytest.raises(ConfigError, match=r"blend.yaml: entry 1: loss must be one of"):
        parse_args(base + ["--data-blend-file", str(blend_file)], world_size=1)
    with pytest.raises(ConfigError, match="not both"):
        parse_args(base + ["--data-blend-file", str(blend_file), "--data-path", tiny_dataset], world_size=1)
    with pytest.raises(ConfigError, match=r"other:everything.idx not found"):
        parse_args(base + ["--data-path", f"{other}:everything"], world_size=1)


def test_derived_values(tiny_dataset):
    cfg = parse_args(["--model", "tiny", "--data-path", tiny_dataset, "--seq-length", "1536", "--train-samples", "10",
                      "--global-batch-size", "4", "--micro-batch-size", "2", "--lr-warmup-fraction", "0.5",
                      "--sequence-parallel", "--eval-iters", "3"], world_size=2)
    assert cfg.training.train_iters == 3 and cfg.num_microbatches == 1
    assert (cfg.optimizer.lr_warmup_iters, cfg.optimizer.lr_decay_iters) == (1, 3)
    assert cfg.parallel.sequence_parallel is False  # TP 1: nothing to shard over
    assert cfg.num_samples() == (12, 12, 0)  # 3 steps of 4; 3 validation batches of 4
    assert cfg.data.pad_id == 0  # <unk>: LLaMA defines no pad piece


def test_to_dict_records_every_flag_and_the_derived_values(tiny_dataset):
    from engine.training.arguments import build_parser

    cfg = _args(tiny_dataset, "--micro-batch-size", 2, "--global-batch-size", 8, world_size=2)
    d = cfg.to_dict()
    flags = {a.dest for a in build_parser()._actions if a.dest != "help"}
    derived = {"world_size", "data_parallel_size", "num_microbatches", "model_config", "data_blend",
               "data_loss_policies", "split_fractions"}
    assert set(d) == flags | derived
    assert json.loads(json.dumps(d)) == json.loads(json.dumps(d, default=str))  # JSON-able as it is
    assert (d["model"], d["global_batch_size"], d["num_microbatches"], d["world_size"]) == ("tiny", 8, 2, 2)
    assert d["data_path"] == [tiny_dataset] and d["data_blend"] == [(1.0, tiny_dataset)]
    assert d["split"] == "80,20,0" and d["split_fractions"] == [0.8, 0.2, 0.0]
    assert d["model_config"]["language"]["num_layers"] == 4 and d["lr_decay_iters"] == 100


def test_yaml_config_and_flags_that_override_it(tiny_dataset, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: tiny\n"
        "seq_length: 1536\n"            # underscores and dashes both work
        "micro-batch-size: 2\n"
        "global-batch-size: 8\n"
        "lr: 1e-4\n"                     # YAML reads this as a string; the flag's type converts it
        "train-vision: true\n"           # the negative spelling of freeze-vision
        "no-overlap-grad-reduce: true\n"
        f"data-path: [{tiny_dataset}]\n"
        "train-iters: 10\n")
    args = parse_args(["--config", str(cfg), "--lr", "3e-4"], world_size=2)
    assert args.model_config.name == "tiny" and args.data.seq_length == 1536
    assert args.optimizer.lr == 3e-4  # the flag wins
    assert args.model.freeze_vision is False and args.parallel.overlap_grad_reduce is False
    assert (args.parallel.data_parallel_size, args.num_microbatches) == (2, 2)  # 8 = 2 x 2 DP x 2 steps
    assert args.config_file == str(cfg)


def test_yaml_unknown_key_names_file_and_line(tiny_dataset, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: tiny\nlearning-rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: unknown key 'learning-rate'"):
        parse_args(["--config", str(cfg), "--data-path", tiny_dataset, "--train-iters", "1"])
    cfg.write_text("micro-batch-size: two\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:1: 'micro-batch-size' has bad value 'two'"):
        parse_args(["--config", str(cfg), "--data-path", tiny_dataset, "--train-iters", "1"])


def test_global_batch_must_divide_by_micro_batch_times_dp(tiny_dataset):
    with pytest.raises(ConfigError, match=r"--global-batch-size 6 is not divisible by --micro-batch-size 2 "
                                          r"x data-parallel size 2 \(= 4\)"):
        _args(tiny_dataset, "--micro-batch-size", 2, "--global-batch-size", 6, world_size=2)
    args = _args(tiny_dataset, "--micro-batch-size", 2, "--global-batch-size", 8, world_size=2)
    assert args.num_microbatches == 2


def test_missing_or_wrong_data_path(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="--data-path is required"):
        parse_args(["--model", "tiny", "--seq-length", "1536", "--train-iters", "1"])
    with pytest.raises(ConfigError, match=r"nowhere\.idx not found"):
        _args(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="weight/prefix pairs"):
        parse_args(["--data-path", "0.5", tiny_dataset, "0.5", "--train-iters", "1"])


def test_layout_and_length_checks(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="num_attention_heads=4 is not divisible by tensor_model_parallel_size=8"):
        _args(tiny_dataset, "--tensor-model-parallel-size", 8, world_size=8)
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        _args(tiny_dataset, "--tensor-model-parallel-size", 2, world_size=3)
    with pytest.raises(ConfigError, match="exactly one of --train-iters and --train-samples"):
        _args(tiny_dataset, "--train-samples", 10)
    args = parse_args(["--model", "tiny", "--data-path", tiny_dataset, "--seq-length", "1536", "--train-samples",
                       "10", "--global-batch-size", "4", "--split", "80,20,0"], world_size=1)
    assert args.training.train_iters == 3  # whole steps: 10 samples need 3 steps of 4
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings 4096"):
        parse_args(["--data-path", tiny_dataset, "--seq-length", "8192", "--train-iters", "1"])
    with pytest.raises(ConfigError, match="--freeze-llm trains only what lives on the first pipeline stage"):
        _args(tiny_dataset, "--freeze-llm", "--pipeline-model-parallel-size", 2, world_size=2)
    with pytest.raises(ConfigError, match="--cross-entropy-loss-fusion needs --bf16"):
        _args(tiny_dataset, "--cross-entropy-loss-fusion", "--no-bf16")
    with pytest.raises(ConfigError, match="--load .*: no such directory"):
        _args(tiny_dataset, "--load", tmp_path / "typo", "--save", tmp_path / "ckpt")
    # --load naming the (not yet existing) --save directory is the self-resuming job: fine.
    _args(tiny_dataset, "--load", tmp_path / "ckpt", "--save", tmp_path / "ckpt")


def test_data_that_does_not_match_the_flags(tiny_dataset):
    check_data(_args(tiny_dataset))  # documents of 1-2 images, --max-num-images 12
    with pytest.raises(ConfigError, match=r"documents hold up to 2 images but --max-num-images is 1; "
                                          r"preprocess with tools/preprocess_interleaved.py --max-num-images 1"):
        check_data(_args(tiny_dataset, "--max-num-images", 1))


def test_cli_reports_bad_configuration_with_exit_status_2(tiny_dataset, capsys):
    assert main(["--model", "tiny", "--data-path", tiny_dataset, "--train-iters", "5", "--seq-length", "1536",
                 "--global-batch-size", "3", "--micro-batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llava-pretrain: error: --global-batch-size 3 is not divisible")


def test_split_that_leaves_a_split_empty(tiny_dataset):
    with pytest.raises(ConfigError, match=r"has 16 documents: --split 99,1,0 leaves 16 for training and 0 for validation"):
        check_data(_args(tiny_dataset, "--split", "99,1,0", "--eval-interval", 10))
    check_data(_args(tiny_dataset, "--split", "99,1,0", "--eval-interval", 0))  # no evaluation: fine


def test_fp8_flags_become_the_plans_fp8_settings(tiny_dataset):
    cfg = _args(tiny_dataset, "--fp8-format", "hybrid", "--fp8-recipe", "tensorwise", "--first-last-layers-bf16",
                "--num-layers-at-end-in-bf16", "2", "--fp8-vision")
    fp8 = cfg.precision.fp8_plan
    assert (fp8.format, fp8.recipe, fp8.bf16_layers_at_start, fp8.bf16_layers_at_end, fp8.vision) == \
        ("hybrid", "tensorwise", 1, 2, True)
    assert _args(tiny_dataset).precision.fp8_plan is None
    with pytest.raises(ConfigError, match="--first-last-layers-bf16 needs --fp8-recipe tensorwise"):
        _args(tiny_dataset, "--fp8-format", "e4m3", "--first-last-layers-bf16")


def test_fp8_on_a_machine_without_it_stops_at_start_with_the_reason(tiny_dataset, capsys):
    status = main(["--model", "tiny", "--data-path", tiny_dataset, "--seq-length", "1536", "--train-iters", "1",
                   "--split", "1,0,0", "--bf16", "--fp8-format", "hybrid"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0] == "llava-pretrain: error: --fp8-format needs FP8 tensor cores and Transformer Engine: no GPU"
