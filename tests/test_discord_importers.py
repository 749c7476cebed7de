"""Record-level tests of the three Discord importers: DCE JSON, DCE CSV, the data package.

The counts of each fixture are checked by tests/test_inspect_fixtures.py; these tests look
at what the counts cannot show: names, times, reply links, order, text, and errors.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import tracemalloc
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from finetune.importers import ExportError, ReadOptions, open_export
from finetune.importers.discord_json import normalise_iso, parse_iso_datetime
from finetune.records import PLACEHOLDER, SYSTEM, TEXT

FIXTURES = Path(__file__).parent / "fixtures"
DCE_JSON = FIXTURES / "discord-json"
DCE_CSV = FIXTURES / "discord-csv"
PACKAGE = FIXTURES / "discord-package"
JST = timezone(timedelta(hours=9))
UTC = timezone.utc


def read(path, fmt=None, **options):
    return list(open_export(Path(path), fmt, ReadOptions(**options))[1])


def export_error(path, fmt=None, **options) -> ExportError:
    with pytest.raises(ExportError) as info:
        read(path, fmt, **options)
    return info.value


# --- DiscordChatExporter JSON ------------------------------------------------------------------


def test_json_speaker_is_the_account_name_never_the_nickname_or_discriminator():
    assert [r.speaker for r in read(DCE_JSON / "dm_basic.json") if r.kind != SYSTEM] == [
        "yui_sato", "kenta.w", "yui_sato", "kenta.w", "yui_sato", "kenta.w", "yui_sato", "yui_sato", "kenta.w", "yui_sato",
    ]  # fmt: skip
    legacy = read(DCE_JSON / "legacy_escaped_bom_crlf.json")
    assert {r.speaker for r in legacy if r.kind != SYSTEM} == {"Aoi", "Ren"}  # not あおい, not Aoi#4821


def test_json_times_keep_the_offset_and_read_7_digit_and_short_fractions():
    records = read(DCE_JSON / "dm_basic.json")
    assert records[0].time == datetime(2024, 5, 3, 21, 16, 10, 600000, tzinfo=JST)  # .6
    assert records[1].time == datetime(2024, 5, 3, 21, 17, 2, 379000, tzinfo=JST)  # .3790000
    assert records[3].time == datetime(2024, 5, 3, 21, 18, 30, 250000, tzinfo=JST)  # .25
    assert all(r.time.utcoffset() == timedelta(hours=9) for r in records)
    legacy = read(DCE_JSON / "legacy_escaped_bom_crlf.json")
    assert legacy[0].time == datetime(2020, 3, 5, 13, 31, 5, 123456, tzinfo=UTC)  # .1234567: the 100 ns digit dropped
    assert legacy[1].time == datetime(2020, 3, 5, 13, 32, tzinfo=UTC)  # Z
    assert legacy[2].time == datetime(2020, 3, 5, 13, 40, 59, 999999, tzinfo=UTC)  # .9999999 truncated, not rounded up


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2023-09-23T13:15:48.3790000+03:00", "2023-09-23T13:15:48.379000+03:00"),
        ("2024-05-03T21:16:10.6+09:00", "2024-05-03T21:16:10.600000+09:00"),
        ("2020-01-01T00:00:00Z", "2020-01-01T00:00:00+00:00"),
        ("2023-05-01T12:34:56.1-0500", "2023-05-01T12:34:56.100000-05:00"),
        ("2023-05-01 12:34:56", "2023-05-01 12:34:56"),
    ],
)
def test_iso_normalisation_gives_what_python_3_10_fromisoformat_reads(text, expected):
    # Python 3.10's fromisoformat takes only 6 (or 3) fraction digits and +HH:MM; normalise_iso is its fallback.
    normalised = normalise_iso(text)
    assert normalised == expected
    assert re.fullmatch(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d{6})?([+-]\d\d:\d\d)?", normalised)
    assert datetime.fromisoformat(normalised) == parse_iso_datetime(text)


def test_json_reply_to_points_at_the_answered_message_and_only_for_replies():
    records = read(DCE_JSON / "dm_basic.json")
    by_id = {r.message_id: r for r in records}
    assert by_id["1200000000000000002"].reply_to == "1200000000000000001"
    assert by_id["1200000000000000007"].reply_to == "1200000000000000006"
    assert by_id["1200000000000000001"].reply_to is None
    pin = by_id["1200000000000000011"]  # a pin notice carries a reference to the pinned message: not a reply
    assert (pin.kind, pin.speaker, pin.reply_to) == (SYSTEM, "", None)
    legacy = read(DCE_JSON / "legacy_escaped_bom_crlf.json")
    assert legacy[2].reply_to == "680000000000000002"  # type "19": Reply in DCE versions that lacked the name


def test_json_every_notice_type_is_system_and_commands_are_messages():
    records = read(DCE_JSON / "guild_system_types.json")
    assert [(r.kind, r.speaker, r.text) for r in records] == [
        (SYSTEM, "", "Joined the server."),
        (TEXT, "haruto_k", "はじめまして！"),
        (SYSTEM, "", "Pinned a message."),
        (SYSTEM, "", "Added mio_t to the group."),
        (SYSTEM, "", "Left the group."),
        (SYSTEM, "", "Started a call that lasted 3 minutes."),
        (SYSTEM, "", "Changed the channel name: 雑談2"),
        (SYSTEM, "", "Changed the channel icon."),
        (SYSTEM, "", "Started a thread."),
        (SYSTEM, "", "[46]"),  # a type DCE could not name, with no fallback text
        (TEXT, "DiceBot", "🎲 6"),
        (PLACEHOLDER, "DiceBot", "[embed]"),
        (TEXT, "mio_t", "ありがとう"),
        (TEXT, "mio_t", "Joined the server."),  # a person typed it: the type decides, not the words
        (SYSTEM, "", "[AutoModerationAction]"),
        (SYSTEM, "", "Added a recipient."),
    ]
    assert records[12].reply_to == "1300000000000000002"
    assert records[8].reply_to is None  # ThreadCreated's reference has no messageId


def test_json_surrogate_pair_escapes_become_real_emoji():
    records = read(DCE_JSON / "dm_basic.json")
    assert records[1].text == "午後から空いてるよ 😀"
    assert records[9].text == "👍"
    legacy = read(DCE_JSON / "legacy_escaped_bom_crlf.json")
    assert legacy[0].text == "こんにちは"
    assert legacy[1].text == "🌸🌸"
    assert legacy[2].text == "またね\nおやすみ"
    for r in records + legacy:
        r.text.encode("utf-8")  # a lone surrogate would raise here


def test_json_placeholders_say_what_was_sent_instead_of_text():
    records = read(DCE_JSON / "dm_basic.json")
    assert [(r.kind, r.text) for r in records if r.kind == PLACEHOLDER] == [
        (PLACEHOLDER, "[attachment: photo.jpg]"),
        (PLACEHOLDER, "[sticker: Wave]"),
        (PLACEHOLDER, "[embed]"),
        (PLACEHOLDER, ""),  # whitespace-only content and nothing attached
    ]


def test_json_chat_is_the_channel_id_and_line_the_message_index():
    records = read(DCE_JSON / "dm_basic.json")
    assert {r.chat for r in records} == {"1122334455667788"}
    assert [r.line for r in records] == list(range(1, 13))
    assert records[0].message_id == "1200000000000000001"


def _big_dce_export(path: Path, count: int) -> None:
    header = '{"guild":{"id":"1","name":"g","iconUrl":""},"channel":{"id":"42","type":"GuildTextChat","name":"c"},"messages":['
    message = (
        '{{"id":"{i}","type":"Default","timestamp":"2024-01-01T00:00:00.1234567+09:00","isPinned":false,'
        '"content":"message {i} \\ud83d\\ude00 とても長い本文がここに続きます。","author":{{"id":"7","name":"user{u}",'
        '"discriminator":"0000","nickname":"Nick","isBot":false,"roles":[],"avatarUrl":"https://cdn.discordapp.com/a.png"}},'
        '"attachments":[],"embeds":[],"stickers":[],"reactions":[],"mentions":[],"inlineEmojis":[]}}'
    )
    body = ",".join(message.format(i=i, u=i % 3) for i in range(count))
    path.write_text(header + body + f'],"messageCount":{count}}}', encoding="utf-8")


def test_json_is_streamed_records_arrive_before_the_file_is_read_and_memory_stays_small(tmp_path):
    path = tmp_path / "big.json"
    _big_dce_export(path, 25_000)
    size = path.stat().st_size
    assert size > 10_000_000
    progress: list[int] = []
    _, records = open_export(path, None, ReadOptions(on_progress=progress.append))
    first = next(records)
    assert first.text.startswith("message 0 😀")
    assert max(progress, default=0) < size // 4  # the first record came long before the end of the file
    # 6000 messages are 2.5 MB of JSON; holding them (as dicts or records) would take several MB.
    tracemalloc.start()
    window = sum(1 for _ in itertools.islice(records, 6000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert window == 6000 and peak < 1_500_000
    assert 1 + window + sum(1 for _ in records) == 25_000
    assert progress[-1] == size and progress == sorted(progress)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_json_truncated_file_names_the_message_it_stops_in(tmp_path):
    full = (DCE_JSON / "dm_basic.json").read_text(encoding="utf-8")
    cut = full.index('"id": "1200000000000000003"') + 40  # in the middle of message 3
    path = _write(tmp_path / "cut.json", full[:cut])
    error = export_error(path)
    assert str(error) == f"{path}:3: the file ends inside message 3 (truncated export? 2 complete messages were read)"


def test_json_malformed_message_names_its_index(tmp_path):
    good = (
        '{"id": "1", "type": "Default", "timestamp": "2024-01-01T00:00:00Z", "content": "a", "author": {"name": "x"}}'
    )
    path = _write(tmp_path / "bad.json", f'{{"channel": {{"id": "5"}}, "messages": [{good}, {{"id": "2",}}]}}')
    error = export_error(path)
    assert error.line == 2
    assert str(error).startswith(f"{path}:2: invalid JSON in message 2: parse error: invalid object key")


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"guild": {}, "channel": {}, "data": []}',
            'has no "messages" array at the top level; expected a DiscordChatExporter JSON export',
        ),
        (
            '{"messages": {"a": 1}}',
            '"messages" is a JSON map, not an array; expected a DiscordChatExporter JSON export',
        ),
        (
            '[{"ID": 1, "Timestamp": "2023-05-01 12:00:00", "Contents": "hi"}]',
            "is a JSON array, not a DiscordChatExporter export (a data-package messages.json? try --format discord-package)",
        ),
        ('"just a string"', "holds a single JSON value; expected a DiscordChatExporter JSON export"),
        ('{"channel": {"id": "1"}, "messa', "invalid JSON before the messages array: parse error: premature EOF"),
    ],
)
def test_json_that_is_not_a_dce_export_says_what_was_expected(tmp_path, content, message):
    path = _write(tmp_path / "x.json", content)
    error = export_error(path, "discord-json")
    assert error.path == str(path) and error.line is None
    assert error.message.startswith(message)


@pytest.mark.parametrize(
    "message, expected",
    [
        (
            '{"id": "1", "type": "Default", "timestamp": "2024-01-01T00:00:00Z", "content": "a"}',
            'message 2 has no "author"',
        ),
        (
            '{"id": "1", "type": "Default", "timestamp": "2024-01-01T00:00:00Z", "author": {"nickname": "n"}}',
            'message 2 has no "author.name"',
        ),
        ('{"id": "1", "type": "Default", "author": {"name": "a"}}', 'message 2 has no "timestamp"'),
        (
            '{"id": "1", "type": "Default", "timestamp": "yesterday", "author": {"name": "a"}}',
            "message 2: timestamp 'yesterday' is not an ISO 8601 date",
        ),
        ("42", "message 2 is a JSON int, expected an object"),
    ],
)
def test_json_message_missing_a_field_is_an_error_at_that_message(tmp_path, message, expected):
    good = (
        '{"id": "0", "type": "Default", "timestamp": "2024-01-01T00:00:00Z", "content": "ok", "author": {"name": "a"}}'
    )
    path = _write(tmp_path / "x.json", f'{{"channel": {{"id": "5"}}, "messages": [{good}, {message}]}}')
    error = export_error(path)
    assert (error.path, error.line) == (str(path), 2)
    assert error.message.startswith(expected)


# --- DiscordChatExporter CSV -------------------------------------------------------------------


def test_csv_fields_quotes_newlines_and_physical_lines():
    records = read(DCE_CSV / "modern_iso_crlf.csv")
    assert records[1].text == 'He said "hi" to me'
    assert records[2].text == "行き先:\n1. 鎌倉\n2. 箱根"
    assert records[13].text == '引用:\n"ok"\n'  # CRLF inside the quotes read as LF
    assert records[14].text == "😀"
    # The header is line 1; the 3-line record 3 starts on line 4, so record 4 starts on line 7.
    assert [r.line for r in records[:5]] == [2, 3, 4, 7, 8]
    assert records[-1].line == 21  # header + 16 records, two of them 3 lines long


def test_csv_iso_dates_keep_their_offset():
    records = read(DCE_CSV / "modern_iso_crlf.csv")
    plus3 = timezone(timedelta(hours=3))
    assert records[0].time == datetime(2023, 9, 23, 13, 15, 48, 379000, tzinfo=plus3)
    assert records[3].time == datetime(2023, 9, 23, 13, 18, 0, 500000, tzinfo=plus3)


def test_csv_notices_are_recognised_only_by_their_exact_text():
    records = read(DCE_CSV / "modern_iso_crlf.csv")
    assert [r.text for r in records if r.kind == SYSTEM] == [
        "Joined the server.", "Pinned a message.", "Started a call that lasted 1,234 minutes.",
        "Added mio_t to the group.", "Left the group.", "Changed the channel name: 旅行", "Started a call.",
    ]  # fmt: skip
    assert all(r.speaker == "" for r in records if r.kind == SYSTEM)
    texts = {r.text: r.kind for r in records if r.kind != SYSTEM}
    assert texts["Pinned a message. Then I left."] == TEXT
    assert texts["Joined the server."] == TEXT  # that one has an attachment
    placeholders = [(r.speaker, r.text) for r in records if r.kind == PLACEHOLDER]
    assert placeholders == [("kenta.w", "[attachment: photo.jpg]"), ("kenta.w", "")]


# Signed CDN URLs as Discord has handed them out since late 2023 (ex/is/hm query), the shape DCE writes.
_SIGNED = "?ex=65f1c2a0&is=65df4da0&hm=3f9a1c0e5b7d2a4c6e8f0a1b3c5d7e9f1a2b3c4d5e6f708192a3b4c5d6e7f809&"


def test_csv_attachments_are_split_on_commas_only_as_dce_joins_them(tmp_path):
    cdn = ",".join(f"https://cdn.discordapp.com/attachments/1400000000000000001/150000000000000000{i}/{name}{_SIGNED}"
                   for i, name in ((1, "IMG_2041.jpg"), (2, "voice-message.ogg")))
    # With --media DCE writes the downloaded files' paths instead: relative to the export, with its file name
    # in them (spaces), and Windows' separator on Windows.
    folder = "Friends - general [1400000000000000001].csv_Files"
    media = f"{folder}/IMG_2041-5F3A2.jpg,{folder}/voice-message-0A9B3.ogg"
    windows = media.replace("/", "\\")
    path = _csv(tmp_path, *(f'"1","kenta.w","2024-03-01T21:05:00+09:00","","{attachments}",""'
                            for attachments in (cdn, media, windows)))
    assert [r.text for r in read(path)] == [
        "[attachment: IMG_2041.jpg, voice-message.ogg]",
        "[attachment: IMG_2041-5F3A2.jpg, voice-message-0A9B3.ogg]",
        "[attachment: IMG_2041-5F3A2.jpg, voice-message-0A9B3.ogg]",
    ]


def test_csv_legacy_discriminators_and_default_dce_dates():
    records = read(DCE_CSV / "legacy_localized.csv")
    assert [r.speaker for r in records] == ["Aoi", "Ren", "Aoi", "Ren", "", "Kaito"]
    assert records[5].text == "よろしく #1234"
    assert [r.time for r in records] == [
        datetime(2020, 3, 5, 22, 31),
        datetime(2020, 3, 5, 22, 32),
        datetime(2020, 3, 5, 23, 58),
        datetime(2020, 3, 6, 0, 3),  # 12:03 AM
        datetime(2020, 3, 6, 8, 15),
        datetime(2020, 3, 6, 12, 0),  # 12:00 PM
    ]


def test_csv_numeric_dates_take_their_order_from_the_first_date_that_tells():
    us = read(DCE_CSV / "us_locale_dates.csv")
    assert [r.time for r in us] == [
        datetime(2021, 3, 5, 9, 5), datetime(2021, 3, 5, 9, 7), datetime(2021, 3, 15, 22, 0), datetime(2021, 4, 1, 0, 30),
    ]  # fmt: skip
    gb = read(DCE_CSV / "en_gb_dates.csv")
    assert [r.time for r in gb] == [
        datetime(2021, 3, 5, 21, 5), datetime(2021, 3, 5, 21, 7), datetime(2021, 3, 23, 8, 0), datetime(2021, 4, 1, 0, 30),
    ]  # fmt: skip


def test_csv_date_order_option_wins_and_a_contradiction_is_reported():
    error = export_error(DCE_CSV / "us_locale_dates.csv", date_order="dmy")
    assert str(error) == (
        f"{DCE_CSV / 'us_locale_dates.csv'}:4: date '3/15/2021 10:00 PM' is not a valid date "
        "(read day/month as decided by --date-order)"
    )


HEADER = "AuthorID,Author,Date,Content,Attachments,Reactions\n"


def _csv(tmp_path, *rows: str, header: str = HEADER) -> Path:
    return _write(tmp_path / "export.csv", header + "".join(r + "\n" for r in rows))


def test_csv_undecidable_numeric_dates_default_to_month_first(tmp_path):
    path = _csv(tmp_path, '"1","a","3/5/2021 21:05","x","",""', '"1","a","4/6/2021 21:05","y","",""')
    assert [r.time for r in read(path)] == [datetime(2021, 3, 5, 21, 5), datetime(2021, 4, 6, 21, 5)]


@pytest.mark.parametrize(
    "date, expected",
    [
        ("05.03.2020 22:31", datetime(2020, 3, 5, 22, 31)),  # de-DE: dotted dates are day first
        ("2020/03/05 22:31", datetime(2020, 3, 5, 22, 31)),  # ja-JP
        ("5-Mar-2020 10:31:05 pm", datetime(2020, 3, 5, 22, 31, 5)),
        ("2020-03-05 22:31:00", datetime(2020, 3, 5, 22, 31)),
    ],
)
def test_csv_other_localized_dates(tmp_path, date, expected):
    path = _csv(tmp_path, f'"1","a","{date}","x","",""')
    assert read(path)[0].time == expected


def test_csv_oldest_semicolon_export_without_author_id(tmp_path):
    path = _write(
        tmp_path / "old.csv", 'Author;Date;Content;Attachments;\n"Aoi#4821";"05-Mar-18 10:31 PM";"a; b";"";\n'
    )
    [record] = read(path)
    assert (record.speaker, record.text, record.time) == ("Aoi", "a; b", datetime(2018, 3, 5, 22, 31))


def test_csv_wrong_header(tmp_path):
    path = _csv(tmp_path, '"1","a","2021-01-01T00:00:00+00:00","x"', header="ID,Author,When,Text\n")
    assert str(export_error(path, "discord-csv")) == (
        f"{path}:1: expected the DiscordChatExporter CSV header AuthorID,Author,Date,Content,Attachments,Reactions, "
        "found 'ID,Author,When,Text'"
    )


def test_csv_wrong_column_count_names_the_line(tmp_path):
    path = _csv(
        tmp_path, '"1","a","2021-01-01T00:00:00+00:00","x\ny","",""', '"1","a","2021-01-01T00:00:00+00:00","x",""'
    )
    assert str(export_error(path)) == f"{path}:4: expected 6 columns like the header, found 5"


def test_csv_unparseable_date_names_line_and_text(tmp_path):
    path = _csv(tmp_path, '"1","a","2021-01-01T00:00:00+00:00","x","",""', '"1","a","yesterday 10:00","x","",""')
    error = export_error(path)
    assert (error.path, error.line) == (str(path), 3)
    assert error.message.startswith("unrecognised date 'yesterday 10:00'; expected ISO 8601")


def test_csv_unclosed_quote_is_malformed(tmp_path):
    path = _csv(
        tmp_path,
        '"1","a","2021-01-01T00:00:00+00:00","x","",""',
        '"1","a","2021-01-01T00:00:00+00:00","never closed,"",""',
    )
    error = export_error(path)
    assert (error.path, error.line) == (str(path), 3)
    assert error.message.startswith("malformed CSV record: unexpected end of data")


def test_csv_mixing_dates_with_and_without_offset_is_an_error(tmp_path):
    path = _csv(tmp_path, '"1","a","2021-01-01T00:00:00+00:00","x","",""', '"1","a","05-Mar-20 10:31 PM","x","",""')
    assert (
        str(export_error(path))
        == f"{path}:3: date '05-Mar-20 10:31 PM' mixes dates with and without a UTC offset in one file"
    )


# --- Discord data package ----------------------------------------------------------------------


def _essentials(records):
    return [(r.speaker, r.time, r.text, r.kind, r.chat, r.message_id) for r in records]


CURRENT = [
    ("yui_sato", datetime(2023, 5, 1, 12, 30, tzinfo=UTC), "おはよう\nいま起きた", TEXT, "111", "1001"),
    (
        "yui_sato",
        datetime(2023, 5, 1, 12, 35, 10, tzinfo=UTC),
        "[attachment: photo.jpg, clip.mp4]",
        PLACEHOLDER,
        "111",
        "1002",
    ),
    ("yui_sato", datetime(2023, 5, 1, 12, 40, tzinfo=UTC), "またね", TEXT, "111", "1003"),
    ("yui_sato", datetime(2023, 6, 2, 8, 0, tzinfo=UTC), "", PLACEHOLDER, "222", "2001"),  # same second: ID decides
    ("yui_sato", datetime(2023, 6, 2, 8, 0, tzinfo=UTC), "Meeting at 10:00 😀", TEXT, "222", "2002"),
]


def test_package_folder_is_sorted_oldest_first_channel_by_channel():
    records = read(PACKAGE / "package_current")
    assert _essentials(records) == CURRENT
    assert [r.line for r in records] == [3, 2, 1, 2, 1]  # index in the newest-first file
    assert all(r.reply_to is None for r in records)


def test_package_can_be_given_as_its_messages_folder_a_channel_folder_or_one_file():
    root = PACKAGE / "package_current"
    assert _essentials(read(root / "Messages")) == CURRENT
    assert _essentials(read(root / "Messages" / "c111")) == CURRENT[:3]
    assert _essentials(read(root / "Messages" / "c222" / "messages.json")) == CURRENT[3:]  # owner still found


def test_package_legacy_lowercase_csv_and_channel_folders_without_c():
    records = read(PACKAGE / "package_legacy")
    assert _essentials(records) == [
        ("Aoi", datetime(2021, 3, 5, 12, 30, tzinfo=UTC), 'He said "ok"', TEXT, "555", "5001"),
        ("Aoi", datetime(2021, 3, 5, 12, 35, 0, 500000, tzinfo=UTC), "[attachment: a.png]", PLACEHOLDER, "555", "5002"),
        ("Aoi", datetime(2021, 3, 5, 12, 40, 0, 123000, tzinfo=UTC), "複数行の\nメッセージ", TEXT, "555", "5003"),
        ("Aoi", datetime(2020, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "Happy new year soon", TEXT, "666", "6001"),
    ]
    assert [r.line for r in records] == [5, 4, 2, 2]  # physical line where each CSV record starts


def test_package_zip_is_read_in_place_even_inside_a_wrapper_folder(tmp_path):
    root = PACKAGE / "package_current"
    zipped = tmp_path / "package.zip"
    with zipfile.ZipFile(zipped, "w") as archive:
        for file in sorted(root.rglob("*")):
            if file.is_file():
                archive.write(file, "discord-data/" + file.relative_to(root).as_posix())
    assert _essentials(read(zipped)) == CURRENT
    assert list(tmp_path.iterdir()) == [zipped]  # nothing was extracted


def test_package_without_account_speaks_as_you(tmp_path):
    shutil.copytree(PACKAGE / "package_current" / "Messages", tmp_path / "Messages")
    assert {r.speaker for r in read(tmp_path)} == {"(you)"}


def test_committed_zip_fixture():
    assert _essentials(read(PACKAGE / "package.zip")) == [
        ("kenta.w", datetime(2024, 2, 3, 9, 59, tzinfo=UTC), "駅に着いたら連絡するね", TEXT, "777", "7001"),
        ("kenta.w", datetime(2024, 2, 3, 10, 0, 1, tzinfo=UTC), "了解 👍", TEXT, "777", "7002"),
        ("kenta.w", datetime(2024, 2, 3, 10, 0, 2, tzinfo=UTC), "[attachment: map.png]", PLACEHOLDER, "777", "7003"),
    ]


def test_package_folder_without_messages(tmp_path):
    (tmp_path / "Messages" / "c1").mkdir(parents=True)
    (tmp_path / "Messages" / "c1" / "channel.json").write_text('{"id": "1"}', encoding="utf-8")
    assert str(export_error(tmp_path)) == (
        f"{tmp_path}: found no Messages/c<id>/messages.json or messages.csv inside; expected a Discord data package "
        "(folder or .zip) with Messages/c<id>/messages.json or messages.csv, its Messages folder, or one "
        "messages.json / messages.csv"
    )


def test_corrupt_zip(tmp_path):
    path = tmp_path / "package.zip"
    path.write_bytes((PACKAGE / "package.zip").read_bytes()[:300])  # an interrupted download
    assert str(export_error(path)) == (
        f"{path}: is not a readable zip archive (damaged or incomplete download?): File is not a zip file"
    )


def test_damaged_zip_member_is_named(tmp_path):
    path = tmp_path / "package.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(
            "Messages/c9/messages.json", '[{"ID": "1", "Timestamp": "2024-01-01 00:00:00", "Contents": "abc"}]'
        )
    data = bytearray(path.read_bytes())
    data[data.index(b'"abc"') + 1] ^= 0xFF  # flip a byte of the stored member: its CRC no longer matches
    path.write_bytes(bytes(data))
    error = export_error(path)
    assert error.path == f"{path}!/Messages/c9/messages.json"
    assert error.message.startswith("cannot read this member of the zip (damaged archive?): Bad CRC-32")


@pytest.mark.parametrize(
    "messages, line, expected",
    [
        (
            '[{"ID": "1", "Timestamp": "2024-01-01 00:00:00", "Contents": "a"}, {"ID": "2", "Contents": "b"}]',
            2,
            'message 2 has no "Timestamp"',
        ),
        (
            '[{"ID": "1", "Timestamp": "soon", "Contents": "a"}]',
            1,
            "Timestamp 'soon' is not a date like 2023-05-01 12:34:56",
        ),
        ('{"ID": "1"}', None, 'expected a JSON array of {"ID", "Timestamp", "Contents", "Attachments"} objects'),
        ('[{"ID": "1",\n "Timestamp": }]', 2, "invalid JSON: Expecting value (column 15)"),
    ],
)
def test_package_bad_messages_json(tmp_path, messages, line, expected):
    path = tmp_path / "Messages" / "c5" / "messages.json"
    path.parent.mkdir(parents=True)
    _write(path, messages)
    error = export_error(tmp_path)
    assert (error.path, error.line) == (str(path), line)
    assert error.message.startswith(expected)


@pytest.mark.parametrize("layout", ["Messages/c333/messages.json", "messages/c333/messages.csv"])
def test_package_attachments_are_split_on_spaces_as_the_package_writes_them(tmp_path, layout):
    # The package's Attachments holds a message's URLs separated by a space (the parsers of real packages split on
    # whitespace); the URLs are signed like any CDN link since late 2023, and a comma is part of a name there.
    attachments = " ".join(f"https://cdn.discordapp.com/attachments/333/{i}/{name}{_SIGNED}"
                           for i, name in ((1, "IMG_2041.jpg"), (2, "menu,_page_2.png")))
    path = tmp_path / layout
    path.parent.mkdir(parents=True)
    if path.suffix == ".json":
        _write(path, json.dumps([{"ID": "3001", "Timestamp": "2024-03-01 12:05:00", "Contents": "",
                                  "Attachments": attachments}]))
    else:
        _write(path, f'ID,Timestamp,Contents,Attachments\n3001,2024-03-01 12:05:00,,"{attachments}"\n')  # quoted: a comma
    [record] = read(tmp_path)
    assert (record.kind, record.text) == (PLACEHOLDER, "[attachment: IMG_2041.jpg, menu,_page_2.png]")


def test_package_legacy_csv_with_wrong_header(tmp_path):
    path = tmp_path / "messages" / "c5" / "messages.csv"
    path.parent.mkdir(parents=True)
    _write(path, "id,date,text\n1,2020-01-01 00:00:00,hi\n")
    assert (
        str(export_error(tmp_path))
        == f"{path}:1: expected the header ID,Timestamp,Contents,Attachments, found 'id,date,text'"
    )


def test_detection_of_package_shapes(tmp_path):
    channel = tmp_path / "c123"
    channel.mkdir()
    _write(channel / "messages.csv", "ID,Timestamp,Contents,Attachments\n1,2020-01-01 00:00:00+00:00,hi,\n")
    fmt, records = open_export(channel)
    assert fmt == "discord-package"
    assert _essentials(records) == [("(you)", datetime(2020, 1, 1, tzinfo=UTC), "hi", TEXT, "123", "1")]
    assert open_export(channel / "messages.csv")[0] == "discord-package"
    json_file = _write(
        tmp_path / "renamed.json", json.dumps([{"ID": 1, "Timestamp": "2020-01-01 00:00:00", "Contents": "x"}])
    )
    fmt, records = open_export(json_file)
    assert (fmt, [r.chat for r in records]) == ("discord-package", [""])  # no channel folder around it


def test_csv_bytes_that_are_not_utf8_are_located(tmp_path):
    path = tmp_path / "export.csv"
    path.write_bytes(
        (HEADER + '"1","a","2021-01-01T00:00:00+00:00","ok","",""\n').encode()
        + '"1","a","2021-01-01T00:00:00+00:00","こんにちは","",""\n'.encode("cp932")
    )
    error = export_error(path)
    assert (error.path, error.line) == (str(path), 3)
    assert "are not valid utf-8 (re-saved on Japanese Windows? try --encoding cp932)" in error.message
    progress: list[int] = []
    records = read(path, encoding="cp932", on_progress=progress.append)
    assert [r.text for r in records] == ["ok", "こんにちは"]
    assert progress[-1] == path.stat().st_size


# --- exports bunshin does not read: named, with what to export instead ---

UNREAD = FIXTURES / "unread"


@pytest.mark.parametrize(("name", "kind"), [
    ("dce_current.html", "DiscordChatExporter HTML export"),  # today's template (preamble__, chatlog__)
    ("dce_2x.html", "DiscordChatExporter HTML export"),  # 2.x (info__, chatlog__)
    ("dce_first.html", "DiscordChatExporter HTML export"),  # the first versions ("Discord Chat Log", msg-user)
    ("dce.txt", "DiscordChatExporter plain-text export"),
    ("dce_2x.txt", "DiscordChatExporter plain-text export"),
])
def test_a_dce_export_bunshin_does_not_read_says_to_export_json_or_csv(cli, name, kind):
    path = UNREAD / name
    proc = cli("inspect", path)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr == (f"error: {path}: is a {kind}, which bunshin does not read: export it again as JSON "
                           "(`-f Json`: best, keeps replies) or CSV (`-f Csv`), which bunshin reads\n")


def test_another_html_page_is_named_as_html():
    error = export_error(UNREAD / "saved_page.html")
    assert error.line is None and error.message.startswith("is an HTML page, not a chat export bunshin reads; expected")


def test_prepare_with_a_dce_html_export_among_the_inputs_writes_nothing(cli, tmp_path):
    out = tmp_path / "out"
    proc = cli("prepare", DCE_JSON / "dm_basic.json", UNREAD / "dce_current.html", "--persona", "misaki", "--out", out)
    assert proc.returncode == 1 and "dce_current.html: is a DiscordChatExporter HTML export" in proc.stderr, proc.stderr
    assert not out.exists()
