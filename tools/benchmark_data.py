"""`python tools/benchmark_data.py` = `llava-benchmark-data`: the program is engine/cli/benchmark_data.py."""

from engine.cli.benchmark_data import main

if __name__ == "__main__":  # not when a spawned worker re-imports this file
    raise SystemExit(main())
