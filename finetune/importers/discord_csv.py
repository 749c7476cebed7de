"""DiscordChatExporter CSV exports: `AuthorID,Author,Date,Content,Attachments,Reactions`.

Every field is quoted with `""` escapes; content keeps its line breaks, so one record can
span many physical lines, and Windows builds end records with CRLF. Errors name the
physical line where the record starts.

What DCE wrote changed over its versions, and real files of every age are around:
- Author: `name`, or `name#1234` before Discord dropped discriminators. We keep the name.
- Date: ISO 8601 round-trip (`2023-09-23T13:15:48.3790000+03:00`) in current versions;
  before that a user-chosen .NET format, by default `dd-MMM-yy hh:mm tt` (`05-Mar-20 10:31 PM`),
  later the locale's short date and time (`3/5/2020 10:31 PM`, `05/03/2020 22:31`,
  `05.03.2020 22:31`, `2020/03/05 22:31`). Day/month order of numeric dates is taken from
  --date-order, else decided by the first date in the file with a value over 12, else
  month first (DCE's default locale is en-US).
- Very old 2.x versions separated fields with `;` and ended each row with one
  (`AuthorID;Author;Date;Content;Attachments;Reactions;`, before that without AuthorID and
  Reactions).
CSV has no message type, so notices are recognised by DCE's exact English fallback texts.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from ..records import PLACEHOLDER, SYSTEM, TEXT, ChatRecord
from .discord_json import parse_iso_datetime
from .errors import ExportError
from .options import ReadOptions
from .text_file import read_text

_HEADERS = (
    ("authorid", "author", "date", "content", "attachments", "reactions"),
    ("author", "date", "content", "attachments"),  # DCE 2.x, `;`-separated
)
_EXPECTED_HEADER = "AuthorID,Author,Date,Content,Attachments,Reactions"
_PROGRESS_EVERY = 1 << 14  # records

# DCE's English fallback content for notices (PlainTextMessageExtensions.GetFallbackContent and,
# in older versions, Message.Parse). Anchored: a person's message merely containing these is text.
_NOTICE = re.compile(
    r"Joined the server\."
    r"|Pinned a message\."
    r"|Added a recipient\.|Added .+ to the group\."
    r"|Removed a recipient\.|Removed .+ from the group\.|Left the group\."
    r"|Started a call(?: that lasted [\d,]+ minutes?)?\."
    r"|Changed the channel name(?:\.|: .+)"
    r"|Changed the channel icon\."
    r"|Started a thread\."
)
# Legacy `name#1234`; `#0` is how Discord itself writes a migrated account in some places.
_DISCRIMINATOR = re.compile(r"#(?:\d{4}|0)$")

# Localized dates DCE wrote before switching to ISO. Times: `22:31`, `10:31 PM`, `10:31:05 pm`.
_TIME = r",? +(\d{1,2}):(\d{2})(?::(\d{2}))?(?: *([AaPp])\.?[Mm]\.?)?"
_MONTH_NAME_DATE = re.compile(r"(\d{1,2})[- ]([A-Za-z]{3,9})\.?[- ]+(\d{4}|\d{2})" + _TIME)  # 05-Mar-20 10:31 PM
_NUMERIC_DATE = re.compile(r"(\d{1,2})([/.-])(\d{1,2})\2(\d{4}|\d{2})" + _TIME)  # 3/5/2020, 05.03.2020
_YEAR_FIRST_DATE = re.compile(r"(\d{4})([/.])(\d{1,2})\2(\d{1,2})" + _TIME)  # 2020/03/05 (ja-JP)
_MONTHS = {
    m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)
}
_DATE_HELP = (
    "expected ISO 8601 (2023-09-23T13:15:48.3790000+03:00) or an older DiscordChatExporter date "
    "such as 05-Mar-20 10:31 PM, 3/5/2020 10:31 PM or 05.03.2020 22:31"
)


def read(path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    # The header is checked now, so a file that is not a DCE CSV fails at open time.
    source = _CsvSource(path, options.encoding)
    try:
        first_line = source.first_line()
        delimiter = ";" if first_line.count(";") > first_line.count(",") else ","
        rows = source.rows(delimiter)
        _, header = next(rows, (1, []))
        columns = _columns(header, path, first_line.rstrip("\r\n"))
    except UnicodeDecodeError:  # a header record that runs on past bad bytes (a quote left open)
        source.raise_decode_error()
    except BaseException:
        source.close()
        raise
    read_date = _DateReader(path, options.encoding, delimiter, columns[1], options.date_order)
    return _records(source, rows, len(header), columns, read_date, options.on_progress)


class _CsvSource:
    """The export as a stream of text lines: a 500 MB CSV is never held in memory.

    `newline=""` hands the csv module the line ends untouched, so it can tell a CRLF record
    end from a line break inside a quoted field. Decoding errors are rare, so they are
    located only when one happens, by text_file.read_text, which names line and column.
    """

    def __init__(self, path: Path, encoding: str):
        self.path = path
        self.encoding = encoding
        try:
            is_utf8 = codecs.lookup(encoding).name == "utf-8"
        except LookupError:
            raise ExportError(path, None, f"unknown encoding {encoding!r}") from None
        try:
            self._raw = path.open("rb")
        except IsADirectoryError:
            raise ExportError(path, None, "is a folder, expected a DiscordChatExporter .csv file") from None
        except OSError as exc:
            raise ExportError(path, None, f"cannot read: {exc.strerror}") from None
        self._text = io.TextIOWrapper(self._raw, encoding="utf-8-sig" if is_utf8 else encoding, newline="")
        self._first: str | None = None

    def first_line(self) -> str:
        try:
            self._first = self._text.readline().lstrip("\ufeff")
        except UnicodeDecodeError:
            self.raise_decode_error()
        return self._first

    def rows(self, delimiter: str) -> Iterator[tuple[int, list[str]]]:
        return csv_rows(itertools.chain([self._first or ""], self._text), self.path, delimiter)

    def bytes_read(self) -> int:
        return self._raw.tell()  # the text layer reads ahead in chunks: close enough for progress

    def close(self) -> None:
        self._raw.close()

    def raise_decode_error(self) -> NoReturn:
        self.close()
        read_text(self.path, self.encoding)  # raises ExportError with line and column
        raise ExportError(self.path, None, f"cannot be decoded as {self.encoding}")


def csv_rows(lines: Iterable[str], path: Path | str, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """(physical line where the record starts, fields) for each record; blank lines skipped.

    Shared with the data-package importer's legacy messages.csv. `lines` keep their line ends.
    """
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    start = 1
    try:
        for row in reader:
            if row:
                yield start, row
            start = reader.line_num + 1
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            # Discord caps a message at 4,000 characters: a field this long is a quote left open that
            # swallowed the rest of the file, and reading on would hold all of it in memory.
            raise ExportError(path, start, f"a field longer than {csv.field_size_limit():,} characters: a quote not "
                                           "closed, so the rest of the file reads as one field?") from None
        raise ExportError(path, start, f"malformed CSV record: {exc} (a quote not closed or not doubled?)") from None


def _columns(header: list[str], path: Path, first_line: str) -> tuple[int, int, int, int | None]:
    """Indexes of Author, Date, Content, Attachments in this file's header."""
    names = tuple(h.strip().lower() for h in header)
    if names and names[-1] == "":  # old `;`-terminated rows have an empty last field
        names = names[:-1]
    if names not in _HEADERS:
        raise ExportError(
            path, 1, f"expected the DiscordChatExporter CSV header {_EXPECTED_HEADER}, found {first_line[:100]!r}"
        )
    return names.index("author"), names.index("date"), names.index("content"), names.index("attachments")


