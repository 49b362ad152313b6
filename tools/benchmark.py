"""`python tools/benchmark.py` = `llava-benchmark`: the program is engine/cli/benchmark.py."""

from engine.cli.benchmark import main

if __name__ == "__main__":  # not when a spawned worker re-imports this file
    raise SystemExit(main())
