"""`torchrun --nproc-per-node N -m engine.pretrain <flags>`: see engine/training/pretrain.py."""

from engine.training.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
