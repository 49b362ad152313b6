"""Command-line tools: preprocessing, inspection, conversion, benchmarks."""
