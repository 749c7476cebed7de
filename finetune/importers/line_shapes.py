"""The vocabulary of LINE talk-history exports, shared by the mobile and PC parsers.

Everything here comes from FORMATS.md section 1: header lines, date lines in each
language and app, 24-hour / 午前午後 / AM-PM times, placeholders, and the notices
that carry a name column but were said by nobody.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta

from ..records import PLACEHOLDER, SYSTEM, TEXT

# `[LINE] 佐藤とのトーク履歴`, `[LINE] 山の会のトーク履歴` (greedy: group names contain の),
# `[LINE] 旅行のトーク`, `[LINE] Chat history with Yui`, `[LINE] Chat history in 旅行`.
HEADER_TITLE = re.compile(r"^\[LINE\]\s*(?:Chat history (?:with|in) (?P<en>.+)|(?P<ja1>.+)とのトーク履歴|(?P<ja2>.+)のトーク(?:履歴)?)\s*$")
SAVED_ON = re.compile(r"^(?:保存日時[：:]|Saved on:)")

# `2023/05/01(月)`, `2024/01/15(Mon)`, `2024/01/15（月）`, `2021/03/03 Wed`, PC `2019.12.23 月曜日`, `2017.09.03 Sunday`.
YMD_DATE = re.compile(r"^(\d{4})[/.](\d{1,2})[/.](\d{1,2})(?:\s*[(（][^)）\t]{1,12}[)）]|\s+[^\s\t\d]{1,12})?\s*$")
# `Mon, 08/05/2024` (month first) or `Fri, 16/02/2024` (day first).
WEEKDAY_MD_DATE = re.compile(r"^([A-Za-z]{3}), (\d{1,2})/(\d{1,2})/(\d{4})\s*$")
_WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}

# Times: `21:05`, `9:05`, `午前0:15`, `午後0:30`, `AM 10:15`, `10:15 PM`, PC `24:53`.
_TIME = re.compile(r"^(?:(午前|午後|AM|PM)\s?)?(\d{1,2}):(\d{2})(?:\s?(AM|PM))?$")

# A placeholder is exactly one of these tags ...
_EXACT_TAGS = frozenset(
    [
        "[スタンプ]", "[Sticker]", "[写真]", "[画像]", "[Photo]", "[動画]", "[Video]",
        "[ボイスメッセージ]", "[音声メッセージ]", "[Voice message]", "[連絡先]", "[Contact]",
        "[GIF]", "[ギフト]", "[Gift]", "[プレゼント]", "[イベント]", "[Event]", "[投票]", "[Poll]",
    ]
)
# ... or starts with one of these, followed by what it refers to (`[位置情報] 東京都…`, `[アルバム] 旅行`).
_PREFIX_TAGS = frozenset(
    ["[位置情報]", "[Location]", "[アルバム]", "[Albums]", "[Album]", "[ファイル]", "[File]", "[ノート]", "[Note]"]
)
# Notices that come with a name column (the name of whoever it concerns) but were said by nobody.
_NAMED_NOTICE = re.compile(
    r"^(?:ⓘ|.*メッセージの送信を取り消しました。?$|(?:.+ )?unsent a message\.?$|Message unsent\.?$)"
)


def header_line(line: str) -> str | None:
    """For a line before the first date: the chat's title for a `[LINE] …` header, "" for the
    `保存日時：` / `Saved on:` line, None for anything else."""
    m = HEADER_TITLE.match(line)
    if m:
        return m.group("en") or m.group("ja1") or m.group("ja2")
    return "" if SAVED_ON.match(line) else None


def parse_time(text: str) -> int | None:
    """Minutes after midnight, or None. 午前/午後 use hours 0-11 (午後0:30 is 12:30); AM/PM 12 is noon/midnight."""
    m = _TIME.match(text.strip())
    if not m:
        return None
    prefix, hour, minute, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if minute > 59:
        return None
    half = prefix or suffix
    if half:
        if hour > 12:
            return None
        if half in ("午後", "PM"):
            hour = hour % 12 + 12
        else:
            hour = hour % 12
    return hour * 60 + minute


def message_time(day: date, minutes: int) -> datetime | None:
    """The moment `minutes` after midnight of `day`; hours past 23 (`24:53`, as PC exports write)
    run on into the next day. None when that is past year 9999 (a corrupt date line)."""
    try:
        if minutes < 24 * 60:
            return datetime(day.year, day.month, day.day, minutes // 60, minutes % 60)
        return datetime(day.year, day.month, day.day) + timedelta(minutes=minutes)
    except OverflowError:
        return None


def classify(name: str, body: str) -> str:
    """text / placeholder / system for a message line's name and body columns."""
    if not name:
        return SYSTEM
    if not body.strip():
        return PLACEHOLDER  # an attributed line with nothing typed: some media LINE cannot render as text
    first = body[0]
    if first == "[":
        close = body.find("]")
        if close > 0:
            tag = body[: close + 1]
            if (tag in _EXACT_TAGS and close + 1 == len(body.rstrip())) or tag in _PREFIX_TAGS:
                return PLACEHOLDER
        return TEXT
    if first == "☎":
        return PLACEHOLDER  # call lines: 通話時間, 不在着信, Missed call, Canceled call, No answer ...
    if (first == "ⓘ" or body.rstrip().endswith(NOTICE_ENDINGS)) and _NAMED_NOTICE.match(body.rstrip()):
        return SYSTEM
    return TEXT


# What a named line's body must start or end with to be anything but plain text; lets the
# mobile parser skip `classify` for the 9 lines in 10 that are ordinary messages.
SPECIAL_FIRST_CHARS = frozenset("[☎ⓘ")
NOTICE_ENDINGS = ("取り消しました", "取り消しました。", "unsent a message", "unsent a message.", "Message unsent.")


def ymd(line: str) -> date | None:
    m = YMD_DATE.match(line)
    if not m:
        return None
    try:
        return date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def decide_day_month_order(lines: list[str], preference: str) -> str:
    """For `Mon, 08/05/2024` date lines: "mdy" or "dmy".

    A value over 12 settles it; otherwise the weekday names do (Mon, 08/05/2024 is a Monday
    only as August 5th); only if neither tells do we take the user's preference (default mdy,
    LINE's English default).
    """
    if preference in ("mdy", "dmy"):
        return preference
    votes = {"mdy": 0, "dmy": 0}
    for line in lines:
        m = WEEKDAY_MD_DATE.match(line)
        if not m:
            continue
        weekday, a, b, year = _WEEKDAYS.get(m.group(1).lower()), int(m.group(2)), int(m.group(3)), int(m.group(4))
        for order, (month, day) in (("mdy", (a, b)), ("dmy", (b, a))):
            try:
                d = date(year, month, day)
            except ValueError:
                votes[order] -= 1000  # impossible date: strong evidence against this order
                continue
            if weekday is not None and d.weekday() == weekday:
                votes[order] += 1
    if votes["dmy"] > votes["mdy"]:
        return "dmy"
    return "mdy"


def weekday_md_date(line: str, order: str) -> date | None:
    m = WEEKDAY_MD_DATE.match(line)
    if not m:
        return None
    a, b, year = int(m.group(2)), int(m.group(3)), int(m.group(4))
    month, day = (a, b) if order == "mdy" else (b, a)
    try:
        return date(year, month, day)
    except ValueError:
        return None


def date_line(line: str, order: str) -> date | None:
    """The day a date line announces, or None if the line is not a date line."""
    if not line or not ("0" <= line[0] <= "9" or line[0].isalpha()):
        return None
    return ymd(line) or weekday_md_date(line, order)
