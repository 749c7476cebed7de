"""The vocabulary of LINE talk-history exports, shared by the mobile and PC parsers.

Header lines, date lines in each language and app (Buddhist-era years from Thai phones become Gregorian),
24-hour / 午前午後 / 上午下午 / AM-PM times,
placeholders (bracketed tags, and the bare words the PC app writes instead), and the
notices that carry a name column but were said by nobody. Where a word list comes from
other people's real exports, the comment above it names the public parser it was read from.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta

from ..records import PLACEHOLDER, SYSTEM, TEXT
from .errors import ExportError

# `[LINE] 佐藤とのトーク履歴`, `[LINE] 山の会のトーク履歴` (greedy: group names contain の),
# `[LINE] 旅行のトーク`, `[LINE] Chat history with Yui`, `[LINE] Chat history in 旅行`.
# Traditional / Simplified Chinese `[LINE] 與小明的聊天記錄` (1:1) and `[LINE] 大學同學的聊天記錄` (group), as
# hellodigua/ChatLab's line-native-txt.ts and several zh-TW parsers read them (記錄 and 紀錄 are both written
# in Taiwan); Thai `[LINE] ประวัติการแชทในกลุ่ม "ชื่อกลุ่ม"` as a Thai importer's tests quote a real group export.
# The Thai 1:1 wording is not in any export we found, so any other `[LINE] …` line is a header too, its
# whole rest the title: a UI language we do not know must not stop the import at line 1.
HEADER_TITLE = re.compile(
    r"^\[LINE\]\s*(?:Chat history (?:with|in) (?P<en>.+)|(?P<ja1>.+)とのトーク履歴|(?P<ja2>.+)のトーク(?:履歴)?"
    r"|[與与](?P<zh1>.+)的聊天[記紀记][錄录]|(?P<zh2>.+)的聊天[記紀记][錄录]"
    r"|ประวัติการแชท(?:กับ|ในกลุ่ม)\s*[\"“]?(?P<th>.+?)[\"”]?|(?P<other>\S.*?))\s*$"
)
# `保存日時：2024/03/10 22:41`, `Saved on: 2024/08/15 23:02`, `儲存日期：2024/01/06 12:34` (zh-TW; ChatLab's
# zh-CN `保存日期:`), Thai `บันทึกเมื่อ 04/09/2569 07:48`. Any other line before the first date that ends in a
# date and a time is the same line in a language we have no sample of.
SAVED_ON = re.compile(r"^(?:保存日時|儲存日期|保存日期|Saved on|บันทึกเมื่อ|บันทึกวันที่)\s*[：:]?")
_SAVED_STAMP = re.compile(r"\d{1,4}[/.\-]\d{1,2}[/.\-]\d{1,4}\s+\d{1,2}[:.]\d{2}\s*$")

# `2023/05/01(月)`, `2024/01/15(Mon)`, `2024/01/15（月）`, `2021/03/03 Wed`, PC `2019.12.23 月曜日`, `2017.09.03 Sunday`,
# zh-TW `2024/01/05（五）` and PC `2025.02.15 星期六`, zh-CN `2026/1/30周五` (no space: ChatLab's DATE_PATTERNS),
# Thai PC `2026.08.31 วันจันทร์` (a Thai office group's real PC export, Gregorian years).
YMD_DATE = re.compile(
    r"^(\d{4})[/.](\d{1,2})[/.](\d{1,2})(?:\s*[(（][^)）\t]{1,12}[)）]|\s*[^\s\t\d(（][^\s\t\d]{0,11})?\s*$"
)
# `Mon, 08/05/2024` (month first) or `Fri, 16/02/2024` (day first).
WEEKDAY_MD_DATE = re.compile(r"^([A-Za-z]{3}), (\d{1,2})/(\d{1,2})/(\d{4})\s*$")
_WEEKDAYS = {"mon": 0, "tue": 1, "wed": 2, "thu": 3, "fri": 4, "sat": 5, "sun": 6}
# Thai phones: the weekday first, then day/month/Buddhist-era year, `ศ. 28/11/2568` (a Thai importer of real
# group exports reads `^[ก-๙]{1,2}\.\s+(\d{1,2})/(\d{1,2})/(\d{4})$`). The full name (`วันศุกร์ 28/11/2568`) is
# allowed too. Day first always: that is the Thai locale's order, and 28/11 leaves no other reading.
THAI_DMY_DATE = re.compile(r"^[\u0e00-\u0e7f]{1,14}\.?,?\s*(\d{1,2})/(\d{1,2})/(\d{4})\s*$")
# Thai phones count years in the Buddhist era (2562 = 2019) wherever the date is written, in Thai or, with
# the phone's calendar set so, English. LINE began in 2011 (BE 2554) and no Gregorian export is dated
# 2400-2999, so a year there is BE; 9999 and other impossible years stay as they are, to be refused.
_BE_YEARS = range(2400, 3000)
_BE_OFFSET = 543

# Times: `21:05`, `9:05`, `午前0:15`, `午後0:30`, `AM 10:15`, `10:15 PM`, PC `24:53`, zh-TW `上午09:46` / `下午07:04`
# (ChatLab and other zh-TW parsers; some PC exports put a space after it), `10:15pm` (ChatLab's
# `HH:MM[AaPp][Mm]`). Thai `10:15 หลังเที่ยง` is inferred from the Thai locale's AM/PM words (a dataset in
# scrapinghub/dateparser issue 588 writes `08:28 ก่อนเที่ยง`): no LINE export with it was found.
_TIME = re.compile(
    r"^(?:(午前|午後|上午|下午|AM|PM|am|pm)\s?)?(\d{1,2}):(\d{2})(?:\s?(AM|PM|am|pm|ก่อนเที่ยง|หลังเที่ยง))?$"
)
_AFTERNOON = frozenset(["午後", "下午", "PM", "pm", "หลังเที่ยง"])

# A placeholder is exactly one of these tags ([通話]/[Call] as a TypeScript LINE reader lists them) ...
_EXACT_TAGS = frozenset(
    [
        "[スタンプ]", "[Sticker]", "[写真]", "[画像]", "[Photo]", "[動画]", "[Video]",
        "[ボイスメッセージ]", "[音声メッセージ]", "[Voice message]", "[連絡先]", "[Contact]",
        "[GIF]", "[ギフト]", "[Gift]", "[プレゼント]", "[通話]", "[Call]",
        # zh-TW: ChatLab's list and a zh-TW exporter's NON_TEXT_RE (貼圖 照片 影片 語音訊息 連絡資訊), [圖片] from
        # another zh-TW reader; zh-CN from ChatLab. Thai: [รูป] and [สติกเกอร์] as a Thai importer's tests quote a
        # real group export; [รูปภาพ] [ภาพ] [วิดีโอ] [คลิปวิดีโอ] [ข้อความเสียง] from the same importer's word list.
        "[貼圖]", "[照片]", "[圖片]", "[影片]", "[語音訊息]", "[聯絡資訊]", "[連絡資訊]",
        "[贴图]", "[图片]", "[视频]", "[语音信息]",
        "[สติกเกอร์]", "[รูป]", "[รูปภาพ]", "[ภาพ]", "[วิดีโอ]", "[คลิปวิดีโอ]", "[ข้อความเสียง]",
    ]
)
# ... or one of these, alone or followed by whitespace and what it refers to: `[位置情報] 東京都…`,
# `[アルバム] 旅行`, `[ノート] 集合場所`, `[投票] LivePreview VS LiveServer` (a poll with its title,
# as issue 12 quotes it from a real export; events are given the same room). The whitespace is
# required so that typed text that merely starts with a tag (`[投票]って何？`) stays text.
# [グループボード] is the note's old name (a public PHP converter of LINE logs reads
# `[グループボード] TITLE`), [Notes] is what hellodigua/ChatLab reads from English exports,
# [送金]/[Payment] (LINE Pay transfers) are in the same TypeScript reader as [通話]/[Call].
_TITLED_TAGS = frozenset(
    [
        "[位置情報]", "[Location]", "[アルバム]", "[Albums]", "[Album]", "[ファイル]", "[File]",
        "[ノート]", "[Note]", "[Notes]", "[グループボード]", "[投票]", "[Poll]", "[イベント]", "[Event]",
        "[LINE Pay]", "[送金]", "[Payment]",
        # zh-TW [檔案] [相簿] [位置訊息] (the zh-TW exporter above), [位置] [記事本] (ChatLab), [位置資訊]; zh-CN
        # [文件] [记事本]; Thai [ไฟล์] [ตำแหน่ง] (the Thai importer's word list). [投票] is the same word in Chinese.
        "[檔案]", "[相簿]", "[位置資訊]", "[位置訊息]", "[位置]", "[記事本]", "[文件]", "[记事本]",
        "[ไฟล์]", "[ตำแหน่ง]",
    ]
)
# OpenChat shares say inside the tag what was shared, then give its title:
# `[オープンチャットのノートをシェアしました。] 今月の予定`.
_SHARE_TAG = re.compile(r"^\[[^\[\]\n]{1,60}をシェアしました。?\]$")
# Notices that come with a name column (the name of whoever it concerns) but were said by nobody.
_NAMED_NOTICE = re.compile(
    r"^(?:ⓘ|.*メッセージの送信を取り消しました。?$|(?:.+ )?unsent a message\.?$|Message unsent\.?$)"
)
# The same in other languages, written after the name column with or without the name again: zh-TW
# `已收回訊息` / `小明已收回訊息` / `你已收回訊息` (zh-TW readers match `(.+)已收回訊息` and `你已收回訊息$`), zh-CN
# `撤回了一条消息` (ChatLab), Thai `ยกเลิกข้อความ` / `ยกเลิกข้อความแล้ว` (unsent: a real Thai PC export writes
# `18:33 TWO ยกเลิกข้อความ`), and that export's `NAME NAME ออกจากกลุ่ม` (left) and `NAME NAME เพิ่มประกาศ` (made an
# announcement). Only these exact words after the name count: `เดี๋ยวผมออกจากกลุ่ม` ("I'll leave the group") is text.
_NOTICE_AFTER_NAME = frozenset(
    [
        "已收回訊息", "已收回訊息。", "你已收回訊息", "您已收回訊息", "撤回了一条消息",
        "ยกเลิกข้อความ", "ยกเลิกข้อความแล้ว", "คุณยกเลิกข้อความแล้ว", "ออกจากกลุ่ม", "เพิ่มประกาศ",
    ]
)


# Unicode's invisible direction isolates (LRI RLI FSI PDI), which LINE wraps around names in some exports
# (a Thai importer strips U+2066-2069 "that LINE puts around names" from every line). A name with them
# would not match the one the user types for --persona or --speakers.
_ISOLATES = "\u2066\u2067\u2068\u2069"
_ISOLATE_RUN = re.compile("[\u2066-\u2069]+")


def strip_isolates(text: str) -> str:
    # The PC importer passes a whole export, which seldom holds any: on 1M lines, looking for them takes
    # ~0.02 s, removing them ~0.6 s, and str.translate ~1.5 s whether there are any or not.
    return _ISOLATE_RUN.sub("", text) if any(c in text for c in _ISOLATES) else text


def header_line(line: str) -> str | None:
    """For a line before the first date: the chat's title for a `[LINE] …` header, "" for the
    `保存日時：` / `Saved on:` line, None for anything else."""
    m = HEADER_TITLE.match(line)
    if m:
        return next(title for title in m.groups() if title)
    return "" if SAVED_ON.match(line) or _SAVED_STAMP.search(line) else None


def chat_title_before_first_day(line: str, chat: str, path, number: int, expected: str) -> str:
    """Before the first date line only headers may appear: the chat's title after a header line (`chat`
    kept for the saved-on line); any other line stops the import, saying what was `expected` there."""
    header = header_line(line)
    if header is None:
        raise ExportError(path, number, f"expected {expected}, found {line[:60]!r}")
    return header or chat


def parse_time(text: str) -> int | None:
    """Minutes after midnight, or None. 午前/午後 use hours 0-11 (午後0:30 is 12:30); AM/PM and 上午/下午 12 is
    noon/midnight (下午12:30 is 12:30, 上午12:05 is 00:05)."""
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
        if half in _AFTERNOON:
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
        return PLACEHOLDER if _tagged_item(body) is not None else TEXT
    if first == "☎":
        return PLACEHOLDER  # call lines: 通話時間, 不在着信, Missed call, Canceled call, No answer ...
    if first == "ⓘ" or body.rstrip().endswith(NOTICE_ENDINGS):
        text = body.rstrip()
        if _NAMED_NOTICE.match(text) or strip_isolates(text).removeprefix(name).lstrip() in _NOTICE_AFTER_NAME:
            return SYSTEM
    return TEXT


def _tagged_item(body: str) -> str | None:
    """What a body starting with `[` is: "exact" (a tag alone, `[スタンプ]`), "titled" (a tag and what it
    refers to, `[投票] 旅行先`), or None: typed text."""
    close = body.find("]")
    if close <= 0:
        return None
    tag = body[: close + 1]
    after = body[close + 1 :]
    if tag in _EXACT_TAGS:
        return "exact" if not after.strip() else None
    if tag in _TITLED_TAGS or _SHARE_TAG.match(tag):
        return "titled" if not after or after[0].isspace() else None
    return None


def is_titled_item(body: str) -> bool:
    """A poll, note, note share, album, location ... with its title: `[投票] 旅行先どこにする`.

    Such an item can run over several lines (a note share quoted in a mobile export, a title
    followed by unquoted lines in a PC one), so the parsers ask this of whole multi-line bodies.
    """
    return body.startswith("[") and _tagged_item(body) == "titled"


# The PC / Mac app ("save chat") writes no tags: media and calls are bare words in the app's UI
# language, `21:46 牧場主 Stickers`. Read from public parsers of real PC exports:
# - スタンプ 写真 動画 ファイル GIF 通話 音声通話 ビデオ通話: a parse_chatlog.py whose docstring quotes
#   `2025.12.30 火曜日` / `23:43 natsumi_ スタンプ` (found by content search, repository not shown);
# - 画像: a PC `2026.01.09 金曜日` parser that drops messages that are exactly "画像";
# - Stickers Photos Videos Audio: hellodigua/ChatLab electron/main/parser/formats/line-native-txt.ts
#   ("EN (fallback)"), and a LINE analyzer's String extension (isSticker/isPhoto/isVideo);
# - Files, "Deleted an album", "Added a new note": an import script for a Thai office group's PC
#   export (`^\d{2}:\d{2}\s+(.+?)\s+(Stickers|Photos|Videos|Files|Deleted an album|Added a new note)`);
# - Missed call, No answer, "Canceled the call", 不在着信, 通話をキャンセルしました, 応答がありませんでした:
#   the call lists of two LINE readers; "Canceled call", 通話に応答がありませんでした: as mobile exports
#   word them; all without the ☎ that mobile exports put first. Canceled and File: as issue 12
#   quotes them from real PC exports;
# - 貼圖 圖片 影片: a Traditional Chinese cleaner of PC exports (`^(貼圖|圖片|影片)$`); 照片 檔案 語音訊息
#   未接來電 已取消通話: the MEDIA_EXACT of a parser of zh-TW `2025.02.15 星期六` PC exports; 聯絡資訊, and the
#   note notices 已新增新的記事本。 已分享記事本。 (like "Added a new note"): Bruce1986/line_parser's filter;
# - รูป วิดีโอ สติกเกอร์ เขียนโน้ตใหม่ (a new note): a Thai office group's real PC export
#   (Wattanakit27/SaleforceOxletauto checkout/samples); ไม่ได้รับสาย (missed call) and ไฟล์: a Thai importer's
#   list of the bare words in the PC exports it reads.
# A person can type one of these as a whole message ("写真", "Photos"); we accept that risk because
# the words count only in PC exports, only as the whole message (a continuation line, any other
# word or even punctuation keeps it text), and a lost sample costs less than training the model to
# answer "Stickers". The bare キャンセル is left out: it is a plausible typed message and no export
# we found writes it.
PC_BARE_PLACEHOLDERS = frozenset(
    [
        "スタンプ", "写真", "画像", "動画", "ファイル", "GIF", "通話", "音声通話", "ビデオ通話",
        "不在着信", "通話をキャンセルしました", "通話に応答がありませんでした", "応答がありませんでした",
        "Stickers", "Photos", "Videos", "Audio", "File", "Files", "Missed call", "Canceled", "Canceled call",
        "Canceled the call", "No answer", "Deleted an album", "Added a new note",
        "貼圖", "圖片", "影片", "照片", "檔案", "語音訊息", "未接來電", "已取消通話", "聯絡資訊",
        "已新增新的記事本。", "已分享記事本。",
        "รูป", "วิดีโอ", "สติกเกอร์", "เขียนโน้ตใหม่", "ไม่ได้รับสาย", "ไฟล์",
    ]
)
# `通話時間 0:12`, `Call time 1:02:03` (mobile exports put ☎ first; PC ones may not).
_PC_CALL_TIME = re.compile(r"^(?:☎\s*)?(?:通話時間|通话时间|Call time)\s*\d{1,3}(?::\d{2}){1,2}$")


def is_pc_bare_placeholder(body: str) -> bool:
    """Whether a whole PC message body is one of the app's bare placeholder words or a call line."""
    text = body.strip()
    return text in PC_BARE_PLACEHOLDERS or bool(_PC_CALL_TIME.match(text))


