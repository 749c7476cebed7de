"""LINE importers (mobile `line` and PC `line-pc`), checked record by record and on bad input.

The counts of every fixture are checked by tests/test_inspect_fixtures.py against the hand counts in
`*.expected.json`; here we check what the counts cannot see: exact unescaped texts, times, date
order, tabs, who a system line belongs to, and the errors for files that cannot be read.
All expected values below were worked out by hand from the fixture bytes.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from conftest import run_cli

from finetune.importers import ReadOptions, SpeakersNeeded, open_export, speakers_flag
from finetune.importers.line_shapes import PC_BARE_PLACEHOLDERS, is_pc_bare_placeholder
from finetune.records import PLACEHOLDER, SYSTEM, TEXT

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
    # A closing quote alone on the next line means the body ends with a newline
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


# --------------------------------------------------------------------------- PC bare words, titled items


def test_pc_japanese_ui_words_are_placeholders_only_as_whole_messages():
    _, records = read(LINE_PC / "pc_ja_ui_words.txt", speakers=PC_SPEAKERS)
    assert [(r.line, r.speaker, r.text, r.kind) for r in records] == [
        (2, "山口 由美", "今日の写真送るね", TEXT),
        (3, "山口 由美", "写真", PLACEHOLDER),
        (4, "山口 由美", "写真", PLACEHOLDER),
        (5, "田村", "スタンプ", PLACEHOLDER),
        (6, "田村", "ありがとう！", TEXT),
        (7, "山口 由美", "動画", PLACEHOLDER),
        (8, "田村", "ファイル", PLACEHOLDER),
        (9, "田村", "画像", PLACEHOLDER),
        (10, "山口 由美", "GIF", PLACEHOLDER),
        (13, "山口 由美", "通話時間 0:12", PLACEHOLDER),
        (14, "田村", "通話時間 1:02:03", PLACEHOLDER),
        (15, "山口 由美", "不在着信", PLACEHOLDER),
        (16, "田村", "通話をキャンセルしました", PLACEHOLDER),
        (17, "山口 由美", "通話に応答がありませんでした", PLACEHOLDER),
        (18, "田村", "☎ 通話時間 0:48", PLACEHOLDER),
        (19, "", "田村が通話をかけました", SYSTEM),
        # A bare word with a continuation line was typed: the kind is decided on the whole message.
        (20, "田村", "写真\n見てほしいのは2枚目", TEXT),
        (22, "山口 由美", "写真！", TEXT),
        (23, "田村", "スタンプ送って", TEXT),
        (24, "山口 由美", "通話時間 長すぎ", TEXT),
        (25, "田村", "おやすみ", TEXT),
    ]
    assert records[-1].time == datetime(2024, 3, 11, 0, 10)


def test_pc_english_ui_words_are_placeholders_only_as_whole_messages():
    _, records = read(LINE_PC / "pc_en_ui_words.txt", speakers=("Mika Tanaka", "Joe"))
    by_kind = {kind: [r.text for r in records if r.kind == kind] for kind in (TEXT, PLACEHOLDER, SYSTEM)}
    assert by_kind[PLACEHOLDER] == [
        "Photos", "Photos", "Stickers", "Videos", "File", "Files", "Audio", "Call time 0:12", "Call time 1:02:03",
        "Missed call", "Canceled", "No answer", "☎ Canceled call", "Added a new note", "Deleted an album",
    ]
    assert by_kind[TEXT] == [
        "look what I found", "Photos\nfrom the trip, more tomorrow", "Photos?", "stickers", "Call time was long",
        "Canceled. See you Monday",
    ]
    assert by_kind[SYSTEM] == []


def test_pc_titled_items_keep_their_title_and_following_lines():
    _, records = read(LINE_PC / "pc_titled_items.txt", speakers=PC_SPEAKERS)
    assert [(r.line, r.speaker, r.text, r.kind) for r in records] == [
        (2, "山口 由美", "[投票] 次の集合場所どこにする", PLACEHOLDER),
        (3, "田村", "[オープンチャットのノートをシェアしました。] 四月の予定\n4/6 花見\n4/20 バーベキュー", PLACEHOLDER),
        (6, "山口 由美", "[投票]って何？", TEXT),
        (7, "田村", "[ノート] 持ち物リスト", PLACEHOLDER),
        (8, "山口 由美", "[イベント] 誕生日会", PLACEHOLDER),
        # Before, these two notices ran on as continuation lines of the typed text above them.
        (9, "", "山口 由美がノートを作成しました", SYSTEM),
        (10, "", "田村がアルバムに写真を追加しました", SYSTEM),
        (11, "田村", "[Poll] LivePreview VS LiveServer", PLACEHOLDER),
        (12, "山口 由美", "投票しといた", TEXT),
    ]


def test_mobile_titled_items_are_placeholders_quoted_or_not():
    _, records = read(LINE / "ja_titled_items.txt")
    assert [(r.line, r.speaker, r.text, r.kind) for r in records] == [
        (5, "高橋", "[投票] 次の山はどこにする", PLACEHOLDER),
        (6, "", "高橋が投票を作成しました。", SYSTEM),
        (7, "中村", "[オープンチャットのノートをシェアしました。] 四月の予定", PLACEHOLDER),
        (8, "小林", "[ノート] 持ち物リスト\n水筒\n雨具", PLACEHOLDER),
        (11, "中村", "[投票]って何？", TEXT),
        (12, "高橋", "[イベント] 春の山歩き", PLACEHOLDER),
        # Mobile exports write tags, so a bare word there is something a person typed.
        (13, "小林", "写真", TEXT),
        (14, "中村", "Stickers", TEXT),
        (15, "小林", "[アルバム] 春の山 2024", PLACEHOLDER),
    ]
    _, records = read(LINE / "en_titled_items.txt")
    assert [(r.speaker, r.text) for r in records if r.kind == PLACEHOLDER] == [
        ("Anna", "[Poll] Where do we go next"),
        ("Ben", "[Event] Spring walk"),
        ("Chris", "[Note] What to bring"),
        ("Chris", "[Notes] Route\nStart at the station\nLunch at the top"),
    ]


@pytest.mark.parametrize(
    ("body", "placeholder"),
    [
        ("Stickers", True), (" Photos ", True), ("Call time 0:12", True), ("通話時間 12:34:56", True),
        ("☎ Call time 0:48", True), ("通话时间 3:05", True), ("貼圖", True),
        ("Photos!", False), ("photos", False), ("Stickers\nand more", False), ("Call time", False),
        ("通話時間 0:1", False), ("キャンセル", False), ("写真撮った", False),
    ],
)
def test_pc_bare_placeholder_words(body, placeholder):
    assert is_pc_bare_placeholder(body) is placeholder


# --------------------------------------------------------------------------- prepare never trains on them


def prepared_targets(tmp_path: Path, export: Path, persona: str, *read_args: str) -> set[str]:
    out = tmp_path / f"ds-{export.stem}-{persona}"
    proc = run_cli("prepare", export, *read_args, "--persona", persona, "--out", out, "--eval-fraction", "0",
                   "--timezone", "Asia/Tokyo", timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    lines += (out / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["target"] for line in lines}


@pytest.mark.parametrize(
    ("export", "persona", "read_args", "expected"),
    [
        (LINE_PC / "pc_ja_ui_words.txt", "田村", ("--speakers", "山口 由美,田村"),
         {"ありがとう！", "写真\n見てほしいのは2枚目", "スタンプ送って", "おやすみ"}),
        (LINE_PC / "pc_ja_ui_words.txt", "山口 由美", ("--speakers", "山口 由美,田村"),
         {"今日の写真送るね", "写真！", "通話時間 長すぎ"}),
        (LINE_PC / "pc_en_ui_words.txt", "Joe", ("--speakers", "Mika Tanaka,Joe"),
         {"Photos\nfrom the trip, more tomorrow", "stickers", "Canceled. See you Monday"}),
        (LINE_PC / "pc_en_ui_words.txt", "Mika Tanaka", ("--speakers", "Mika Tanaka,Joe"),
         {"look what I found", "Photos?", "Call time was long"}),
        (LINE_PC / "pc_titled_items.txt", "山口 由美", ("--speakers", "山口 由美,田村"), {"[投票]って何？", "投票しといた"}),
        (LINE / "ja_titled_items.txt", "中村", (), {"[投票]って何？", "Stickers"}),
        (LINE / "en_titled_items.txt", "Anna", (), {"who made the poll?", "see you there"}),
    ],
    ids=["pc-ja-田村", "pc-ja-山口", "pc-en-Joe", "pc-en-Mika", "pc-titled", "mobile-ja-titled", "mobile-en-titled"],
)
def test_prepare_never_makes_a_target_of_a_placeholder(tmp_path, export, persona, read_args, expected):
    targets = prepared_targets(tmp_path, export, persona, *read_args)
    # Hand-made: every typed message of the persona's turns, and nothing else.
    assert targets == expected
    if export.parent == LINE_PC:
        assert not targets & PC_BARE_PLACEHOLDERS
    assert not any(t.startswith(("[投票] ", "[Poll] ", "[ノート] ", "[Note", "[イベント] ", "[オープンチャット")) for t in targets)


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


# --------------------------------------------------------------------------- PC exports without --speakers


def speakers_needed(path: Path, speakers: tuple[str, ...] = ()) -> SpeakersNeeded:
    with pytest.raises(SpeakersNeeded) as info:
        read(path, speakers=speakers)
    return info.value


@pytest.mark.parametrize(("name", "likely"), [
    ("pc_ja.txt", ("山口 由美", "田村")),
    ("pc_bom_crlf.txt", ("山口 由美", "田村")),  # two lines each are enough to see the name go on
    ("pc_ja_ui_words.txt", ("山口 由美", "田村")),  # 田村's スタンプ/ファイル lines do not lengthen his name
    ("pc_titled_items.txt", ("山口 由美", "田村")),
    ("pc_en.txt", ("Bob Smith", "Alice")),
    ("pc_en_ui_words.txt", ("Joe", "Mika Tanaka")),  # most lines first
    ("pc_th.txt", ("โอ๊ต", "มายด์")),
    ("pc_zh_tw.txt", ("阿華", "小明")),
])
def test_without_speakers_the_error_names_the_full_likely_names(name, likely):
    error = speakers_needed(LINE_PC / name)
    assert error.likely == likely
    assert all(f"{n} (" in error.message for n in likely), error.message


def test_a_name_of_three_words_and_a_one_word_name_with_stickers(tmp_path):
    path = tmp_path / "talk.txt"
    lines = ["2024.03.09 土曜日"]
    for minute, said in enumerate(["see you at 9", "ok", "the station then", "bring the tickets", "lol"]):
        lines += [f"21:{minute:02d} Mary Ann Smith {said}", f"21:{minute:02d} Joe Stickers",
                  f"21:{minute:02d} Joe Stickers", f"21:{minute:02d} Joe ok then", f"21:{minute:02d} Kai おけ"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Kai always says the same one word: a message, not the rest of a name.
    assert speakers_needed(path).likely == ("Joe", "Mary Ann Smith", "Kai")


def test_a_speaker_left_out_of_speakers_is_named_in_full():
    error = speakers_needed(LINE_PC / "pc_en.txt", speakers=("Alice",))
    assert error.likely == ("Bob Smith",) and "not in --speakers: Bob Smith (3 lines)" in error.message


def test_speakers_flag_is_one_shell_word():
    assert speakers_flag(["山口 由美", "田村"]) == '--speakers "山口 由美,田村"'
    assert speakers_flag(['Joe "JJ"', "$x"]) == "--speakers 'Joe \"JJ\",$x'"


def hinted_speakers(stderr: str) -> list[str]:
    (hint,) = [line for line in stderr.splitlines() if line.startswith("hint: run again with --speakers ")]
    return shlex.split(hint.removeprefix("hint: run again with ").split(" (names guessed")[0])


def test_inspect_of_several_exports_shows_the_readable_ones_then_the_flag_for_the_pc_ones():
    mobile, pc_ja, pc_en = LINE / "ja_1to1_basic.txt", LINE_PC / "pc_ja.txt", LINE_PC / "pc_en.txt"
    proc = run_cli("inspect", pc_ja, mobile, pc_en, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert str(mobile) in proc.stdout and str(pc_ja) not in proc.stdout  # the readable one's table, only
    assert "Traceback" not in proc.stderr
    assert f"error: {pc_ja}:2: " in proc.stderr and f"error: {pc_en}:2: " in proc.stderr
    flag = hinted_speakers(proc.stderr)
    assert flag == ["--speakers", "山口 由美,田村,Bob Smith,Alice"]

    # The flag as printed reads them all.
    proc = run_cli("inspect", "--json", pc_ja, mobile, pc_en, *flag, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [(e["path"], e["format"]) for e in json.loads(proc.stdout)] == [
        (str(pc_ja), "line-pc"), (str(mobile), "line"), (str(pc_en), "line-pc")]


def test_inspect_json_of_several_exports_lists_the_readable_ones():
    mobile, pc_ja = LINE / "ja_1to1_basic.txt", LINE_PC / "pc_ja.txt"
    proc = run_cli("inspect", "--json", mobile, pc_ja, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert [e["path"] for e in json.loads(proc.stdout)] == [str(mobile)]
    # Another kind of error among them: status 1, each error named, the hint still given for the PC file.
    proc = run_cli("inspect", "--json", mobile, pc_ja, LINE / "missing.txt", timeout=120)
    assert proc.returncode == 1 and f"{LINE / 'missing.txt'}: no such file" in proc.stderr
    assert hinted_speakers(proc.stderr) == ["--speakers", "山口 由美,田村"]


def test_prepare_refuses_before_reading_naming_every_pc_export_and_the_flag(tmp_path):
    out = tmp_path / "out"
    mobile, pc_ja = LINE / "ja_1to1_basic.txt", LINE_PC / "pc_ja.txt"
    proc = run_cli("prepare", mobile, pc_ja, "--persona", "田村", "--out", out, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {pc_ja}:2: " in proc.stderr and proc.stderr.rstrip().endswith("nothing was written")
    flag = hinted_speakers(proc.stderr)
    assert not out.exists()
    proc = run_cli("prepare", mobile, pc_ja, "--persona", "田村", "--out", out, *flag, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "train.jsonl").exists()
