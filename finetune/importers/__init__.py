"""Chat-export importers: one module per format, one record type out.

`open_export(path)` tells the format from the content (or takes it from --format) and
returns a lazy iterator of `ChatRecord`s, so a 500 MB export never sits in memory
as records. Importer modules are imported only when used: `inspect` must not pay
for anything it does not read.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path

from ..records import ChatRecord
from .detect import detect_format
from .errors import ExportError, SpeakersNeeded, speakers_flag
from .options import ReadOptions

# format name -> module under finetune.importers with `read(path, options) -> Iterator[ChatRecord]`
FORMATS = {
    "line": "line",
    "line-pc": "line_pc",
    "discord-json": "discord_json",
    "discord-csv": "discord_csv",
    "discord-package": "discord_package",
    "plain": "plain",
}

__all__ = ["FORMATS", "ExportError", "ExportErrors", "ReadOptions", "SpeakersNeeded", "check_exports", "detect_format",
           "open_export", "speakers_flag"]


def open_export(path: Path, fmt: str | None = None, options: ReadOptions | None = None) -> tuple[str, Iterator[ChatRecord]]:
    """(format name, records) for one export file or folder."""
    path = Path(path)
    options = options or ReadOptions()
    if not path.exists():
        raise ExportError(path, None, "no such file or folder")
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise ExportError(path, None, f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    module = importlib.import_module(f"{__name__}.{FORMATS[fmt]}")
    return fmt, module.read(path, options)


class ExportErrors(Exception):
    """Several inputs that cannot be read, each an ExportError (`errors`)."""

    def __init__(self, errors: list[ExportError]):
        self.errors = list(errors)
        super().__init__("\n".join(map(str, self.errors)))


def check_exports(paths: list[Path], fmt: str | None = None, options: ReadOptions | None = None) -> None:
    """Open every input without reading its messages; raise ExportErrors naming each one that cannot be read.

    What each importer checks at open time (the file is there, its format is one bunshin reads, a DCE
    header, a LINE PC export's speakers are all named) fails here for all the inputs at once, before
    the first is read: `prepare` reports every bad input in one go and never starts on a dataset it
    cannot finish."""
    errors = []
    for path in paths:
        try:
            open_export(path, fmt, options)
        except ExportError as exc:
            errors.append(exc)
    if errors:
        raise ExportErrors(errors)
