"""`python tools/preprocess_interleaved.py` = `llava-preprocess`: the program is engine/cli/preprocess.py."""

from engine.cli.preprocess import main

if __name__ == "__main__":  # not when a spawned worker re-imports this file
    raise SystemExit(main())
