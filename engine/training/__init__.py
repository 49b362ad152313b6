"""Training: flags (arguments), the loop (loop), megatron-core DDP/optimizer/schedule (optim),
distributed checkpoints (checkpoint), throughput and logging (metrics); `pretrain.main` ties them
together and is what `torchrun -m engine.pretrain` and `llava-pretrain` run."""