# What a named line's body must start or end with to be anything but plain text; lets the
# mobile parser skip `classify` for the 9 lines in 10 that are ordinary messages.
SPECIAL_FIRST_CHARS = frozenset("[☎ⓘ")
NOTICE_ENDINGS = (
    "取り消しました", "取り消しました。", "unsent a message", "unsent a message.", "Message unsent.",
    *_NOTICE_AFTER_NAME,
)


def gregorian_year(year: int) -> int:
    """A date line's year in the Gregorian calendar: Buddhist-era years (Thai phones) lose 543."""
    return year - _BE_OFFSET if year in _BE_YEARS else year


def _date(year: int, month: int, day: int) -> date | None:
    try:
        return date(gregorian_year(year), month, day)
    except ValueError:
        return None


def ymd(line: str) -> date | None:
    m = YMD_DATE.match(line)
    if not m:
        return None
    return _date(int(m.group(1)), int(m.group(2)), int(m.group(3)))


def thai_dmy(line: str) -> date | None:
    m = THAI_DMY_DATE.match(line)
    if not m:
        return None
    return _date(int(m.group(3)), int(m.group(2)), int(m.group(1)))


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
        weekday, a, b = _WEEKDAYS.get(m.group(1).lower()), int(m.group(2)), int(m.group(3))
        year = gregorian_year(int(m.group(4)))
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
    return _date(year, month, day)


def date_line(line: str, order: str) -> date | None:
    """The day a date line announces, or None if the line is not a date line."""
    if not line:
        return None
    first = line[0]
    if "0" <= first <= "9":
        return ymd(line)
    if "\u0e00" <= first <= "\u0e7f":
        return thai_dmy(line)
    return weekday_md_date(line, order) if first.isalpha() else None
