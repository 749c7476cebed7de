"""DiscordChatExporter JSON exports, streamed one message at a time.

DCE writes one object: `guild`, `channel`, `dateRange`, `exportedAt`, then the `messages`
array, then `messageCount`. Exports of busy channels reach hundreds of MB, so the file is
never loaded whole: a short first pass reads the header up to the start of `messages`
(the channel id, and proof that this is a DCE export at all), then a second pass streams
`messages.item` with ijson. `import ijson` picks its C backend (yajl2_c) when it is
installed, which is what makes a 1M-message export take seconds rather than minutes.

Message types (DCE writes the enum name, or the bare number for a type it does not
know): Default/Reply and slash/context-menu command invocations are things a person
sent; every other type (join, pin, call, rename, thread created, ...) is a notice.
DCE fills a notice's `content` with English fallback text ("Joined the server.").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import ijson

from ..records import PLACEHOLDER, SYSTEM, TEXT, ChatRecord
from .errors import ExportError
from .options import ReadOptions

# Messages a person sent. Numbers are what DCE writes for types missing from its enum
# (19 Reply in old versions, 20 ChatInputCommand, 23 ContextMenuCommand).
USER_MESSAGE_TYPES = frozenset({"Default", "Reply", "ChatInputCommand", "ContextMenuCommand", "0", "19", "20", "23"})
# Only these answer another message. Other types carry references too: a pin points at the
# pinned message, a forward (type Default) at a message in another channel.
REPLY_TYPES = frozenset({"Reply", "19"})

_UTF8_BOM = b"\xef\xbb\xbf"
_PROGRESS_STEP = 1 << 20  # report progress at most once per MiB read
# ijson reads 64 KiB at a time, and builds every message in a read at once: small reads keep memory
# small. But yajl re-scans a token that spans reads from its start on every read, so one long message
# costs (length / read size)^2: 3.4 s for an 8 MB message, 55 s for 32 MB. So while no message
# completes, each read is twice the last, up to 16 MiB, and a long message is read in few large reads.
_MAX_READ_GROWTH = 256
_NOT_DCE = 'expected a DiscordChatExporter JSON export ({"guild": ..., "channel": ..., "messages": [...]})'


def read(path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    # The header pass runs now, so a file that is not a DCE export fails at open time.
    channel_id = _read_header(path)
    return _stream_messages(path, channel_id, options.on_progress)


# --- timestamps (shared with the other Discord importers) ---------------------------------

_ISO_FRACTION = re.compile(r"\.(\d+)")
_ISO_OFFSET_NO_COLON = re.compile(r"([+-]\d{2})(\d{2})$")


def parse_iso_datetime(text: str) -> datetime:
    """ISO 8601 as DCE and Discord write it; ValueError if it is not one.

    DCE writes .NET's round-trip format (`2023-09-23T13:15:48.3790000+03:00`: 7 fraction
    digits) or trims the fraction (`2024-05-03T21:16:10.6+09:00`); some tools write `Z`.
    Python 3.11 reads all of these, 3.10 only 3 or 6 digits and a `+HH:MM` offset, so the
    fast C parser is tried first and the text is normalised only when it refuses.
    """
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return datetime.fromisoformat(normalise_iso(text))


def normalise_iso(text: str) -> str:
    """The same instant in the one shape every Python's fromisoformat reads."""
    text = text.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    text = _ISO_OFFSET_NO_COLON.sub(r"\1:\2", text)  # +0900 -> +09:00
    m = _ISO_FRACTION.search(text)
    if m:
        digits = (m.group(1) + "000000")[:6]  # .NET ticks are 100 ns: the 7th digit is below Python's resolution
        text = text[: m.start(1)] + digits + text[m.end(1) :]
    return text


# --- the two passes ------------------------------------------------------------------------


def _open(path: Path) -> BinaryIO:
    try:
        f = path.open("rb")
    except IsADirectoryError:
        raise ExportError(path, None, "is a folder, expected a DiscordChatExporter .json file") from None
    except OSError as exc:
        raise ExportError(path, None, f"cannot read: {exc.strerror}") from None
    if f.read(3) != _UTF8_BOM:  # a file re-saved by a Windows editor; yajl rejects the BOM
        f.seek(0)
    return f


def _bad_bytes(exc: UnicodeDecodeError) -> str:
    """`bytes ed in "general in \\xed\\xb1\\xb1"`: the bytes, and the text around them to find them by."""
    around = exc.object[max(0, exc.start - 20) : exc.end + 20].decode("utf-8", "backslashreplace")
    return f"bytes {exc.object[exc.start:exc.end].hex(' ')} in \"{around}\""


def _first_line(exc: Exception) -> str:
    # yajl's messages are multi-line (the error, a snippet, an arrow), and bytes; the first line says it.
    text = exc.args[0] if exc.args else str(exc)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    return str(text).strip().split("\n", 1)[0]


def _read_header(path: Path) -> str:
    """The channel id (or "" if the export has none), once the `messages` array is reached."""
    channel_id = ""
    with _open(path) as f:
        try:
            for prefix, event, value in ijson.parse(f):
                if prefix == "":
                    if event == "start_array":
                        raise ExportError(
                            path,
                            None,
                            "is a JSON array, not a DiscordChatExporter export (a data-package "
                            "messages.json? try --format discord-package); " + _NOT_DCE,
                        )
                    if event not in ("start_map", "map_key", "end_map"):
                        raise ExportError(path, None, "holds a single JSON value; " + _NOT_DCE)
                elif prefix == "channel.id" and value is not None:
                    channel_id = str(value)
                elif prefix == "messages":
                    if event == "start_array":
                        return channel_id
                    raise ExportError(
                        path, None, f'"messages" is a JSON {event.replace("start_", "")}, not an array; ' + _NOT_DCE
                    )
        except ijson.JSONError as exc:
            raise ExportError(path, None, f"invalid JSON before the messages array: {_first_line(exc)}") from None
        except UnicodeDecodeError as exc:
            raise ExportError(path, None, f"text before the messages array is not valid UTF-8: {_bad_bytes(exc)}") from None
    raise ExportError(path, None, 'has no "messages" array at the top level; ' + _NOT_DCE)


