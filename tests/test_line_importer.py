"""LINE importers (mobile `line` and PC `line-pc`), checked record by record and on bad input.

The counts of every fixture are checked by tests/test_inspect_fixtures.py against the hand counts in
`*.expected.json`; here we check what the counts cannot see: exact unescaped texts, times, date
order, tabs, who a system line belongs to, and the errors for files that cannot be read.
All expected values below were worked out by hand from the fixture bytes and FORMATS.md section 1.
"""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(REPO))

from conftest import run_cli  # noqa: E402

from finetune.importers import ReadOptions, open_export  # noqa: E402
from finetune.records import PLACEHOLDER, SYSTEM, TEXT  # noqa: E402

LINE = Path(__file__).parent / "fixtures" / "line"
LINE_PC = Path(__file__).parent / "fixtures" / "line-pc"
BAD = LINE / "bad"
PC_SPEAKERS = ("山口 由美", "田村")


def read(path: Path, fmt: str | None = None, **options):
    got_fmt, records = open_export(path, fmt, ReadOptions(**options))
    return got_fmt, list(records)


def texts(records, kind=TEXT):
    return [(r.speaker, r.text) for r in records if r.kind == kind]


# --------------------------------------------------------------------------- quoted messages


def test_quoted_messages_unescaped():
    fmt, records = read(LINE / "ja_quotes.txt")
    assert fmt == "line"
    assert all(r.kind == TEXT for r in records)
    # trailing newlines are checked separately below; here the content up to them
    assert [(r.speaker, r.text.rstrip("\n")) for r in records] == [
        ("佐藤", "一行目\n二行目"),
        ("鈴木", '彼は"やあ"と言った\nそして帰った'),
        ("佐藤", "これだけ"),
        ("鈴木", "日付みたいな行\n2023/05/02(火)\nも本文"),
        ("佐藤", "メッセージみたいな行\n12:00\t佐藤\thi\nここまで"),
        ("鈴木", "ヘッダーみたいな行\n[LINE] 佐藤とのトーク履歴\n保存日時：2024/03/10 22:41\n\nおわり"),
        ("佐藤", "\n一行目が空"),
        ("鈴木", '引用符だけの行\n"\nと"で終わる行"'),
        ("佐藤", "タブ\t入り\n\t二行目もタブ"),
        ("鈴木", "普通の一行"),
        ("佐藤", "最終行が空"),
        ("鈴木", "最後"),
    ]
    # the date-like line inside the quotes did not change the date; line 32 did
    assert [r.time for r in records] == [datetime(2023, 5, 1, 10, m) for m in range(10)] + [
        datetime(2023, 5, 2, 9, 0),
        datetime(2023, 5, 2, 9, 1),
    ]


def test_quoted_message_keeps_trailing_newline_of_lone_closing_quote():
    # FORMATS.md / brief: a closing quote alone on the next line means the body ends with a newline
    # (which is why `multiline` strips trailing newlines before looking).
    _, records = read(LINE / "ja_quotes.txt")
    assert records[2].text == "これだけ\n"
    assert records[7].text == '引用符だけの行\n"\nと"で終わる行"\n'
    assert records[10].text == "最終行が空\n\n"


def test_quoted_message_records_carry_their_first_line():
    _, records = read(LINE / "ja_quotes.txt")
    assert [r.line for r in records] == [5, 7, 9, 11, 14, 17, 22, 24, 28, 30, 33, 36]


def test_single_line_quotes_are_literal():
    _, records = read(LINE / "single_line_quotes.txt")
    assert texts(records) == [
        ("佐藤", '"hello" he said'),
        ("鈴木", '"ok"'),
        ("佐藤", 'he said "hi'),
        ("鈴木", '"a" and "b"'),
        ("佐藤", 'これは"引用"です'),
        ("佐藤", "最後"),
    ]


# --------------------------------------------------------------------------- line ends, BOM


