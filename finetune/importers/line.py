"""LINE talk history from the mobile apps (トーク履歴を送信 / 保存): `HH:MM<TAB>Name<TAB>Text`.

The one real trap is quoting: a multi-line message is wrapped in double quotes with `""`
for a literal quote, and the lines inside can look exactly like date or message lines. So
the quote state is decided before anything else is matched. LINE quotes only messages that
span lines, so a single line that starts with `"` is literal text.

Speed matters (`inspect` on 1M lines must take under 3 s), so the loop below does cheap
string tests first and reaches for regexes only on lines that need them.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

from ..records import SYSTEM, TEXT, ChatRecord
from .errors import ExportError
from .line_shapes import SAVED_ON, classify, date_line, decide_day_month_order, header_title, parse_time
from .options import ReadOptions
from .text_file import read_text

_new_record = tuple.__new__  # ChatRecord(...) through NamedTuple.__new__ costs 3x more in the hot loop
_PROGRESS_EVERY = 1 << 16  # lines


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
    """The file's lines without their ending, streamed: a 1M-line export never sits in memory whole.

    Lines are split on LF only: in CRLF files the breaks inside quotes can be bare LF, and a
    bare CR is kept as text. A decoding error is re-located to its exact line.
    """
    encoding = "utf-8-sig" if options.encoding.lower().replace("_", "-") in ("utf-8", "utf8") else options.encoding
    progress = options.on_progress
    try:
        with open(path, encoding=encoding, newline="") as f:
            count = 0
            for line in f:
                count += 1
                if progress and count % _PROGRESS_EVERY == 0:
                    progress(f.buffer.tell())
                if line.endswith("\n"):
                    line = line[:-2] if line.endswith("\r\n") else line[:-1]
                elif line.endswith("\r"):  # newline="" splits at a CR that is not followed by LF
                    yield from _split_bare_cr(f, line)
                    continue
                yield line
            if progress:
                progress(f.buffer.tell())
    except FileNotFoundError:
        raise ExportError(path, None, "no such file") from None
    except UnicodeDecodeError:
        read_text(path, options.encoding)  # raises ExportError naming the line and bytes
        raise
    except LookupError:
        raise ExportError(path, None, f"unknown encoding {options.encoding!r}") from None


def _split_bare_cr(f, line: str) -> Iterator[str]:
    # With newline="" Python ends a line at a lone CR too; LINE never breaks lines with a lone CR,
    # so glue the pieces back until a real LF comes.
    buf = line
    for more in f:
        buf += more
        if buf.endswith("\n"):
            break
    if buf.endswith("\r\n"):
        buf = buf[:-2]
    elif buf.endswith("\n"):
        buf = buf[:-1]
    yield buf


def _parse(path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    source = _physical_lines(path, options)
    pushed_back: list[str] = []  # lines read ahead while checking a quote that turned out literal
    order: str | None = options.date_order if options.date_order != "auto" else None

    chat = ""
    day: date | None = None
    time_cache: dict[str, int | None] = {}
    stamp_cache: dict[int, datetime] = {}
    pending: list | None = None  # [name, time, body, kind, lineno]: held until we know no continuation follows
    i = 0  # 1-based number of the line in hand
    while True:
        if pushed_back:
            line = pushed_back.pop()
        else:
            line = next(source, None)
            if line is None:
                break
        i += 1
        if not line:
            continue
        tab = line.find("\t")
        if tab > 0:
            time_text = line[:tab]
            minutes = time_cache.get(time_text, -1)
            if minutes == -1:
                minutes = time_cache[time_text] = parse_time(time_text)
            if minutes is not None:
                if day is None:
                    raise ExportError(path, i, f"message before any date line (expected a date such as 2024/01/15(月) first): {line[:60]!r}")
                stamp = stamp_cache.get(minutes)
                if stamp is None:
                    stamp = stamp_cache[minutes] = datetime(day.year, day.month, day.day, minutes // 60, minutes % 60)
                if pending is not None:
                    yield _new_record(ChatRecord, (pending[0], pending[1], pending[2], pending[3], chat, None, None, pending[4]))
                    pending = None
                rest = line[tab + 1 :]
                tab2 = rest.find("\t")
                if tab2 < 0:  # `21:00<TAB>XがYを招待しました。`: two columns, a notice
                    yield _new_record(ChatRecord, ("", stamp, rest, SYSTEM, chat, None, None, i))
                    continue
                name = rest[:tab2]
                body = rest[tab2 + 1 :]
                if body and body[0] == '"' and _lone_quote(body, 1) == -1:
                    quoted, inner = _read_quoted(source, body, path, i)
                    if quoted is not None:
                        yield _new_record(ChatRecord, (name, stamp, quoted, TEXT, chat, None, None, i))
                        i += len(inner)
                        continue
                    pushed_back.extend(reversed(inner))  # not a LINE quote: the opening line is literal text
                kind = classify(name, body)
                # A notice such as `ⓘ …` or an unsend carries a name column, but nobody said it.
                pending = [name if kind != SYSTEM else "", stamp, body, kind, i]
                continue
        # No time column: a date line, the header, or (old unquoted exports) a continuation line.
        if order is None and line[:3].isalpha() and line[3:5] == ", ":
            order = _day_month_order(path, options)
        new_day = date_line(line, order or "mdy")
        if new_day is not None:
            if pending is not None:
                yield _new_record(ChatRecord, (pending[0], pending[1], pending[2], pending[3], chat, None, None, pending[4]))
                pending = None
            day = new_day
            stamp_cache.clear()
            continue
        if day is None:
            title = header_title(line)
            if title is not None:
                chat = title
                continue
            if SAVED_ON.match(line):
                continue
            raise ExportError(
                path, i, f"expected the `[LINE] ...` header or a date line such as 2024/01/15(月), found {line[:60]!r}"
            )
        if pending is not None and pending[3] == TEXT:
            pending[2] += "\n" + line
            continue
        raise ExportError(path, i, f"expected a date line or `HH:MM<TAB>name<TAB>text`, found {line[:60]!r}")
    if pending is not None:
        yield _new_record(ChatRecord, (pending[0], pending[1], pending[2], pending[3], chat, None, None, pending[4]))


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
