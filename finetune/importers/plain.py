"""Hand-made `Name:text` logs: one message per line, blank lines between sessions.

The line is split on the first ASCII `:`; the body may hold more `:` and full-width `：`.
Spaces around the name and the body are dropped (`Yui: hi` and `Yui:hi` are the same).
A line whose body is empty (`Yui:`) still marks a turn by that speaker, but nothing was
typed, so it is a placeholder rather than text to train on.

The format has no timestamps, and later stages split conversations on time gaps. Each
message therefore gets a synthetic, strictly increasing naive time: 2000-01-01 00:00, one
minute more per message, and one day more per session break, so every blank line is a
gap longer than any sensible session threshold and nothing else is.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

from ..records import PLACEHOLDER, TEXT, ChatRecord
from .errors import ExportError
from .options import ReadOptions
from .text_file import read_text

FIRST_TIME = datetime(2000, 1, 1)
MESSAGE_STEP = timedelta(minutes=1)
SESSION_STEP = timedelta(days=1)
MAX_NAME_LENGTH = 40  # longer, and the "name" is more likely a sentence that happens to hold a colon
_PROGRESS_EVERY = 1 << 16  # lines


def read(path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    text = read_text(path, options.encoding)
    return _parse(text, path, options)


def _parse(text: str, path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    progress = options.on_progress
    lines = text.replace("\r\n", "\n").split("\n")
    bytes_per_line = len(text.encode("utf-8", "surrogatepass")) / max(len(lines), 1) if progress else 0
    time: datetime | None = None
    session_break = False
    for number, line in enumerate(lines, 1):
        if progress and number % _PROGRESS_EVERY == 0:
            progress(int(number * bytes_per_line))
        if not line.strip():
            session_break = True
            continue
        colon = line.find(":")
        if colon < 0:
            hint = " (it has a full-width '：'; this format splits on the ASCII ':')" if "：" in line else ""
            raise ExportError(path, number, f"expected `Name:text`, found {line[:60]!r}{hint}")
        name = line[:colon].strip()
        if not name:
            raise ExportError(path, number, f"expected `Name:text`, found no name before the ':' in {line[:60]!r}")
        if len(name) > MAX_NAME_LENGTH or "\t" in name:
            raise ExportError(
                path,
                number,
                f"expected `Name:text`, but {name[:60]!r} before the first ':' does not look like a name "
                f"(a tab, or over {MAX_NAME_LENGTH} characters)",
            )
        if time is None:  # blank lines before the first message break no session
            time = FIRST_TIME
        else:
            time += SESSION_STEP + MESSAGE_STEP if session_break else MESSAGE_STEP
        session_break = False
        body = line[colon + 1 :].strip()
        yield ChatRecord(name, time, body, TEXT if body else PLACEHOLDER, "", None, None, number)
    if progress:
        progress(int(len(lines) * bytes_per_line))
