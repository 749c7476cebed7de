"""Every importer, fed damaged and hostile input through its public entry point: a result or an ExportError
that says what and where, never another exception.

Inputs are the real fixtures damaged the way files get damaged (bits flipped, cut short, lines inserted,
deleted or repeated, invalid UTF-8), random text, random JSON of the right outline, and single messages
of 10 MB. Hypothesis runs derandomized with a fixed budget, so CI sees the same examples every time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.importers import FORMATS, ExportError, ReadOptions, detect_format, open_export

FIXTURES = Path(__file__).parent / "fixtures"
# Each fixture file with the format its folder holds (the damaged LINE files under line/bad too). Not unread/:
# exports detection refuses (DiscordChatExporter HTML and text), which no importer reads.
FIXTURE_FILES = sorted(
    (p, "discord-package" if p.parent.name.startswith("c") or p.parent.parent.name == "discord-package" else
     ("line" if p.parent.name == "bad" else p.parent.name))
    for p in FIXTURES.rglob("*")
    if p.is_file() and not p.name.endswith(".expected.json") and p.suffix != ".zip"
    and "package_" not in str(p.relative_to(FIXTURES)) and p.parent.name != "unread"
)
PACKAGE_FOLDERS = [FIXTURES / "discord-package" / "package_current", FIXTURES / "discord-package" / "package_legacy"]
PACKAGE_ZIP = FIXTURES / "discord-package" / "package.zip"
PC_SPEAKERS = ("山口 由美", "田村")

# Bytes that mean something to some importer: separators, quotes, brackets, line ends, half a UTF-8
# character, a BOM, a zip signature, message-looking and date-looking lines, impossible times and dates.
GARBAGE = [
    b"\xff\xfe", b"\x00", b"\xe4\xbd", b"\xed\xb1\xb1", b"\xef\xbb\xbf", b"\r", b"\r\n", b"\n", b"\t\t\t", b'"', b'""', b"{", b"}",
    b"[", b"]", b",", b";", b":", b"PK\x03\x04", b"null", b"1e999", b"-1", b'{"messages":', b'"content": 5,',
    b"12:34\t", b"99:99\tA\tb", b"24:59\tA\tb", b"AM 13:00\tA\tb", b"2024/13/45(\xe6\x9c\x88)", b"9999/12/31(Fri)",
    b"Mon, 99/99/2024", b"Mon, 12/31/9999", b"23:59 \xe7\x94\xb0\xe6\x9d\x91 x", b"[LINE] x",
    b'"1","a","99/99/2024 99:99 PM","x",""', b"AuthorID,Author,Date,Content,Attachments,Reactions",
]
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def read_all(path: Path, fmt: str | None, options: ReadOptions | None = None) -> list | ExportError:
    """The records, or the ExportError; any other exception fails the test. Errors must say where."""
    try:
        _, records = open_export(path, fmt, options)
        return list(records)
    except ExportError as exc:
        assert exc.message.strip(), "an error must say what is wrong"
        # Where: the file (a zip's member as `package.zip!/Messages/...`) that exists, first in the message.
        assert str(exc).startswith(exc.path) and Path(exc.path.split("!/")[0]).exists(), f"where? {exc}"
        assert exc.line is None or exc.line >= 1
        return exc


# --- damaging bytes ---------------------------------------------------------------------------------

def _flip(data: bytes, at: int, bit: int, _garbage: bytes) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    b[at % len(b)] ^= 1 << bit
    return bytes(b)


def _truncate(data: bytes, at: int, _bit: int, _garbage: bytes) -> bytes:
    return data[: at % (len(data) + 1)]


def _insert_bytes(data: bytes, at: int, _bit: int, garbage: bytes) -> bytes:
    at %= len(data) + 1
    return data[:at] + garbage + data[at:]


def _insert_line(data: bytes, at: int, bit: int, garbage: bytes) -> bytes:
    lines = data.split(b"\n")
    lines.insert(at % (len(lines) + 1), garbage * (bit % 3 + 1))
    return b"\n".join(lines)


def _delete_line(data: bytes, at: int, _bit: int, _garbage: bytes) -> bytes:
    lines = data.split(b"\n")
    del lines[at % len(lines)]
    return b"\n".join(lines)


def _repeat_line(data: bytes, at: int, bit: int, _garbage: bytes) -> bytes:
    lines = data.split(b"\n")
    lines.insert(at % (len(lines) + 1), lines[(at >> 8) % len(lines)])
    return b"\n".join(lines)


MUTATIONS = st.lists(
    st.tuples(st.sampled_from([_flip, _truncate, _insert_bytes, _insert_line, _delete_line, _repeat_line]),
              st.integers(0, 1 << 24), st.integers(0, 7), st.sampled_from(GARBAGE)),
    min_size=1, max_size=4,
)


def damage(data: bytes, mutations) -> bytes:
    for mutate, at, bit, garbage in mutations:
        data = mutate(data, at, bit, garbage)
    return data


@contextmanager
def scratch():
    # Not pytest's tmp_path: hypothesis runs many examples in one test call, each needs a clean folder.
    with tempfile.TemporaryDirectory(prefix="bunshin-fuzz-") as folder:
        yield Path(folder)


def options_for(fmt: str) -> ReadOptions:
    return ReadOptions(speakers=PC_SPEAKERS if fmt == "line-pc" else ())


# --- the fixtures, damaged ----------------------------------------------------------------------------

def test_every_format_has_fixtures_to_damage():
    assert {fmt for _, fmt in FIXTURE_FILES} | {"discord-package"} == set(FORMATS)


@SETTINGS
@given(fixture=st.sampled_from(FIXTURE_FILES), mutations=MUTATIONS, other_format=st.sampled_from(sorted(FORMATS)))
def test_damaged_fixture_files(fixture, mutations, other_format):
    source, fmt = fixture
    with scratch() as folder:
        path = folder / source.name
        path.write_bytes(damage(source.read_bytes(), mutations))
        read_all(path, None, options_for(fmt))  # format detection, then the detected importer
        read_all(path, fmt, options_for(fmt))  # the right importer, told
        read_all(path, other_format, options_for(other_format))  # the wrong one, told: still no crash


@settings(SETTINGS, max_examples=60)
@given(package=st.sampled_from(PACKAGE_FOLDERS), member=st.integers(0, 100), mutations=MUTATIONS,
       entry=st.sampled_from(["package", "messages", "channel", "file"]))
def test_damaged_package_folders(package, member, mutations, entry):
    with scratch() as folder:
        root = folder / package.name
        shutil.copytree(package, root)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        victim = files[member % len(files)]
        victim.write_bytes(damage(victim.read_bytes(), mutations))
        # Every entry point the package importer documents: the package, its Messages folder, one
        # channel's folder, one messages file.
        messages = next(p for p in root.iterdir() if p.name.lower() == "messages")
        channel = next(p for p in sorted(messages.iterdir()) if p.is_dir())
        channel_file = next(p for p in channel.iterdir() if p.name.startswith("messages."))
        path = {"package": root, "messages": messages, "channel": channel, "file": channel_file}[entry]
        read_all(path, None)
        read_all(path, "discord-package")


@settings(SETTINGS, max_examples=60)
@given(member=st.integers(0, 100), mutations=MUTATIONS, whole_file=st.booleans())
def test_damaged_package_zip(member, mutations, whole_file):
    with scratch() as folder:
        path = folder / "package.zip"
        if whole_file:  # a damaged download: the archive's own bytes
            path.write_bytes(damage(PACKAGE_ZIP.read_bytes(), mutations))
        else:  # a sound archive holding a damaged file
            with zipfile.ZipFile(PACKAGE_ZIP) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as copy:
                names = original.namelist()
                for name in names:
                    data = original.read(name)
                    copy.writestr(name, damage(data, mutations) if name == names[member % len(names)] else data)
        read_all(path, None)
        read_all(path, "discord-package")


# --- random input -----------------------------------------------------------------------------------

# Mostly the characters the formats are made of, so the text gets past the first checks.
EXPORT_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from(list('\t\n\r :",;[]{}#/.-0123456789AMPLINE午前後月曜日年あ田村山口 由美\ufeff')),
                       st.characters(codec="utf-8")),
    max_size=400,
)


@SETTINGS
@given(text=EXPORT_TEXT, fmt=st.sampled_from([None, *sorted(FORMATS)]), encoding=st.sampled_from(["utf-8", "cp932"]),
       date_order=st.sampled_from(["auto", "mdy", "dmy"]))
def test_random_text(text, fmt, encoding, date_order):
    with scratch() as folder:
        path = folder / "export.txt"
        path.write_bytes(text.encode("utf-8"))
        read_all(path, fmt, ReadOptions(speakers=PC_SPEAKERS, encoding=encoding, date_order=date_order))


@SETTINGS
@given(prefix=st.sampled_from([
    "[LINE] 佐藤とのトーク履歴\n保存日時：2024/01/01 10:00\n\n2024/01/01(月)\n",
    "2019.12.23 月曜日\n",
    "AuthorID,Author,Date,Content,Attachments,Reactions\n",
    "ID,Timestamp,Contents,Attachments\n",
    "健太:おはよう\n",
]), text=EXPORT_TEXT)
def test_random_text_after_a_real_header(prefix, text):
    """A true start gets the importer past detection, so the random part reaches its parser."""
    with scratch() as folder:
        path = folder / "export.txt"
        path.write_bytes((prefix + text).encode("utf-8"))
        read_all(path, None, ReadOptions(speakers=PC_SPEAKERS))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def spoiled(valid: dict):
    """`valid` with one or two fields given a wrong JSON value or dropped: each example gets far into the parser."""
    keys = sorted(valid)
    return st.tuples(st.dictionaries(st.sampled_from(keys), JSON_VALUES, max_size=2),
                     st.sets(st.sampled_from(keys), max_size=1)).map(
        lambda change: {k: v for k, v in {**valid, **change[0]}.items() if k not in change[1]})


DCE_MESSAGE = spoiled({
    "id": "123", "type": "Default", "timestamp": "2024-05-01T12:00:00.000+09:00", "author": {"id": "1", "name": "Alice"},
    "content": "", "attachments": [{"fileName": "a.png"}], "stickers": [{"name": "wave"}], "embeds": [{}],
    "reference": {"messageId": "9"}, "forwardedMessage": None,
})
PACKAGE_MESSAGE = spoiled({"ID": "1234", "Timestamp": "2023-05-01 12:34:56", "Contents": "hi", "Attachments": ""})


@SETTINGS
@given(channel=JSON_VALUES, messages=st.lists(st.one_of(DCE_MESSAGE, JSON_VALUES), max_size=4))
def test_discordchatexporter_json_with_wrong_types(channel, messages):
    with scratch() as folder:
        path = folder / "export.json"
        path.write_text(json.dumps({"guild": {"id": "1"}, "channel": channel, "messages": messages}), encoding="utf-8")
        read_all(path, None)


@SETTINGS
@given(messages=st.one_of(st.lists(st.one_of(PACKAGE_MESSAGE, JSON_VALUES), max_size=4), JSON_VALUES),
       user=JSON_VALUES)
def test_package_json_with_wrong_types(messages, user):
    with scratch() as folder:
        channel = folder / "package" / "Messages" / "c42"
        channel.mkdir(parents=True)
        (channel / "messages.json").write_text(json.dumps(messages), encoding="utf-8")
        (folder / "package" / "Account").mkdir()
        (folder / "package" / "Account" / "user.json").write_text(json.dumps(user), encoding="utf-8")
        read_all(folder / "package", None)
        read_all(channel / "messages.json", "discord-package")


# --- one message of 10 MB ------------------------------------------------------------------------------

HUGE = "あ" * (10 * 1024 * 1024 // 3)  # 10 MiB of UTF-8
DCE_HEADER = {"guild": {"id": "1"}, "channel": {"id": "2"}}


def _dce(content: str) -> str:
    message = {"id": "1", "type": "Default", "timestamp": "2024-05-01T12:00:00+09:00", "author": {"name": "A"},
               "content": content}
    return json.dumps({**DCE_HEADER, "messages": [message]}, ensure_ascii=False)


class Records(NamedTuple):
    """The file must read, as this format, into these (speaker, text) records: an error is a failure."""

    fmt: str
    records: list[tuple[str, str]]


class Fails(NamedTuple):
    """The file is truly malformed: an ExportError saying `words`, at this file and line."""

    words: str
    line: int | None


# name -> (file name, content, options, what must come of it)
HUGE_EXPORTS = {
    "line": ("talk.txt", f"[LINE] 佐藤とのトーク履歴\n2024/01/01(月)\n10:00\tA\t{HUGE}\n10:01\tB\tok\n", ReadOptions(),
             Records("line", [("A", HUGE), ("B", "ok")])),
    "line quoted": ("talk.txt", f'2024/01/01(月)\n10:00\tA\t"{HUGE}\n{HUGE[:9]}"\n', ReadOptions(),
                    Records("line", [("A", f"{HUGE}\n{HUGE[:9]}")])),
    "line unclosed quote": ("talk.txt", f'2024/01/01(月)\n10:00\tA\t"x\n{HUGE}\n', ReadOptions(), Fails("never closes", 2)),
    "line-pc": ("talk.txt", f"2019.12.23 月曜日\n15:16 田村 {HUGE}\n", ReadOptions(speakers=("田村",)),
                Records("line-pc", [("田村", HUGE)])),
    "plain": ("talk.txt", f"A:{HUGE}\nB:ok\n", ReadOptions(), Records("plain", [("A", HUGE), ("B", "ok")])),
    "discord-json": ("export.json", _dce(HUGE), ReadOptions(), Records("discord-json", [("A", HUGE)])),
    "discord-csv": ("export.csv", f'AuthorID,Author,Date,Content,Attachments,Reactions\n"1","A","2024-05-01T12:00:00+09:00",'
                    f'"{HUGE}","",""\n', ReadOptions(), Fails("a field longer than 131,072 characters", 2)),
    "package json": ("messages.json", json.dumps([{"ID": "1", "Timestamp": "2023-05-01 12:34:56", "Contents": HUGE}],
                                                 ensure_ascii=False), ReadOptions(), Records("discord-package", [("(you)", HUGE)])),
    "package csv": ("messages.csv", f'ID,Timestamp,Contents,Attachments\n1,2023-05-01 12:34:56,"{HUGE}",\n', ReadOptions(),
                    Fails("a field longer than 131,072 characters", 2)),
    # No line to point at: nothing in the file looks like any format.
    "one line, no format": ("talk.txt", "x" * len(HUGE.encode()), ReadOptions(), Fails("cannot tell the export format", None)),
}


@pytest.mark.parametrize("name", list(HUGE_EXPORTS))
def test_one_huge_message_gives_a_result_or_a_clear_error_in_bounded_memory(name, tmp_path):
    file_name, content, options, expected = HUGE_EXPORTS[name]
    path = tmp_path / file_name
    path.write_text(content, encoding="utf-8")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        result = read_all(path, None, options)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The file's bytes plus its text once or twice over (UTF-8 -> str, a line or two at a time), not more.
    assert peak < 6 * size, f"{peak / size:.1f}x the file's size in memory"
    if isinstance(expected, Records):
        # A well-formed export with one long message: its records, whole, never an error (whatever it says).
        assert not isinstance(result, ExportError), result
        assert detect_format(path) == expected.fmt
        assert [(r.speaker, r.text) for r in result] == expected.records
    else:
        assert isinstance(result, ExportError), "a malformed export must be refused"
        assert expected.words in result.message and result.path == str(path) and result.line == expected.line, result


# --- found by fuzzing, kept as plain regression tests ------------------------------------------------------


def _dce_bytes(header_name: bytes, content: bytes) -> bytes:
    return (b'{"guild": {"name": "' + header_name + b'"}, "channel": {"id": "1"}, "messages": [{"id": "1", '
            b'"type": "Default", "timestamp": "2024-05-01T12:00:00+09:00", "author": {"name": "A"}, '
            b'"content": "' + content + b'"}]}')


# \xe9 alone is refused by yajl itself; \xed\xb1\xb1 (half of a surrogate pair, as CESU-8 writes it) passes
# yajl and fails in Python's decoding of the string: that one crashed.
@pytest.mark.parametrize(("data", "line", "expected"), [
    (_dce_bytes(b"caf\xe9", b"ok"), None, "invalid JSON before the messages array: lexical error: invalid bytes in UTF8 string."),
    (_dce_bytes(b"ok", b"caf\xe9"), 1, "invalid JSON in message 1: lexical error: invalid bytes in UTF8 string."),
    (_dce_bytes(b"\xed\xb1\xb1", b"ok"), None, r'text before the messages array is not valid UTF-8: bytes ed in "\xed\xb1\xb1"'),
    (_dce_bytes(b"ok", b"caf\xed\xb1\xb1"), 1, r'message 1 holds text that is not valid UTF-8: bytes ed in "caf\xed\xb1\xb1"'),
])
def test_dce_json_with_invalid_utf8_in_a_string(tmp_path, data, line, expected):
    path = tmp_path / "export.json"
    path.write_bytes(data)
    error = read_all(path, None)
    assert isinstance(error, ExportError) and error.message == expected and error.line == line


@pytest.mark.parametrize("time_line", ["24:30\t佐藤\t夜更かし", "99:59\t佐藤\tずっと先"])
def test_line_hours_past_23_run_into_the_next_days(tmp_path, time_line):
    path = tmp_path / "talk.txt"
    path.write_text(f"2024/01/01(月)\n{time_line}\n", encoding="utf-8")
    (record,) = read_all(path, None)
    hours, minutes = map(int, time_line.split("\t")[0].split(":"))
    assert (record.time - record.time.replace(day=1, hour=0, minute=0)).total_seconds() == hours * 3600 + minutes * 60


def test_line_date_at_the_end_of_time_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "talk.txt"
    path.write_text("9999/12/31(金)\n23:59\t佐藤\tまだ\n24:10\t佐藤\tもう無理\n", encoding="utf-8")
    error = read_all(path, None)
    assert isinstance(error, ExportError) and error.line == 3 and "past the year 9999" in error.message


def test_a_zip_member_that_unpacks_to_too_much_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from finetune.importers import discord_package

    monkeypatch.setattr(discord_package, "MAX_MEMBER_BYTES", 1 << 20)  # 1 MiB here; 1 GiB in use
    path = tmp_path / "package.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("Messages/c1/messages.json", b"[" + b" " * (8 << 20) + b"]")  # 8 MiB of spaces: ~8 KiB packed
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        error = read_all(path, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(error, ExportError) and "unpacks to 8,388,610 bytes, over the 1,048,576" in error.message
    assert error.path == f"{path}!/Messages/c1/messages.json" and peak < 1 << 20
