"""`python tools/bench_kernels.py` = `llava-bench-kernels`: the program is engine/cli/bench_kernels.py."""

from engine.cli.bench_kernels import main

if __name__ == "__main__":  # not when a spawned worker re-imports this file
    raise SystemExit(main())
