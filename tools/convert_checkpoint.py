"""`python tools/convert_checkpoint.py` = `llava-convert`: the program is engine/cli/convert.py."""

from engine.cli.convert import main

if __name__ == "__main__":  # not when a spawned worker re-imports this file
    raise SystemExit(main())
