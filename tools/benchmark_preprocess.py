"""`python tools/benchmark_preprocess.py` = `llava-benchmark-preprocess`: the program is engine/cli/benchmark_preprocess.py."""

from engine.cli.benchmark_preprocess import main

if __name__ == "__main__":  # not when a spawned worker re-imports this file
    raise SystemExit(main())
