"""`python tools/make_textbook_corpus.py` = `llava-textbook-corpus`: the program is engine/cli/textbook_corpus.py."""

from engine.cli.textbook_corpus import main

if __name__ == "__main__":  # not when a spawned worker re-imports this file
    raise SystemExit(main())
