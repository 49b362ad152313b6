"""`python tools/bench_attention.py` = `llava-bench-attention`: the program is engine/cli/bench_attention.py."""

from engine.cli.bench_attention import main

if __name__ == "__main__":  # not when a spawned worker re-imports this file
    raise SystemExit(main())
