"""Generation speed: `llava-benchmark-generate` as a script (engine/cli/benchmark_generate.py)."""

import sys

from engine.cli.benchmark_generate import main

if __name__ == "__main__":
    sys.exit(main())
