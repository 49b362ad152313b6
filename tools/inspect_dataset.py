"""`python tools/inspect_dataset.py` = `llava-inspect`: the program is engine/cli/inspect.py."""

from engine.cli.inspect import main

if __name__ == "__main__":  # not when a spawned worker re-imports this file
    raise SystemExit(main())
