"""The error every importer raises for input it cannot place."""

from __future__ import annotations

from pathlib import Path


class ExportError(Exception):
    """A problem with an export file, located by file and (where known) line.

    str() gives `FILE:LINE: what is wrong (what was expected)` so the CLI can print it
    as is, the way compilers do, and editors can jump to the spot.
    """

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


class SpeakersNeeded(ExportError):
    """A LINE PC export read without the names of (some of) its speakers: `likely` are the full names found.

    The CLI adds them up over every such file into the one `--speakers` flag to run again with."""

    def __init__(self, path: str | Path, line: int | None, message: str, likely: tuple[str, ...]):
        super().__init__(path, line, message)
        self.likely = likely


def speakers_flag(names: list[str] | tuple[str, ...]) -> str:
    """`--speakers "A B,C"`, quoted for a POSIX shell."""
    joined = ",".join(names)
    if not any(ch in joined for ch in '"$`\\!'):
        return f'--speakers "{joined}"'
    import shlex

    return f"--speakers {shlex.quote(joined)}"