def test_crlf_with_bare_lf_inside_quotes_and_no_final_newline():
    _, records = read(LINE / "crlf_bare_lf.txt")
    assert all("\r" not in r.text and "\r" not in r.speaker for r in records)
    assert [(r.speaker, r.text, r.kind) for r in records] == [
        ("佐藤", "一行目\n二行目\n三行目", TEXT),
        ("鈴木", "了解", TEXT),
        ("鈴木", "閉じ引用符が次の行\n", TEXT),
        ("佐藤", "[スタンプ]", PLACEHOLDER),
        ("佐藤", "最後は\n改行なし", TEXT),
    ]
    assert records[-1].time == datetime(2024, 3, 10, 8, 1)


def test_no_final_newline():
    _, records = read(LINE / "no_final_newline.txt")
    assert records[-1].speaker == "鈴木"
    assert records[-1].text == "10時で"
    assert records[-1].time == datetime(2024, 3, 9, 10, 2)


def test_bom_is_not_part_of_anything():
    fmt, records = read(LINE / "bom.txt")
    assert fmt == "line"
    assert texts(records) == [("田中", "BOMつき"), ("木村", "了解")]


# --------------------------------------------------------------------------- tabs


def test_tabs_inside_bodies_are_preserved():
    _, records = read(LINE / "tabs_in_body.txt")
    assert texts(records) == [
        ("佐藤", "列1\t列2\t列3"),
        ("鈴木", "\t先頭タブ"),
        ("佐藤", "末尾タブ\t"),
        ("鈴木", "表:\na\tb\nc\td"),
    ]


# --------------------------------------------------------------------------- times and dates


def test_japanese_am_pm_times():
    _, records = read(LINE / "ja_ampm.txt")
    assert [r.time for r in records] == [
        datetime(2023, 5, 1, 0, 15),  # 午前0:15
        datetime(2023, 5, 1, 11, 59),  # 午前11:59
        datetime(2023, 5, 1, 12, 30),  # 午後0:30
        datetime(2023, 5, 1, 23, 5),  # 午後11:05
        datetime(2023, 5, 2, 9, 7),  # 午前9:07
        datetime(2023, 5, 2, 15, 45),  # 午後3:45
    ]


def test_english_am_pm_prefix_times():
    _, records = read(LINE / "en_ampm_prefix.txt")
    assert [r.time for r in records] == [
        datetime(2024, 1, 15, 0, 5),  # AM 12:05
        datetime(2024, 1, 15, 10, 15),  # AM 10:15
        datetime(2024, 1, 15, 12, 30),  # PM 12:30
        datetime(2024, 1, 15, 23, 45),  # PM 11:45
        datetime(2024, 1, 15, 13, 5),  # PM 1:05
    ]
    assert records[-1].text == "back at\nwork"


def test_english_am_pm_suffix_times():
    _, records = read(LINE / "en_ampm_suffix.txt")
    assert [r.time for r in records] == [
        datetime(2024, 8, 5, 0, 5),  # 12:05 AM
        datetime(2024, 8, 5, 9, 30),  # 9:30 AM
        datetime(2024, 8, 5, 12, 30),  # 12:30 PM
        datetime(2024, 8, 5, 23, 59),  # 11:59 PM
    ]


def test_english_date_line_shapes():
    _, records = read(LINE / "en_1to1_paren.txt")  # 2024/01/15(Mon)
    assert records[0].time == datetime(2024, 1, 15, 9, 12)
    assert records[-1].time == datetime(2024, 1, 16, 20, 5)
    _, records = read(LINE / "en_group_spacedow.txt")  # 2021/03/03 Wed
    assert records[0].time == datetime(2021, 3, 3, 19, 0)
    assert records[-1].time == datetime(2021, 3, 4, 8, 3)


def test_mdy_is_the_default_when_no_value_is_over_12():
    _, records = read(LINE / "en_mdy.txt")  # Mon, 08/05/2024
    assert [r.time for r in records] == [
        datetime(2024, 8, 5, 7, 45),
        datetime(2024, 8, 5, 7, 46),
        datetime(2024, 8, 5, 7, 50),
        datetime(2024, 8, 6, 12, 0),
        datetime(2024, 8, 6, 12, 1),
    ]


