"""Tell an export's format from its content, not its file name.

Users rename files ("line.txt", "export(1).json"), so the name is never trusted. We read
the first 64 KiB and look for the shapes each exporter writes, most specific first.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ExportError

HEAD_BYTES = 64 * 1024

# LINE mobile message line: time (24h, 午前/午後, 上午/下午, AM/PM, Thai หลังเที่ยง) then a TAB.
_LINE_MOBILE_MESSAGE = re.compile(
    r"^(?:(?:午前|午後|上午|下午|[AaPp][Mm]) ?)?\d{1,2}:\d{2}(?: ?(?:[AaPp][Mm]|ก่อนเที่ยง|หลังเที่ยง))?\t", re.M
)
# LINE PC "save chat": `15:16 Name text` separated by spaces, and dotted date lines.
_LINE_PC_MESSAGE = re.compile(r"^\d{1,2}:\d{2} \S", re.M)
_LINE_PC_DATE = re.compile(r"^\d{4}[./]\d{1,2}[./]\d{1,2}[ (（]", re.M)
_LINE_HEADER = re.compile(r"^\[LINE\] ")
# DiscordChatExporter CSV; its 2.x versions separated fields with `;` (and had no AuthorID at first).
_DCE_CSV_HEADER = re.compile(r'^(?:"?AuthorID"?[,;])?"?Author"?[,;]"?Date"?[,;]"?Content"?', re.I)
_PACKAGE_CSV_HEADER = re.compile(r'^"?ID"?,"?Timestamp"?,"?Contents"?', re.I)
_PLAIN_LINE = re.compile(r"^[^:\t\n]{1,40}:", re.M)
# Exports we recognise but do not read, so that the error can say what to export instead. HTML: from the
# doctype or the root element; DiscordChatExporter's pages carry its `chatlog` CSS classes (every version
# since 2.x, in the <style> and the body both, beside `info__` or later `preamble__`) or, in the first
# versions, the title "Discord Chat Log" and `msg-user`. Its plain text starts with a rule of `=` and
# `Guild: NAME` (PlainTextMessageWriter's preamble, the same since 2.x).
_HTML_START = re.compile(r"^(?:<!doctype\s+html|<html[\s>]|<head[\s>]|<meta[\s>])", re.I)
_DCE_HTML_MARK = re.compile(r"\bchatlog(?:__|\b)|\bpreamble__|<title>Discord Chat Log</title>|\bmsg-user\b", re.I)
_DCE_TEXT_PREAMBLE = re.compile(r"^={20,}[ \t]*\r?\n[ \t]*Guild:", re.M)
_EXPORT_AGAIN = "export it again as JSON (`-f Json`: best, keeps replies) or CSV (`-f Csv`), which bunshin reads"

FORMAT_HELP = (
    "expected LINE talk history (.txt), DiscordChatExporter JSON or CSV, a Discord data package "
    "(folder or .zip), or `Name:text` lines; pass --format to say which"
)


def detect_format(path: Path) -> str:
    if path.is_dir():
        if _is_package_folder(path):
            return "discord-package"
        raise ExportError(path, None, "is a folder but not a Discord data package (no Messages/ folder inside); " + FORMAT_HELP)
    try:
        with path.open("rb") as f:
            raw = f.read(HEAD_BYTES)
    except OSError as exc:
        raise ExportError(path, None, f"cannot read: {exc.strerror}") from None
    if raw.startswith(b"PK\x03\x04"):
        return "discord-package"
    head = raw.decode("utf-8", errors="replace").lstrip("\ufeff")
    stripped = head.lstrip()
    if not stripped:
        raise ExportError(path, None, "is empty")
    first_line = stripped.split("\n", 1)[0].strip()
    _refuse_unread_kinds(path, stripped)
    if stripped.startswith("{"):
        return "discord-json"
    if stripped.startswith("["):
        if not first_line.startswith("[LINE]"):
            # A lone messages.json from a data package is a JSON array of {"ID", "Timestamp", "Contents"}.
            return "discord-package"
    if _DCE_CSV_HEADER.match(first_line):
        return "discord-csv"
    if _PACKAGE_CSV_HEADER.match(first_line):
        return "discord-package"
    mobile = len(_LINE_MOBILE_MESSAGE.findall(head))
    pc = len(_LINE_PC_MESSAGE.findall(head))
    if mobile and mobile >= pc:
        return "line"
    if pc and (_LINE_PC_DATE.search(head) or _LINE_HEADER.match(stripped)):
        return "line-pc"
    if _LINE_HEADER.match(stripped):
        return "line"  # a header with no messages yet: the LINE importer says what is missing
    lines = [ln for ln in head.splitlines() if ln.strip()]
    if lines and sum(1 for ln in lines if _PLAIN_LINE.match(ln)) >= 0.8 * len(lines):
        return "plain"
    raise ExportError(path, None, "cannot tell the export format from its content; " + FORMAT_HELP)


def _refuse_unread_kinds(path: Path, stripped: str) -> None:
    """An export in a shape bunshin does not read, named with what to do, rather than "cannot tell the format".
    Checked before the formats we read: a page whose lines mostly looked like `Name:` must not pass for `plain`."""
    if _HTML_START.match(stripped):
        if _DCE_HTML_MARK.search(stripped):
            raise ExportError(path, None, f"is a DiscordChatExporter HTML export, which bunshin does not read: {_EXPORT_AGAIN}")
        raise ExportError(path, None, "is an HTML page, not a chat export bunshin reads; " + FORMAT_HELP)
    if _DCE_TEXT_PREAMBLE.match(stripped):
        raise ExportError(path, None, f"is a DiscordChatExporter plain-text export, which bunshin does not read: {_EXPORT_AGAIN}")


def _is_package_folder(path: Path) -> bool:
    names = {p.name.lower() for p in path.iterdir()}
    if "messages" in names:
        return True
    # The Messages folder itself (index.json and c<id> channel folders; the oldest packages have
    # no `c`), or one channel's folder.
    return (
        "index.json" in names
        or "messages.json" in names
        or "messages.csv" in names
        or any(n.isdigit() or (n.startswith("c") and n[1:].isdigit()) for n in names)
    )