def _records(source: _CsvSource, rows, width, columns, read_date, progress) -> Iterator[ChatRecord]:
    author_col, date_col, content_col, attachments_col = columns
    path = source.path
    speakers: dict[str, str] = {}  # Author column -> name without a discriminator; few distinct values
    count = 0
    try:
        for line, row in rows:
            if len(row) != width:
                raise ExportError(path, line, f"expected {width} columns like the header, found {len(row)}")
            count += 1
            if progress and count % _PROGRESS_EVERY == 0:
                progress(source.bytes_read())
            time = read_date(row[date_col], line)
            content = row[content_col]
            if "\r" in content:  # a CRLF file keeps CRLF inside quoted fields too
                content = content.replace("\r\n", "\n")
            attachments = row[attachments_col] if attachments_col is not None else ""
            if not attachments and _NOTICE.fullmatch(content):
                yield ChatRecord("", time, content, SYSTEM, "", None, None, line)
                continue
            author = row[author_col]
            speaker = speakers.get(author)
            if speaker is None:
                speaker = speakers[author] = _DISCRIMINATOR.sub("", author)
            if content.strip():
                yield ChatRecord(speaker, time, content, TEXT, "", None, None, line)
            else:  # attachment-, sticker- or embed-only: CSV keeps only the attachment URLs
                # DCE joins a message's attachments with "," (CsvMessageWriter.WriteAttachmentsAsync). With --media
                # each is a local path instead of a URL, which may hold spaces (`general [123].csv_Files/a-1F2E3.jpg`):
                # split on commas only.
                text = attachment_text(attachments.split(","))
                yield ChatRecord(speaker, time, text, PLACEHOLDER, "", None, None, line)
        if progress:
            progress(source.bytes_read())
    except UnicodeDecodeError:
        source.raise_decode_error()
    finally:
        source.close()


