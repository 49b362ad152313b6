"""The command-line programs. Each module has `main(argv=None) -> int`; pyproject.toml installs
them as `llava-<name>` and `tools/<name>.py` runs the same `main` as a plain script."""
