"""Measurement code shared by the benchmark programs (engine/cli/bench*.py): device timing, the
reading of profiler traces, and the Hugging Face baseline the training benchmark compares with."""
