"""LINE talk history saved from the PC / Mac app ("save chat"): `15:16 山口 由美 来週どうする`.

Columns are separated by spaces, names may contain spaces, and multi-line messages are not
quoted: their later lines simply follow. So where a name ends cannot be known without the
list of speakers (`--speakers`); without it we stop and show the likely names.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..records import PLACEHOLDER, SYSTEM, TEXT, ChatRecord
from .errors import ExportError, SpeakersNeeded
from .line_shapes import (
    chat_title_before_first_day,
    classify,
    date_line,
    decide_day_month_order,
    is_pc_bare_placeholder,
    is_titled_item,
    message_time,
    parse_time,
    strip_isolates,
)
from .options import ReadOptions
from .text_file import read_text

_MESSAGE = re.compile(r"^(\d{1,2}:\d{2}) (.*)$")
# Notices in PC exports have no name column; these are the shapes LINE writes. The note, album
# and call-started ones are the SYSTEM_ACTIONS of a public parser of `2026.01.09 金曜日` PC exports.
# zh-TW: `XXX已加入群組。`, `XXX已退出群組。`, `XXX邀請YYY加入群組。`, `XXX已將YYY退出群組。` (Bruce1986/line_parser),
# `已新增…至群組`, `已離開群組`, `已設定公告` (ChatLab), `張已收回訊息` (the name glued on: a zh-TW PC parser),
# OpenChat `加入聊天` / `離開聊天`. Thai: `ยกเลิกข้อความแล้ว` alone after the time (a Thai importer: "written in
# the sender column"), `X เพิ่ม Y เข้ากลุ่ม` (added; the same importer's group sample).
_NOTICE = re.compile(
    r"(?:が参加しました|を招待しました|が退会しました|を退会させました|がグループを退会しました|がグループに参加しました"
    r"|グループ名を.*に変更しました|が投票を作成しました|メッセージの送信を取り消しました|がアナウンスしました"
    r"|がノートを作成しました|がアルバムに写真を追加しました|が通話をかけました"
    r"|joined the group|left the group|invited .+ to the group|unsent a message|changed the group name"
    r"|已加入群組|已退出群組|加入群組。|退出群組。|已新增.+至群組|已離開群組|已設定公告|已收回訊息|加入聊天$|離開聊天$"
    r"|^ยกเลิกข้อความแล้ว$| เพิ่ม .+ เข้ากลุ่ม$)"
)
_MISSING_SPEAKER_THRESHOLD = 3  # an unknown first word this often is a speaker missing from --speakers
_MAX_NAME_WORDS = 4  # `Mary Ann Smith` and a little more
_MAX_LISTED = 12


def read(path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    # Direction isolates around names (see strip_isolates) would keep a name from matching --speakers; with no
    # name column to strip them from, they go from the whole text: they are invisible and carry no words.
    text = strip_isolates(read_text(path, options.encoding))
    lines = text.replace("\r\n", "\n").split("\n")
    speakers = sorted(options.speakers, key=len, reverse=True)  # longest first: `山口 由美` before `山口`
    if not speakers:
        first = next((n for n, line in enumerate(lines, 1) if _MESSAGE.match(line)), None)
        likely = likely_speakers(lines, [])
        raise SpeakersNeeded(path, first, _needs_speakers_message(likely), tuple(name for name, _ in likely))
    _check_no_missing_speakers(lines, speakers, path)
    return _parse(lines, speakers, path, options)


def _split_speaker(rest: str, speakers: list[str]) -> tuple[str, str] | None:
    for name in speakers:
        if rest.startswith(name) and (len(rest) == len(name) or rest[len(name)] in " \t"):
            return name, rest[len(name) + 1 :]
    return None


def _unnamed_bodies(lines: list[str], speakers: list[str]) -> list[str]:
    """`name text` after the time of every message line that no listed speaker starts and that is no notice."""
    bodies = []
    for line in lines:
        m = _MESSAGE.match(line)
        if m and not _split_speaker(m.group(2), speakers) and not _NOTICE.search(m.group(2)):
            bodies.append(m.group(2))
    return bodies


def _full_name(first: str, bodies: list[str]) -> str:
    """`山口` -> `山口 由美` when (nearly) every line of that first word goes on with the same word and then more
    text: a name with spaces. Not when that word is all there is (`Kai おけ`, a one-word reply), nor a bare
    placeholder word (`Joe Stickers`), nor from a single line, which cannot tell a name from a message's
    first word."""
    name = first
    for _ in range(_MAX_NAME_WORDS - 1):
        rests = [b[len(name) + 1:] for b in bodies if b.startswith(name + " ")]
        if len(rests) < 2:
            break
        word, n = Counter(r.split(" ", 1)[0] for r in rests).most_common(1)[0]
        goes_on = sum(1 for r in rests if r.startswith(word + " ") and r[len(word) + 1:].strip())
        if not word or n < 0.9 * len(bodies) or goes_on < n / 2 or is_pc_bare_placeholder(word):
            break
        name = f"{name} {word}"
    return name


def likely_speakers(lines: list[str], speakers: list[str]) -> list[tuple[str, int]]:
    """(full name, lines) of the people who start message lines but are not in `speakers`, most lines first.

    A one-line "name" is left out of a long file: it is more likely a message's later line that happens to
    start with a time (`10:00 集合ね`) than a person (who, if real, is named by the error at their line)."""
    bodies = _unnamed_bodies(lines, speakers)
    by_first: dict[str, list[str]] = {}
    for body in bodies:
        by_first.setdefault(body.split(" ", 1)[0], []).append(body)
    ranked = sorted(by_first.items(), key=lambda kv: -len(kv[1]))
    least = 1 if len(bodies) < 50 else 2
    return [(_full_name(first, group), len(group)) for first, group in ranked if len(group) >= least][:_MAX_LISTED]


def _listed(likely: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} ({n} line{'s' if n != 1 else ''})" for name, n in likely) or "none"


def _needs_speakers_message(likely: list[tuple[str, int]]) -> str:
    return (
        'looks like a LINE PC "save chat" export, whose names cannot be told from the text without '
        "--speakers (names may contain spaces). The likely speakers: " + _listed(likely)
    )


def _check_no_missing_speakers(lines: list[str], speakers: list[str], path: Path) -> None:
    missing = [(name, n) for name, n in likely_speakers(lines, speakers) if n >= _MISSING_SPEAKER_THRESHOLD]
    if missing:
        raise SpeakersNeeded(
            path, None, f"these start many lines but are not in --speakers: {_listed(missing)}; add them "
            "(with their full names)", tuple(name for name, _ in missing))


def _finished(pending: list, chat: str) -> ChatRecord:
    """The record for a message whose continuation lines have all been read.

    A bare placeholder word (`Stickers`, `写真`, `通話時間 0:12`) is judged only now, on the whole
    message: with a continuation line it was typed text after all.
    """
    name, stamp, body, kind, lineno = pending
    if kind == TEXT and is_pc_bare_placeholder(body):
        kind = PLACEHOLDER
    return ChatRecord(name, stamp, body, kind, chat, None, None, lineno)


def _parse(lines: list[str], speakers: list[str], path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    order = decide_day_month_order(lines, options.date_order)
    chat = ""
    day = None
    pending: list | None = None  # [name, time, body, kind, lineno]
    blank_run = 0  # blank lines inside an unquoted multi-line message belong to it
    for i, line in enumerate(lines, 1):
        if not line.strip():
            blank_run += 1
            continue
        new_day = date_line(line, order)
        if new_day is not None:
            if pending is not None:
                yield _finished(pending, chat)
                pending = None
            day = new_day
            blank_run = 0
            continue
        m = _MESSAGE.match(line)
        if m and day is not None:
            minutes = parse_time(m.group(1))
            if minutes is not None:
                # Hours past 23 (`24:53`) occur: they run on into the next morning.
                stamp = message_time(day, minutes)
                split = _split_speaker(m.group(2), speakers)
                if split is not None or _NOTICE.search(m.group(2)):
                    if stamp is None:
                        raise ExportError(path, i, f"time {m.group(1)!r} on {day} is past the year 9999")
                    if pending is not None:
                        yield _finished(pending, chat)
                    if split is None:
                        pending = ["", stamp, m.group(2), SYSTEM, i]
                    else:
                        kind = classify(split[0], split[1])
                        pending = [split[0] if kind != SYSTEM else "", stamp, split[1], kind, i]
                    blank_run = 0
                    continue
        if day is None:
            chat = chat_title_before_first_day(line, chat, path, i, "a date line such as 2019.12.23 月曜日")
            continue
        # Typed text runs on unquoted; so can a titled item such as a shared note with its lines.
        if pending is not None and (pending[3] == TEXT or is_titled_item(pending[2])):
            pending[2] += "\n" * (blank_run + 1) + line
            blank_run = 0
            continue
        raise ExportError(path, i, f"expected `HH:MM name text` with a name from --speakers, found {line[:60]!r}")
    if pending is not None:
        yield _finished(pending, chat)