def attachment_text(locations: Iterable[str]) -> str:
    """An attachment-only message's placeholder, `[attachment: photo.jpg, clip.mp4]`: each attachment by the file
    name at the end of its URL (query string dropped) or of the local path DCE's --media writes instead (`\\`
    on Windows); "" when there is none. The caller splits its format's column (DCE: ",", package: spaces)."""
    names = [_PATH_SEPARATOR.split(location)[-1].split("?", 1)[0] for location in locations if location]
    return f"[attachment: {', '.join(names)}]" if names else ""


_PATH_SEPARATOR = re.compile(r"[/\\]")


class _DateReader:
    """Parses the Date column; decides day/month order for numeric dates once per file."""

    def __init__(self, path: Path, encoding: str, delimiter: str, date_col: int, date_order: str):
        self._path = path
        self._encoding = encoding
        self._delimiter = delimiter
        self._date_col = date_col
        self._order = date_order if date_order in ("mdy", "dmy") else None
        self._order_reason = "--date-order"
        self._aware: bool | None = None  # all dates of a file must agree, or times cannot be compared

    def __call__(self, text: str, line: int) -> datetime:
        try:  # the hot path: current DCE writes ISO, which Python 3.11's C parser reads as is
            time = datetime.fromisoformat(text)
        except ValueError:
            time = self._parse(text.strip(), line)
        aware = time.tzinfo is not None
        if aware is not self._aware:
            if self._aware is not None:
                raise ExportError(
                    self._path, line, f"date {text!r} mixes dates with and without a UTC offset in one file"
                )
            self._aware = aware
        return time

    def _parse(self, text: str, line: int) -> datetime:
        if text[4:5] == "-" and text[:4].isdigit():  # ISO that Python 3.10 needs normalised
            try:
                return parse_iso_datetime(text)
            except ValueError:
                pass
        else:
            try:
                time = self._parse_localized(text)
            except ValueError:  # the shape matched but the values make no date (month 13, Feb 30, 13 PM)
                raise ExportError(
                    self._path, line, f"date {text!r} is not a valid date{self._order_note(text)}"
                ) from None
            if time is not None:
                return time
        raise ExportError(self._path, line, f"unrecognised date {text!r}; {_DATE_HELP}")

    def _order_note(self, text: str) -> str:
        m = _NUMERIC_DATE.fullmatch(text)
        if not m or m.group(2) == "." or self._order is None:
            return ""
        return f" (read {'month/day' if self._order == 'mdy' else 'day/month'} as decided by {self._order_reason})"

    def _parse_localized(self, text: str) -> datetime | None:
        m = _MONTH_NAME_DATE.fullmatch(text)
        if m:
            month = _MONTHS.get(m.group(2)[:3].lower())
            if month is None:
                return None
            return _make(m.group(3), month, m.group(1), m.group(4, 5, 6, 7))
        m = _YEAR_FIRST_DATE.fullmatch(text)
        if m:
            return _make(m.group(1), m.group(3), m.group(4), m.group(5, 6, 7, 8))
        m = _NUMERIC_DATE.fullmatch(text)
        if m:
            first, separator, second = m.group(1), m.group(2), m.group(3)
            if separator == ".":  # dotted dates are day first in every locale that writes them
                return _make(m.group(4), second, first, m.group(5, 6, 7, 8))
            if self._order is None:
                self._decide_order()
            if self._order == "mdy":
                return _make(m.group(4), first, second, m.group(5, 6, 7, 8))
            return _make(m.group(4), second, first, m.group(5, 6, 7, 8))
        return None

    def _decide_order(self) -> None:
        """Month or day first: the first numeric date with a value over 12 tells (a second CSV pass, stopped early)."""
        source = _CsvSource(self._path, self._encoding)
        try:
            self._order, self._order_reason = self._scan_for_order(source)
        except UnicodeDecodeError:
            source.raise_decode_error()
        finally:
            source.close()

    def _scan_for_order(self, source: _CsvSource) -> tuple[str, str]:
        source.first_line()
        rows = source.rows(self._delimiter)
        next(rows, None)  # header
        for line, row in rows:
            if len(row) <= self._date_col:
                continue
            m = _NUMERIC_DATE.fullmatch(row[self._date_col].strip())
            if not m or m.group(2) == ".":
                continue
            first, second = int(m.group(1)), int(m.group(3))
            if first > 12 >= second:
                return "dmy", f"the date on line {line}"
            if second > 12 >= first:
                return "mdy", f"the date on line {line}"
        return "mdy", "default: no date in the file has a day over 12; pass --date-order dmy if wrong"


def _make(year: str, month: str | int, day: str, clock: tuple[str, str, str | None, str | None]) -> datetime:
    hour, minute, second, meridiem = int(clock[0]), int(clock[1]), int(clock[2] or 0), clock[3]
    if meridiem:
        if not 1 <= hour <= 12:
            raise ValueError("hour out of range for AM/PM")
        hour = hour % 12 + (12 if meridiem in "Pp" else 0)
    y = int(year)
    return datetime(y + 2000 if y < 100 else y, int(month), int(day), hour, minute, second)