def test_dmy_decided_by_a_day_over_12_applies_to_the_whole_file():
    # the ambiguous `Mon, 05/02/2024` comes BEFORE the deciding `Fri, 16/02/2024`
    _, records = read(LINE / "en_ddmm.txt")
    assert [r.time for r in records] == [
        datetime(2024, 2, 5, 8, 0),
        datetime(2024, 2, 5, 8, 1),
        datetime(2024, 2, 16, 18, 30),
        datetime(2024, 2, 16, 18, 31),
        datetime(2024, 2, 17, 10, 0),
    ]


def test_saved_on_dotted_time_header_and_dmy_dates():
    _, records = read(LINE / "en_saved_dotted.txt")  # Saved on: 11/04/2018 17.55
    people = [r for r in records if r.kind != SYSTEM]
    assert people[0].time == datetime(2018, 3, 5, 20, 0)
    assert people[1].text == "me too\nslow start though"
    assert people[-1].time == datetime(2018, 4, 10, 19, 30)


@pytest.mark.parametrize(
    ("date_order", "expected"),
    [("auto", datetime(2024, 3, 2, 11, 0)), ("mdy", datetime(2024, 3, 2, 11, 0)), ("dmy", datetime(2024, 2, 3, 11, 0))],
)
def test_ambiguous_dates_follow_the_option(date_order, expected):
    _, records = read(LINE / "en_date_ambiguous.txt", date_order=date_order)
    assert records[0].time == expected


# --------------------------------------------------------------------------- kinds


def test_system_lines_have_no_speaker():
    _, records = read(LINE / "ja_group_system.txt")
    kinds = {r.line: (r.kind, r.speaker) for r in records}
    # 16 (ⓘ notice) and 17 (own unsend) come with a name column but are notices nobody said:
    # records.py says `speaker` is "" for those, like every other system line.
    expected = {line: (SYSTEM, "") for line in (6, 7, 9, 10, 12, 13, 15, 16, 17, 18, 21, 23)}
    expected.update({5: (TEXT, "高橋"), 8: (TEXT, "中村"), 11: (TEXT, "小林"), 14: (TEXT, "中村"), 22: (TEXT, "高橋"), 24: (TEXT, "中村")})
    assert {line: kinds.get(line) for line in expected if kinds.get(line) != expected[line]} == {}
    assert len(records) == 18


def test_english_system_lines_have_no_speaker():
    _, records = read(LINE / "en_group_spacedow.txt")
    system = [r for r in records if r.kind == SYSTEM]
    assert len(system) == 5
    assert all(r.speaker == "" for r in system)


def test_placeholders_keep_their_export_text():
    _, records = read(LINE / "ja_placeholders.txt")
    assert texts(records, PLACEHOLDER)[:3] == [("伊藤", "[スタンプ]"), ("渡辺", "[写真]"), ("渡辺", "[画像]")]
    calls = [r for r in records if r.text.startswith("☎")]
    assert [(r.speaker, r.text, r.kind) for r in calls] == [
        ("伊藤", "☎ 通話時間 1:23", PLACEHOLDER),
        ("渡辺", "☎ 通話時間 1:02:03", PLACEHOLDER),
        ("伊藤", "☎ 不在着信", PLACEHOLDER),
        ("渡辺", "☎ 通話をキャンセルしました", PLACEHOLDER),
        ("伊藤", "☎ 通話に応答がありませんでした", PLACEHOLDER),
    ]


def test_placeholder_inside_typed_text_is_text():
    _, records = read(LINE / "ja_1to1_basic.txt")
    (rec,) = [r for r in records if "って打っちゃった" in r.text]
    assert rec.kind == TEXT


# --------------------------------------------------------------------------- PC "save chat"


