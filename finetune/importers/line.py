"""LINE talk history from the mobile apps (トーク履歴を送信 / 保存): `HH:MM<TAB>Name<TAB>Text`.

The one real trap is quoting: a multi-line message is wrapped in double quotes with `""`
for a literal quote, and the lines inside can look exactly like date or message lines. So
the quote state is decided before anything else is matched. LINE quotes only messages that
span lines, so a single line that starts with `"` is literal text.

Speed matters (`inspect` on 1M lines must take under 3 s), so the loop below does cheap
string tests first and reaches for regexes only on lines that need them.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from datetime import date, datetime
from itertools import chain
from pathlib import Path

from ..records import PLACEHOLDER, SYSTEM, TEXT, ChatRecord
from .errors import ExportError
from .line_shapes import NOTICE_ENDINGS as _NOTICE_ENDINGS
from .line_shapes import SPECIAL_FIRST_CHARS as _SPECIAL_FIRST
from .line_shapes import (
    chat_title_before_first_day,
    classify,
    date_line,
    decide_day_month_order,
    is_titled_item,
    message_time,
    parse_time,
    strip_isolates,
)
from .options import ReadOptions
from .text_file import read_text

_new_record = tuple.__new__  # ChatRecord(...) through NamedTuple.__new__ costs 3x more in the hot loop
_BLOCK_BYTES = 4 << 20


def _lone_quote(s: str, start: int = 0) -> int:
    """Index of the first `"` in s[start:] that is not half of a `""` escape, or -1."""
    j = s.find('"', start)
    n = len(s)
    while j != -1:
        if j + 1 < n and s[j + 1] == '"':
            j = s.find('"', j + 2)
            continue
        return j
    return -1


def read(path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    return _parse(path, options)


def _physical_lines(path: Path, options: ReadOptions) -> Iterator[str]:
    """The file's lines without their ending, streamed in 4 MiB blocks: a 1M-line export never
    sits in memory whole, and splitting a decoded block is much faster than a text file's readline.

    Lines end at LF only: in CRLF files the breaks inside quotes can be bare LF, and a bare CR
    is text. A decoding error is re-located to its exact line.
    """
    encoding = "utf-8-sig" if options.encoding.lower().replace("_", "-") in ("utf-8", "utf8") else options.encoding
    progress = options.on_progress
    try:
        decoder = codecs.getincrementaldecoder(encoding)()
        with open(path, "rb") as f:
            tail = ""
            done = 0
            while True:
                block = f.read(_BLOCK_BYTES)
                text = tail + decoder.decode(block, final=not block)
                if "\r" in text:
                    # A CR that ends this block may pair with an LF in the next: it waits in `tail`.
                    text = text.replace("\r\n", "\n")
                lines = text.split("\n")
                tail = lines.pop()
                yield from lines
                done += len(block)
                if progress:
                    progress(done)
                if not block:
                    break
            if tail:
                yield tail.removesuffix("\r")
    except FileNotFoundError:
        raise ExportError(path, None, "no such file") from None
    except IsADirectoryError:
        raise ExportError(path, None, "is a folder, expected a file") from None
    except UnicodeDecodeError:
        read_text(path, options.encoding)  # raises ExportError naming the line and bytes
        raise
    except LookupError:
        raise ExportError(path, None, f"unknown encoding {options.encoding!r}") from None


def _parse(path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    source: Iterator[str] = _physical_lines(path, options)
    order: str | None = options.date_order if options.date_order != "auto" else None

    chat = ""
    day: date | None = None
    time_cache: dict[str, int | None] = {}
    stamp_cache: dict[int, datetime] = {}
    names: dict[str, str] = {}  # name column as written -> without direction isolates (one dict lookup a line)
    pending: ChatRecord | None = None  # held until we know no continuation line follows
    i = 0  # 1-based number of the line in hand
    read_again: list[str] | None = []
    while read_again is not None:
        if read_again:
            # Lines read ahead for a quote that turned out literal go through the loop again.
            source = chain(read_again, source)
        read_again = None
        for line in source:
            i += 1
            if not line:
                continue
            parts = line.split("\t", 2)  # only the first two tabs separate columns (one C call: fastest)
            if len(parts) > 1:
                time_text = parts[0]
                minutes = time_cache.get(time_text, -1)
                if minutes == -1:
                    minutes = time_cache[time_text] = parse_time(time_text)
                if minutes is not None:
                    if day is None:
                        raise ExportError(path, i, f"message before any date line (expected a date such as 2024/01/15(月) first): {line[:60]!r}")
                    stamp = stamp_cache.get(minutes)
                    if stamp is None:
                        stamp = message_time(day, minutes)
                        if stamp is None:
                            raise ExportError(path, i, f"time {time_text!r} on {day} is past the year 9999")
                        stamp_cache[minutes] = stamp
                    if pending is not None:
                        yield pending
                        pending = None
                    if len(parts) == 2:  # `21:00<TAB>XがYを招待しました。`: two columns, a notice
                        yield _new_record(ChatRecord, ("", stamp, parts[1], SYSTEM, chat, None, None, i))
                        continue
                    name = names.get(parts[1])
                    if name is None:
                        name = names[parts[1]] = strip_isolates(parts[1])
                    body = parts[2]
                    if body and body[0] == '"' and _lone_quote(body, 1) == -1:
                        quoted, inner = _read_quoted(source, body, path, i)
                        if quoted is not None:
                            # A shared note or poll whose title runs over lines is quoted like typed text.
                            kind = PLACEHOLDER if is_titled_item(quoted) else TEXT
                            yield _new_record(ChatRecord, (name, stamp, quoted, kind, chat, None, None, i))
                            i += len(inner)
                            continue
                        read_again = inner  # not a LINE quote: the opening line is literal text
                    # Inlined fast path of `classify`: 9 lines in 10 are ordinary text.
                    if name and body and body[0] not in _SPECIAL_FIRST and not body.endswith(_NOTICE_ENDINGS) and not body.isspace():
                        kind = TEXT
                    else:
                        kind = classify(name, body)
                        if kind == SYSTEM:
                            name = ""  # a notice such as `ⓘ …` or an unsend carries a name column, but nobody said it
                    pending = _new_record(ChatRecord, (name, stamp, body, kind, chat, None, None, i))
                    if read_again is not None:
                        break
                    continue
            # No time column: a date line, the header, or (old unquoted exports) a continuation line.
            if order is None and line[:3].isalpha() and line[3:5] == ", ":
                order = _day_month_order(path, options)
            new_day = date_line(line, order or "mdy")
            if new_day is not None:
                if pending is not None:
                    yield pending
                    pending = None
                day = new_day
                stamp_cache.clear()
                continue
            if day is None:
                chat = chat_title_before_first_day(
                    line, chat, path, i, "the `[LINE] ...` header or a date line such as 2024/01/15(月)")
                continue
            if pending is not None and pending.kind == TEXT:
                pending = pending._replace(text=pending.text + "\n" + line)
                continue
            raise ExportError(path, i, f"expected a date line or `HH:MM<TAB>name<TAB>text`, found {line[:60]!r}")
    if pending is not None:
        yield pending


def _day_month_order(path: Path, options: ReadOptions) -> str:
    """Month or day first in `Mon, 08/05/2024` lines, judged over every such line in the file."""
    candidates = [ln for ln in _physical_lines(path, ReadOptions(encoding=options.encoding)) if ln[:3].isalpha() and ln[3:5] == ", "]
    return decide_day_month_order(candidates, "auto")


def _read_quoted(source: Iterator[str], first: str, path: Path, opened_at: int) -> tuple[str | None, list[str]]:
    """The body of a quoted multi-line message whose opening line's body is `first`.

    Returns (unescaped body, the lines consumed after the opening one). The body is None when
    the block turns out not to be a LINE quote: inside a real one every `"` is doubled, so a
    lone quote with more text after it means the opening `"` was literal; the caller then
    puts the consumed lines back.
    """
    inner: list[str] = []
    for line in source:
        inner.append(line)
        close = _lone_quote(line)
        if close == -1:
            continue
        if line[close + 1 :].strip():
            return None, inner
        parts = [first[1:], *inner[:-1], line[:close]]
        return "\n".join(parts).replace('""', '"'), inner
    raise ExportError(
        path,
        opened_at,
        'a quoted multi-line message opens here and never closes (expected a line ending in a lone ")',
    )
