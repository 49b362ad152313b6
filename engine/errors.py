"""Every exception the engine raises to a person, in one place.

An error of this module means bad input or a failed environment (a flag, a dataset file, a
checkpoint, an image, a document, a dead worker), never a bug: a command-line program catches it,
prints its message (which names the file, line, field or flag) and exits without a traceback.
Anything else that escapes is a bug and keeps its traceback.

Each class also derives from the built-in error that callers caught before this module existed
(`ValueError` for bad input, `RuntimeError` for a failed run), so an `except ValueError` around a
checkpoint read still catches a `CheckpointError`; `EngineError` catches them all.

A conversion runs one process per rank; an engine error raised in a rank crosses the process
boundary as a `RankFailure` (type name + message) and is raised again, as the same class, in the
process that started the ranks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


class EngineError(Exception):
    """The root of the engine's user-facing errors; the message is for a person."""


class ConfigError(EngineError, ValueError):
    """A configuration that cannot run; the message says which flag/key and why."""


class FormatError(EngineError, ValueError):
    """A dataset file is missing, truncated, of another version, or corrupt."""


class CheckpointError(EngineError, ValueError):
    """A checkpoint that cannot be read, converted or written; the message says where and why
    (the directory, the file, the tensor or the field)."""


class ImageError(EngineError, ValueError):
    """An image that cannot be used; `kind` is a short machine-readable reason."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class DocumentError(EngineError):
    """A document that is skipped; `kind` groups the summary, the message is for a person."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class PreprocessError(EngineError, RuntimeError):
    """Stops the run (bad arguments, unreadable input, or a document error with --on-error fail)."""


class SampleError(EngineError, RuntimeError):
    """Building one sample failed; the message names the dataset, the sample and its documents.
    (One string argument, so the DataLoader can re-raise it in the main process.)"""


class WorkerDiedError(EngineError, RuntimeError):
    """A DataLoader worker process died (SIGKILL, the out-of-memory killer, a crash in native
    code) while building a sample; the message names the sample."""


class LoaderTimeoutError(EngineError, RuntimeError):
    """No batch arrived within the loader timeout (``--loader-timeout``): a worker hangs (a file
    system that stopped answering, a read that never returns). The message names the worker, the
    sample it was building and that sample's documents."""


class DivergedError(EngineError, RuntimeError):
    """--max-skipped-steps consecutive steps had a non-finite loss or gradients; the last good
    state was saved (with --save) before this was raised."""


# Classes built from their message alone, by name: what a RankFailure can be raised as.
_BY_NAME = {cls.__name__: cls for cls in (EngineError, ConfigError, FormatError, CheckpointError, PreprocessError,
                                          SampleError, WorkerDiedError, DivergedError)}


@dataclass(frozen=True)
class RankFailure:
    """An engine error raised in one rank's process, as data that another process can read."""

    rank: int
    kind: str  # the class name, e.g. "CheckpointError"
    message: str

    @classmethod
    def of(cls, rank: int, error: EngineError) -> "RankFailure":
        return cls(rank, type(error).__name__, str(error))

    def error(self) -> EngineError:
        """The error to raise in the parent: the same class, the message prefixed with the rank."""
        if self.kind in _BY_NAME:
            return _BY_NAME[self.kind](f"rank {self.rank}: {self.message}")
        return EngineError(f"rank {self.rank}: {self.kind}: {self.message}")

    def write(self, directory: str | Path) -> None:
        path = Path(directory) / f"rank-{self.rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)  # the parent never reads half a record

    @classmethod
    def read_all(cls, directory: str | Path) -> list["RankFailure"]:
        """The failures written under `directory`, lowest rank first."""
        found = [cls(**json.loads(p.read_text())) for p in Path(directory).glob("rank-*.json")]
        return sorted(found, key=lambda f: f.rank)


class BenchmarkDataError(EngineError, ValueError):
    """A benchmark file that is missing, unreadable, or lacks a field the evaluation needs."""