class _CountingReader:
    """A binary file wrapper that tells on_progress how many bytes ijson has consumed, and reads more
    at a time while a long message is being read (see _MAX_READ_GROWTH)."""

    def __init__(self, f: BinaryIO, on_progress: Callable[[int], None] | None):
        self._f = f
        self._on_progress = on_progress
        self._reported = 0
        self._growth = 1
        self.bytes_read = f.tell()  # past a skipped BOM

    def message_done(self) -> None:
        self._growth = 1

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size * self._growth if size > 0 else size)
        self._growth = min(self._growth * 2, _MAX_READ_GROWTH)
        self.bytes_read += len(data)
        if self._on_progress is not None and (not data or self.bytes_read - self._reported >= _PROGRESS_STEP):
            self._reported = self.bytes_read
            self._on_progress(self.bytes_read)
        return data


def _stream_messages(path: Path, channel_id: str, on_progress: Callable[[int], None] | None) -> Iterator[ChatRecord]:
    index = 0  # messages fully read so far
    with _open(path) as f:
        reader = _CountingReader(f, on_progress)
        try:
            for message in ijson.items(reader, "messages.item", use_float=True):
                reader.message_done()
                index += 1
                yield _record(message, index, channel_id, path)
        except ijson.JSONError as exc:
            detail = _first_line(exc)
            n = index + 1
            if "premature EOF" in detail or detail.startswith("Incomplete"):  # yajl / ijson's pure-Python backend
                message = f"the file ends inside message {n} (truncated export? {index} complete messages were read)"
            else:
                message = f"invalid JSON in message {n}: {detail}"
            raise ExportError(path, n, message) from None
        except UnicodeDecodeError as exc:  # yajl checks the bytes; Python decodes each string
            raise ExportError(path, index + 1, f"message {index + 1} holds text that is not valid UTF-8: {_bad_bytes(exc)}") from None


# --- one message -----------------------------------------------------------------------------


def _require(message: dict, key: str, index: int, path: Path):
    value = message.get(key)
    if value is None:
        raise ExportError(path, index, f'message {index} has no "{key}"; ' + _NOT_DCE)
    return value


def _record(message: object, index: int, channel_id: str, path: Path) -> ChatRecord:
    if not isinstance(message, dict):
        raise ExportError(
            path, index, f"message {index} is a JSON {type(message).__name__}, expected an object; " + _NOT_DCE
        )
    message_id = str(_require(message, "id", index, path))
    message_type = str(_require(message, "type", index, path))
    stamp = _require(message, "timestamp", index, path)
    author = _require(message, "author", index, path)
    name = author.get("name") if isinstance(author, dict) else None
    if not isinstance(name, str):
        raise ExportError(path, index, f'message {index} has no "author.name"; ' + _NOT_DCE)
    try:
        time = parse_iso_datetime(stamp)
    except (ValueError, TypeError):
        raise ExportError(path, index, f"message {index}: timestamp {stamp!r} is not an ISO 8601 date") from None
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise ExportError(path, index, f'message {index}: "content" is a JSON {_json_type(content)}, expected a string')

    if message_type not in USER_MESSAGE_TYPES:
        # Nobody said a notice; DCE's English fallback text (or the type) says what happened.
        return ChatRecord("", time, content or f"[{message_type}]", SYSTEM, channel_id, message_id, None, index)

    reply_to = None
    if message_type in REPLY_TYPES:
        reference = message.get("reference")
        if isinstance(reference, dict) and reference.get("messageId"):
            reply_to = str(reference["messageId"])
    # `name` is the account name; `nickname` is a per-server display name that changes over time.
    if content.strip():
        return ChatRecord(name, time, content, TEXT, channel_id, message_id, reply_to, index)
    text = _placeholder_text(message, index, path)
    return ChatRecord(name, time, text, PLACEHOLDER, channel_id, message_id, reply_to, index)


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null")


def _array(message: dict, key: str, index: int, path: Path) -> list:
    value = message.get(key) or []
    if not isinstance(value, list):
        raise ExportError(path, index, f'message {index}: "{key}" is a JSON {_json_type(value)}, expected an array')
    return value


def _placeholder_text(message: dict, index: int, path: Path) -> str:
    """What a message with no typed text carried, in the bracketed style LINE exports use."""
    attachments = _array(message, "attachments", index, path)
    if attachments:
        names = [
            str(a.get("fileName") or str(a.get("url", "")).rsplit("/", 1)[-1]) if isinstance(a, dict) else "?"
            for a in attachments
        ]
        return f"[attachment: {', '.join(names)}]"
    stickers = _array(message, "stickers", index, path)
    if stickers:
        return f"[sticker: {', '.join(str(s.get('name', '?')) if isinstance(s, dict) else '?' for s in stickers)}]"
    if message.get("embeds"):
        return "[embed]"
    if message.get("forwardedMessage"):
        return "[forwarded message]"
    return ""
