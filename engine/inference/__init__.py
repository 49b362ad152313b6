"""Generation: batched, KV-cached continuation of interleaved prompts (see engine.inference.api)."""

from engine.inference.api import Generator, Request, Result, SamplingParams
from engine.inference.engine import EngineGenerator
from engine.inference.hf import HFGenerator

__all__ = ["Generator", "Request", "Result", "SamplingParams", "EngineGenerator", "HFGenerator"]
