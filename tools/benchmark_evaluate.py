"""Few-shot evaluation speed: `llava-benchmark-evaluate` as a script (engine/cli/benchmark_evaluate.py)."""

import sys

from engine.cli.benchmark_evaluate import main

if __name__ == "__main__":
    sys.exit(main())
