"""llava-engine: a Megatron-style trainer for LLaVA on interleaved image-text documents."""

from engine.quiet import silence_expected

__version__ = "0.1.0"

silence_expected()
