"""See what a model says: `llava-generate` as a script (engine/cli/generate.py has the options)."""

import sys

from engine.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
