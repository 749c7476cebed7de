"""The one record type every importer produces (and the bot's memory reuses).

A NamedTuple rather than a dataclass: importers create millions of these while
streaming a large export, and tuple construction is the cheapest Python offers.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

# What a record is, as `finetune inspect` counts them (README, "See who said what").
TEXT = "text"  # something a person typed
PLACEHOLDER = "placeholder"  # attributed non-text item: sticker, photo, call, attachment-only ...
SYSTEM = "system"  # a notice nobody said: join, leave, unsend, pin ...
KINDS = (TEXT, PLACEHOLDER, SYSTEM)


class ChatRecord(NamedTuple):
    speaker: str  # who said it; "" for a system line nobody said
    time: datetime | None  # naive local wall-clock time, or aware where the export has an offset
    text: str  # body with "\n" line breaks (placeholders keep their export text, e.g. "[スタンプ]")
    kind: str  # one of KINDS
    chat: str = ""  # which conversation inside the source (channel id, chat title); "" if one chat
    message_id: str | None = None  # the platform's id where the format has one
    reply_to: str | None = None  # message_id of the message this one answers, where the format has it
    line: int = 0  # 1-based line (or message index for JSON) in the source, for error messages


def is_multiline(record: ChatRecord) -> bool:
    """A text message whose body still has a newline once trailing ones are stripped: what `finetune inspect`
    counts as "multiline" (summary.py). A trailing line break alone, which some exports leave, is not one."""
    text = record.text
    # The plain `in` first: most messages have no newline, and it spares them the stripped copy.
    return record.kind == TEXT and "\n" in text and "\n" in text.rstrip("\r\n")