def test_pc_names_with_spaces_continuations_and_hour_24():
    fmt, records = read(LINE_PC / "pc_ja.txt", speakers=PC_SPEAKERS)
    assert fmt == "line-pc"
    assert [(r.speaker, r.text.rstrip("\n"), r.kind) for r in records] == [
        ("山口 由美", "来週どうする", TEXT),
        ("田村", "土曜なら空いてる", TEXT),
        ("山口 由美", "じゃあ土曜で\n場所はいつものとこ\n時間は後で決めよう", TEXT),
        ("田村", "[スタンプ]", PLACEHOLDER),
        ("田村", '"引用っぽい\nでも PC版は引用しない"', TEXT),
        ("山口 由美", "まだ起きてた", TEXT),
        ("田村", "おはよう\n\nちょっと空行", TEXT),
        ("山口 由美", "[写真]", PLACEHOLDER),
    ]
    assert records[0].time == datetime(2019, 12, 23, 15, 16)
    assert records[4].time == datetime(2019, 12, 23, 23, 58)
    assert records[5].time == datetime(2019, 12, 24, 0, 53)  # 24:53 on 2019.12.23
    assert records[6].time == datetime(2019, 12, 24, 8, 0)


def test_pc_english_dates():
    _, records = read(LINE_PC / "pc_en.txt", speakers=("Bob Smith", "Alice"))
    assert (records[0].speaker, records[0].text) == ("Bob Smith", "Today I found something:\nApparently there is a parser for chats now!")
    assert records[0].time == datetime(2017, 9, 3, 16, 23)
    assert records[-1].time == datetime(2017, 9, 4, 9, 2)
    assert records[-1].text == "thanks (emoji)"


def test_pc_bom_crlf_no_final_newline():
    fmt, records = read(LINE_PC / "pc_bom_crlf.txt", speakers=PC_SPEAKERS)
    assert fmt == "line-pc"
    assert [(r.speaker, r.text, r.kind) for r in records] == [
        ("山口 由美", "うるう日だね", TEXT),
        ("田村", "4年に1度", TEXT),
        ("山口 由美", "記念に\n何かしよう", TEXT),
        ("田村", "[スタンプ]", PLACEHOLDER),
    ]
    assert records[0].time == datetime(2020, 2, 29, 10, 0)


def test_pc_system_lines_have_no_speaker():
    _, records = read(LINE_PC / "pc_system.txt", speakers=PC_SPEAKERS)
    assert [(r.speaker, r.kind) for r in records] == [("山口 由美", TEXT), ("", SYSTEM), ("", SYSTEM), ("田村", TEXT)]
    assert records[0].text == "新しいグループ作ったよ"


# --------------------------------------------------------------------------- bad input, through the real CLI


def run_inspect(path: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("inspect", "--json", path, *args, timeout=120)


def names_line(stderr: str, path: Path, line: int) -> bool:
    """`FILE:LINE:` as ExportError prints it, or the words `line N` somewhere."""
    return bool(re.search(rf"{re.escape(path.name)}:{line}\b", stderr) or re.search(rf"\bline {line}\b", stderr, re.I))


@pytest.mark.parametrize(
    ("name", "line", "words"),
    [
        ("unclosed_quote.txt", 6, ("quote",)),  # the line where the quote opened
        ("invalid_utf8.txt", 6, ("utf-8", "utf8")),
        ("invalid_utf8_crlf_after_quote.txt", 8, ("utf-8", "utf8")),  # bare LFs inside the quote count as lines
        ("message_before_date.txt", 4, ("date",)),
        ("pc_no_speakers.txt", 2, ("--speakers",)),
    ],
)
def test_bad_input_is_reported_with_file_and_line(name, line, words):
    path = BAD / name
    assert path.exists()
    proc = run_inspect(path)
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr
    assert path.name in err, err
    assert names_line(err, path, line), err
    assert any(w in err.lower() for w in words), err
    assert "Traceback" not in err, err


def test_pc_file_reads_once_speakers_are_given():
    proc = run_inspect(BAD / "pc_no_speakers.txt", "--speakers", "山口 由美,田村")
    assert proc.returncode == 0, proc.stderr
