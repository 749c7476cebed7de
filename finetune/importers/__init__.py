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
from .errors import ExportError
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

__all__ = ["FORMATS", "ExportError", "ReadOptions", "detect_format", "open_export"]


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
