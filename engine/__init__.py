"""llava-engine: a Megatron-style trainer for LLaVA on interleaved image-text documents."""

__version__ = "0.1.0"
