"""Discord's own data package ("Request all of my data"): the owner's messages only.

    Account/user.json              {"id", "username", ...}: whose messages these are
    Messages/index.json            channel id -> channel name
    Messages/c<id>/channel.json    {"id", "type", "recipients"?, "name"?, "guild"?}
    Messages/c<id>/messages.json   [{"ID", "Timestamp", "Contents", "Attachments"}]   current
    messages/c<id>/messages.csv    ID,Timestamp,Contents,Attachments                  older

Folder names changed case between package generations, so every name is matched
case-insensitively; the oldest packages also lack the `c` before the channel id. The path
may be the package folder, the .zip as downloaded (read in place, never extracted), the
Messages folder, one channel folder, or a lone messages.json / messages.csv.

Timestamps are UTC (`2023-05-01 12:34:56`, older `2021-03-05 12:34:56.789000+00:00`) and
files may list newest first, so each channel is sorted oldest first by (time, ID); channels
come in channel-id order. `chat` is the bare channel id, as in a DiscordChatExporter export
of the same channel, so the two can be merged.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path

from ..records import PLACEHOLDER, TEXT, ChatRecord
from .discord_csv import attachment_text, csv_rows
from .discord_json import parse_iso_datetime
from .errors import ExportError
from .options import ReadOptions
from .text_file import decode

OWNER_UNKNOWN = "(you)"  # speaker when the package has no Account/user.json
# A channel file is read whole (they are small: only the owner's messages, newest first, to be sorted).
# A zip member says how big it unpacks to before it is read: past this it is a damaged archive or a
# zip bomb, and reading it would exhaust memory, so it is refused.
MAX_MEMBER_BYTES = 1 << 30
_CHANNEL_DIR = re.compile(r"c?(\d+)", re.I)
_MESSAGE_FILES = ("messages.json", "messages.csv")  # preferred first
_CSV_HEADER = ("id", "timestamp", "contents", "attachments")
_EXPECTED = (
    "expected a Discord data package (folder or .zip) with Messages/c<id>/messages.json or messages.csv, "
    "its Messages folder, or one messages.json / messages.csv"
)


@dataclass(frozen=True)
class _ChannelFile:
    channel_id: str  # digits only
    label: str  # where it is, for error messages: a path, or `package.zip!/Messages/c1/messages.json`
    is_json: bool
    load: Callable[[], bytes]


def read(path: Path, options: ReadOptions) -> Iterator[ChatRecord]:
    # Finding the files (and opening a zip) happens now, so a wrong path fails at open time.
    if path.is_dir():
        channels, package_root = _find_in_folder(path)
        return _read_channels(channels, _folder_owner(package_root), options, None)
    if _is_zip(path):
        archive = _open_zip(path)
        try:
            channels, owner = _find_in_zip(archive, path)
        except BaseException:
            archive.close()
            raise
        return _read_channels(channels, owner, options, archive)
    channel = _lone_file(path)
    # <root>/Messages/c<id>/messages.json: the owner is in <root>/Account, if the package is still whole.
    package_root = path.parent.parent.parent if channel.channel_id else None
    return _read_channels([channel], _folder_owner(package_root), options, None)


# --- finding the message files ---------------------------------------------------------------


def _child(folder: Path, name: str) -> Path | None:
    """folder/name matched case-insensitively (Messages vs messages, Account vs account)."""
    try:
        for entry in folder.iterdir():
            if entry.name.lower() == name:
                return entry
    except OSError:
        return None
    return None


def _channel_file_in(folder: Path) -> Path | None:
    for name in _MESSAGE_FILES:
        found = _child(folder, name)
        if found is not None and found.is_file():
            return found
    return None


def _folder_channel(folder: Path, file: Path) -> _ChannelFile:
    m = _CHANNEL_DIR.fullmatch(folder.name)
    return _ChannelFile(m.group(1) if m else "", str(file), file.name.lower().endswith(".json"), _file_loader(file))


def _file_loader(file: Path) -> Callable[[], bytes]:
    def load() -> bytes:
        try:
            return file.read_bytes()
        except OSError as exc:
            raise ExportError(file, None, f"cannot read: {exc.strerror}") from None

    return load


def _find_in_folder(path: Path) -> tuple[list[_ChannelFile], Path]:
    """The channel files, and the folder where Account/ should be."""
    own_file = _channel_file_in(path)
    if own_file is not None:  # one channel's folder: <root>/Messages/c<id>
        return [_folder_channel(path, own_file)], path.parent.parent
    messages = _child(path, "messages")
    if messages is not None and messages.is_dir():
        package_root = path
    else:  # the Messages folder itself
        messages, package_root = path, path.parent
    channels = []
    for folder in messages.iterdir():
        if folder.is_dir() and _CHANNEL_DIR.fullmatch(folder.name):
            file = _channel_file_in(folder)
            if file is not None:  # a channel folder with only channel.json holds no messages
                channels.append(_folder_channel(folder, file))
    if not channels:
        raise ExportError(path, None, f"found no Messages/c<id>/messages.json or messages.csv inside; {_EXPECTED}")
    return channels, package_root


def _is_zip(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError as exc:
        raise ExportError(path, None, f"cannot read: {exc.strerror}") from None


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ExportError(
            path, None, f"is not a readable zip archive (damaged or incomplete download?): {exc}"
        ) from None


def _find_in_zip(archive: zipfile.ZipFile, path: Path) -> tuple[list[_ChannelFile], str]:
    """The channel files under any `messages/` folder (a zip may wrap everything in one folder), and the owner."""
    by_channel: dict[str, tuple[int, str]] = {}  # channel id -> (preference, member name)
    owner = None
    for name in archive.namelist():
        parts = name.split("/")
        lower = [p.lower() for p in parts]
        if lower[-1] in _MESSAGE_FILES and len(parts) >= 2:
            m = _CHANNEL_DIR.fullmatch(parts[-2])
            if m and (len(parts) == 2 or lower[-3] == "messages"):
                preference = _MESSAGE_FILES.index(lower[-1])
                if m.group(1) not in by_channel or preference < by_channel[m.group(1)][0]:
                    by_channel[m.group(1)] = (preference, name)
        elif lower[-2:] == ["account", "user.json"] and (owner is None or len(name) < len(owner)):
            owner = name
    if not by_channel:
        raise ExportError(path, None, f"found no Messages/c<id>/messages.json or messages.csv in the zip; {_EXPECTED}")
    channels = [
        _ChannelFile(cid, f"{path}!/{name}", name.lower().endswith(".json"), _zip_loader(archive, name, path))
        for cid, (_, name) in by_channel.items()
    ]
    if owner is None:
        return channels, OWNER_UNKNOWN
    return channels, _parse_owner(_zip_loader(archive, owner, path)(), f"{path}!/{owner}")


def _zip_loader(archive: zipfile.ZipFile, name: str, path: Path) -> Callable[[], bytes]:
    def load() -> bytes:
        size = archive.getinfo(name).file_size
        if size > MAX_MEMBER_BYTES:
            raise ExportError(
                f"{path}!/{name}", None,
                f"unpacks to {size:,} bytes, over the {MAX_MEMBER_BYTES:,} a channel's messages file can sensibly "
                "hold (a damaged archive, or not a Discord data package?)",
            )
        try:
            return archive.read(name)
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, OSError) as exc:
            raise ExportError(
                f"{path}!/{name}", None, f"cannot read this member of the zip (damaged archive?): {exc}"
            ) from None

    return load


def _lone_file(path: Path) -> _ChannelFile:
    try:
        with path.open("rb") as f:
            head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError as exc:
        raise ExportError(path, None, f"cannot read: {exc.strerror}") from None
    m = _CHANNEL_DIR.fullmatch(path.parent.name)
    return _ChannelFile(m.group(1) if m else "", str(path), head.startswith(b"["), _file_loader(path))


# --- whose package -----------------------------------------------------------------------------


def _folder_owner(package_root: Path | None) -> str:
    account = _child(package_root, "account") if package_root is not None else None
    user_file = _child(account, "user.json") if account is not None and account.is_dir() else None
    if user_file is None:
        return OWNER_UNKNOWN
    try:
        raw = user_file.read_bytes()
    except OSError as exc:
        raise ExportError(user_file, None, f"cannot read: {exc.strerror}") from None
    return _parse_owner(raw, str(user_file))


def _parse_owner(raw: bytes, label: str) -> str:
    """`username` from Account/user.json: the account name, like DiscordChatExporter's author.name."""
    try:
        user = json.loads(decode(raw, label))
    except json.JSONDecodeError as exc:
        raise ExportError(label, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    name = user.get("username") if isinstance(user, dict) else None
    return name if isinstance(name, str) and name else OWNER_UNKNOWN


# --- reading the messages ----------------------------------------------------------------------


def _read_channels(
    channels: list[_ChannelFile], owner: str, options: ReadOptions, archive: zipfile.ZipFile | None
) -> Iterator[ChatRecord]:
    channels = sorted(channels, key=lambda c: (int(c.channel_id) if c.channel_id else -1, c.label))
    progress = options.on_progress
    done_bytes = 0
    try:
        for channel in channels:
            raw = channel.load()
            rows = _json_rows(raw, channel) if channel.is_json else _csv_rows(raw, channel, options.encoding)
            records = []
            for line, message_id, stamp, contents, attachments in rows:
                time = _parse_time(stamp, channel.label, line)
                if contents.strip():
                    kind, text = TEXT, contents
                else:  # attachment-only, or a call / sticker the package keeps no trace of
                    # The package separates a message's attachment URLs with a space (what public parsers of it
                    # split on); Discord's CDN URLs hold none, as uploads' spaces become "_".
                    kind, text = PLACEHOLDER, attachment_text(attachments.split())
                record = ChatRecord(owner, time, text, kind, channel.channel_id, message_id, None, line)
                records.append((time, _id_key(message_id), record))
            records.sort(key=lambda r: r[:2])  # packages list newest first; training wants oldest first
            for _, _, record in records:
                yield record
            done_bytes += len(raw)
            if progress:
                progress(done_bytes)
    finally:
        if archive is not None:
            archive.close()


def _json_rows(raw: bytes, channel: _ChannelFile) -> Iterator[tuple[int, str, str, str, str]]:
    try:
        messages = json.loads(decode(raw, channel.label))
    except json.JSONDecodeError as exc:
        raise ExportError(channel.label, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(messages, list):
        raise ExportError(
            channel.label,
            None,
            f'expected a JSON array of {{"ID", "Timestamp", "Contents", "Attachments"}} objects; {_EXPECTED}',
        )
    for index, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise ExportError(channel.label, index, f"message {index} is not a JSON object")
        fields = []
        for key in ("ID", "Timestamp", "Contents"):
            value = message.get(key)
            if value is None:
                raise ExportError(channel.label, index, f'message {index} has no "{key}"')
            fields.append(str(value))
        yield index, fields[0], fields[1], fields[2], str(message.get("Attachments") or "")


def _csv_rows(raw: bytes, channel: _ChannelFile, encoding: str) -> Iterator[tuple[int, str, str, str, str]]:
    text = decode(raw, channel.label, encoding).replace("\r\n", "\n")  # channel files are small: whole is fine
    rows = csv_rows(io.StringIO(text, newline=""), channel.label)
    _, header = next(rows, (1, []))
    if tuple(h.strip().lower() for h in header) != _CSV_HEADER:
        raise ExportError(
            channel.label, 1, f"expected the header ID,Timestamp,Contents,Attachments, found {','.join(header)[:100]!r}"
        )
    for line, row in rows:
        if len(row) != 4:
            raise ExportError(
                channel.label, line, f"expected 4 columns (ID,Timestamp,Contents,Attachments), found {len(row)}"
            )
        yield line, row[0], row[1], row[2], row[3]


def _parse_time(stamp: str, label: str, line: int):
    try:
        time = parse_iso_datetime(stamp)
    except ValueError:
        raise ExportError(label, line, f"Timestamp {stamp!r} is not a date like 2023-05-01 12:34:56") from None
    return time if time.tzinfo is not None else time.replace(tzinfo=timezone.utc)  # the package writes UTC


def _id_key(message_id: str) -> int:
    # Snowflake ids grow with time: the tie-break for messages sent in the same second.
    return int(message_id) if message_id.isdigit() else -1
