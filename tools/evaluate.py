"""Few-shot evaluation on the Multimodal Textbook paper's benchmarks: see engine/cli/evaluate.py
(installed as `llava-evaluate`) and docs/evaluation.md."""

import sys

from engine.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
