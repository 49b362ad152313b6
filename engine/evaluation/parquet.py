"""Rows of the Hugging Face parquet exports, images included as bytes.

The hub's `datasets` library writes an image column as a struct {bytes, path}; this module turns
each row into a plain dict whose image fields hold the encoded bytes, so the math readers treat
a parquet export exactly like the JSON release plus an image folder. pyarrow is needed only here
(and only when a parquet export is read): `pip install pyarrow`.
"""

from __future__ import annotations

from pathlib import Path

from engine.evaluation.items import BenchmarkDataError


def read_parquet_rows(paths: list[Path]) -> list[dict]:
    """All rows of the files, in order; an image struct becomes its `bytes` (None if empty)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise BenchmarkDataError(f"{paths[0]}: reading a parquet export needs pyarrow "
                                 "(pip install pyarrow), which is not installed") from e
    rows: list[dict] = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several unrelated types for a bad file
            raise BenchmarkDataError(f"{path}: not a readable parquet file ({e})") from e
        for row in table.to_pylist():
            rows.append({k: _unwrap_image(v) for k, v in row.items()})
    return rows


def _unwrap_image(value):
    if isinstance(value, dict) and set(value) >= {"bytes"} and set(value) <= {"bytes", "path"}:
        return value["bytes"] or None
    return value


def parquet_files(root: Path, split: str) -> list[Path]:
    """The export's files for `split`: data/{split}-*.parquet (the hub's sharded naming) or
    {split}.parquet."""
    files = sorted((root / "data").glob(f"{split}-*.parquet")) if (root / "data").is_dir() else []
    if not files and (root / f"{split}.parquet").is_file():
        files = [root / f"{split}.parquet"]
    return files
