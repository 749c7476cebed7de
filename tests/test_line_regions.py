"""LINE exports from Taiwan and Thailand (and English UIs there), checked record by record.

tests/test_inspect_fixtures.py checks each fixture's counts against its `*.expected.json`; here we check
what counts cannot see: times (上午/下午 across noon and midnight, Buddhist-era years), who a notice
belongs to, texts that merely start like a tag, and that `prepare` trains on none of the placeholders.
All expected values were worked out by hand from the fixture bytes.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path

import pytest
from conftest import run_cli

from finetune.importers import ReadOptions, detect_format, open_export
from finetune.importers.line_shapes import classify, date_line, header_line, is_pc_bare_placeholder, parse_time
from finetune.records import PLACEHOLDER, SYSTEM, TEXT

LINE = Path(__file__).parent / "fixtures" / "line"
LINE_PC = Path(__file__).parent / "fixtures" / "line-pc"


def read(path: Path, **options):
    fmt, records = open_export(path, None, ReadOptions(**options))
    return fmt, list(records)


def rows(records):
    return [(r.line, r.speaker, r.text, r.kind) for r in records]


# --------------------------------------------------------------------------- Traditional Chinese, phone


def test_zh_tw_12_hour_times_across_midnight_and_noon():
    fmt, records = read(LINE / "zh_tw_1to1.txt")
    assert fmt == "line"
    assert {r.chat for r in records} == {"小明"}
    times = {r.line: r.time for r in records}
    assert times[5] == datetime(2024, 1, 5, 0, 5)  # 上午12:05 is just after midnight
    assert times[9] == datetime(2024, 1, 5, 11, 59)  # 上午11:59
    assert times[10] == datetime(2024, 1, 5, 12, 0)  # 下午12:00 is noon
    assert times[11] == datetime(2024, 1, 5, 12, 30)  # 下午12:30
    assert times[12] == datetime(2024, 1, 5, 13, 5)  # 下午01:05
    assert times[16] == datetime(2024, 1, 5, 23, 59)  # 下午11:59
    assert times[19] == datetime(2024, 1, 6, 0, 0)  # 上午12:00 on the next date line
    assert times[24] == datetime(2024, 1, 6, 12, 34)


def test_zh_tw_kinds_and_texts():
    _, records = read(LINE / "zh_tw_1to1.txt")
    assert rows(records) == [
        (5, "小明", "還沒睡？", TEXT),
        (6, "阿華", "剛加班回來\n好累", TEXT),
        (8, "小明", "[貼圖]", PLACEHOLDER),
        (9, "阿華", "[照片]", PLACEHOLDER),
        (10, "小明", "中午吃什麼", TEXT),
        (11, "阿華", "☎ 通話時間 0:12", PLACEHOLDER),
        (12, "小明", "[影片]", PLACEHOLDER),
        (13, "阿華", "[語音訊息]", PLACEHOLDER),
        (14, "小明", "☎ 未接來電", PLACEHOLDER),
        (15, "阿華", "☎ 取消通話", PLACEHOLDER),
        (16, "小明", "[貼圖]很可愛吧", TEXT),  # starts like a tag, but typed
        (19, "阿華", "[檔案] 報告.pdf", PLACEHOLDER),
        (20, "小明", "[位置資訊] 台北市信義區市府路45號", PLACEHOLDER),
        (21, "", "已收回訊息", SYSTEM),  # own unsend under a name column: nobody said it
        (22, "", "小明已收回訊息", SYSTEM),
        (23, "阿華", "你看他已收回訊息", TEXT),
        (24, "小明", "好", TEXT),
    ]


def test_zh_tw_group_quotes_notices_and_isolated_names():
    _, records = read(LINE / "zh_tw_group.txt")
    assert {r.chat for r in records} == {"大學同學會"}
    by_line = {r.line: r for r in records}
    # The quoted message keeps its "" as " and the date-like line inside it; the date did not change.
    assert by_line[8].text == '大家好\n我是"阿強"\n2024/03/02（六）\n請多指教'
    assert by_line[8].time == datetime(2024, 3, 1, 23, 55)
    # U+2068/U+2069 around a name are invisible; the speaker is the name people type.
    assert (by_line[12].speaker, by_line[12].kind) == ("小美", PLACEHOLDER)
    assert by_line[16].time == datetime(2024, 3, 2, 0, 3)
    assert [(r.line, r.text) for r in records if r.kind == SYSTEM] == [
        (6, "小美邀請阿強加入群組。"), (7, "阿強已加入群組。"), (18, "志明已收回訊息"), (20, "志明已退出群組。"),
    ]
    assert (by_line[19].text, by_line[19].kind) == ("[照片]好看嗎", TEXT)
    assert (by_line[21].text, by_line[21].kind) == ("[記事本] 聚餐名單\n小美\n阿強", PLACEHOLDER)


# --------------------------------------------------------------------------- Thai, phone


def test_thai_buddhist_era_dates_become_gregorian():
    _, records = read(LINE / "th_group.txt")
    assert {r.chat for r in records} == {"ทีมวิ่งเช้า"}
    times = {r.line: r.time for r in records}
    assert times[5] == datetime(2024, 12, 31, 21, 0)  # อ. 31/12/2567
    assert times[12] == datetime(2024, 12, 31, 23, 59)
    assert times[15] == datetime(2025, 1, 1, 0, 0)  # พ. 01/01/2568
    assert times[21] == datetime(2025, 1, 1, 6, 31)
    _, records = read(LINE / "th_1to1.txt")
    assert records[0].time == datetime(2019, 2, 14, 8, 0)  # วันพฤหัสบดี 14/02/2562
    assert records[-1].time == datetime(2019, 2, 15, 9, 7)
    assert {r.chat for r in records} == {"น้องฝน"}


def test_thai_kinds_and_texts():
    _, records = read(LINE / "th_group.txt")
    assert rows(records) == [
        (5, "สมชาย", "ปีใหม่วิ่งที่ไหนดี", TEXT),
        (6, "", "สมชาย เพิ่ม สมหญิง เข้ากลุ่ม", SYSTEM),
        (7, "สมหญิง", "[สติกเกอร์]", PLACEHOLDER),
        (8, "สมหญิง", "สวัสดีค่ะ\nฝากตัวด้วยนะคะ", TEXT),
        (10, "มานี", "[รูป]", PLACEHOLDER),
        (11, "มานี", "[รูป]ส่งผิดรูป", TEXT),
        (12, "สมชาย", "สวัสดีปีใหม่!", TEXT),
        (15, "มานี", "[วิดีโอ]", PLACEHOLDER),
        (16, "", "ยกเลิกข้อความแล้ว", SYSTEM),
        (17, "", "มานี ยกเลิกข้อความแล้ว", SYSTEM),
        (18, "สมชาย", "[ตำแหน่ง] สวนลุมพินี", PLACEHOLDER),
        (19, "สมหญิง", "☎ ไม่ได้รับสาย", PLACEHOLDER),
        (20, "", "มานี ออกจากกลุ่ม", SYSTEM),
        (21, "สมชาย", "ใครจะมาบ้าง\nตอบด้วย", TEXT),
    ]
    _, records = read(LINE / "th_1to1.txt")
    assert [(r.line, r.speaker, r.kind) for r in records if r.kind != TEXT] == [
        (6, "พี่ต้น", PLACEHOLDER), (8, "น้องฝน", PLACEHOLDER), (9, "น้องฝน", PLACEHOLDER), (10, "พี่ต้น", PLACEHOLDER),
        (13, "น้องฝน", PLACEHOLDER), (16, "", SYSTEM),
    ]
    assert records[-1].text == "ยกเลิกข้อความที่ส่งผิดไปนะ"  # starts with the unsend words, but typed


def test_english_ui_on_a_thai_phone_is_day_first_with_buddhist_years():
    _, records = read(LINE / "en_th_region.txt")
    assert [r.time for r in records] == [
        datetime(2019, 2, 14, 8, 0), datetime(2019, 2, 14, 8, 1), datetime(2019, 2, 14, 20, 30),
        datetime(2019, 3, 1, 9, 0), datetime(2019, 3, 1, 9, 1),
    ]


# --------------------------------------------------------------------------- PC "save chat"


def test_pc_traditional_chinese():
    fmt, records = read(LINE_PC / "pc_zh_tw.txt", speakers=("小明", "阿華"))
    assert fmt == "line-pc"
    assert rows(records) == [
        (5, "小明", "明天見？", TEXT),
        (6, "阿華", "貼圖", PLACEHOLDER),
        (7, "阿華", "好", TEXT),
        (8, "小明", "照片", PLACEHOLDER),
        (9, "阿華", "通話時間 0:45", PLACEHOLDER),
        (10, "小明", "未接來電", PLACEHOLDER),
        (11, "阿華", "已取消通話", PLACEHOLDER),
        (12, "", "小明已收回訊息", SYSTEM),
        (13, "阿華", "照片\n真的好看", TEXT),
        (16, "小明", "圖片", PLACEHOLDER),
        (17, "阿華", "已新增新的記事本。", PLACEHOLDER),
        (18, "小明", "影片呢？", TEXT),
    ]
    assert records[0].time == datetime(2025, 2, 14, 17, 22)
    assert records[-1].time == datetime(2025, 2, 15, 9, 2)


def test_pc_thai():
    fmt, records = read(LINE_PC / "pc_th.txt", speakers=("โอ๊ต", "มายด์"))
    assert fmt == "line-pc"
    assert rows(records) == [
        (2, "โอ๊ต", "เขียนโน้ตใหม่", PLACEHOLDER),
        (3, "โอ๊ต", "รูป", PLACEHOLDER),
        (4, "โอ๊ต", "คืนรถครับ", TEXT),
        (5, "มายด์", "สติกเกอร์", PLACEHOLDER),
        (6, "มายด์", "วิดีโอ", PLACEHOLDER),
        (7, "", "ยกเลิกข้อความ", SYSTEM),
        (8, "", "ยกเลิกข้อความแล้ว", SYSTEM),
        (9, "มายด์", "ไม่ได้รับสาย", PLACEHOLDER),
        (10, "โอ๊ต", "รูปสวยมาก", TEXT),
        (12, "", "โอ๊ต ออกจากกลุ่ม", SYSTEM),
        (13, "", "มายด์ เพิ่มประกาศ", SYSTEM),
        (14, "มายด์", "รูป\nถ่ายตอนเช้า", TEXT),
    ]
    assert records[0].time == datetime(2026, 8, 31, 9, 57)  # PC exports write Gregorian years
    assert records[-1].time == datetime(2026, 9, 1, 9, 12)


# --------------------------------------------------------------------------- the shapes, one by one


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("上午12:05", 5), ("上午0:05", 5), ("上午11:59", 11 * 60 + 59), ("下午12:30", 12 * 60 + 30),
        ("下午01:05", 13 * 60 + 5), ("下午 1:05", 13 * 60 + 5), ("下午11:59", 23 * 60 + 59),
        ("10:15pm", 22 * 60 + 15), ("12:05 ก่อนเที่ยง", 5), ("1:30 หลังเที่ยง", 13 * 60 + 30),
        ("下午13:00", None), ("上午", None), ("12:60", None),
    ],
)
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("2024/01/05（五）", date(2024, 1, 5)), ("2025.02.15 星期六", date(2025, 2, 15)),
        ("2026/1/30周五", date(2026, 1, 30)), ("ศ. 28/11/2568", date(2025, 11, 28)),
        ("พฤ. 14/02/2562", date(2019, 2, 14)), ("วันศุกร์ 15/02/2562", date(2019, 2, 15)),
        ("2026.08.31 วันจันทร์", date(2026, 8, 31)), ("2562/02/14(Thu)", date(2019, 2, 14)),
        ("Thu, 14/02/2562", date(2019, 2, 14)),
        ("9999/12/31(Fri)", date(9999, 12, 31)),  # not a BE year: left for the "past 9999" check
        ("ศ. 31/02/2568", None), ("28/11/2568", None), ("สวัสดี 2568", None),
    ],
)
def test_date_lines(line, expected):
    assert date_line(line, "dmy") == expected


@pytest.mark.parametrize(
    ("line", "title"),
    [
        ("[LINE] 與小明的聊天記錄", "小明"), ("[LINE] 與小明的聊天紀錄", "小明"), ("[LINE] 大學同學會的聊天記錄", "大學同學會"),
        ("[LINE] 与小明的聊天记录", "小明"), ('[LINE] ประวัติการแชทในกลุ่ม "ทีมวิ่งเช้า"', "ทีมวิ่งเช้า"),
        ("[LINE] ประวัติการแชทกับ น้องฝน", "น้องฝน"),
        # a UI language we have no sample of still starts an export
        ("[LINE] Riwayat chat dengan Budi", "Riwayat chat dengan Budi"),
        ("儲存日期：2024/01/06 12:34", ""), ("บันทึกเมื่อ 04/09/2569 07:48", ""), ("Disimpan pada: 15/02/2019 20:00", ""),
        ("hello", None),
    ],
)
def test_header_lines(line, title):
    assert header_line(line) == title


@pytest.mark.parametrize(
    ("name", "body", "kind"),
    [
        ("小明", "已收回訊息", SYSTEM), ("小明", "小明已收回訊息", SYSTEM), ("小明", "你已收回訊息", SYSTEM),
        ("小明", "他已收回訊息", TEXT), ("TWO", "ยกเลิกข้อความ", SYSTEM), ("โอ๊ต", "โอ๊ต ออกจากกลุ่ม", SYSTEM),
        ("โอ๊ต", "เดี๋ยวผมออกจากกลุ่ม", TEXT), ("A", "\u2068A\u2069 เพิ่มประกาศ", SYSTEM),
        ("小明", "[貼圖]", PLACEHOLDER), ("小明", "[貼圖] 好", TEXT), ("小明", "[投票] 聚餐", PLACEHOLDER),
        ("ต้น", "[ไฟล์] a.pdf", PLACEHOLDER), ("ต้น", "[ไฟล์]ส่งแล้ว", TEXT),
    ],
)
def test_classify(name, body, kind):
    assert classify(name, body) == kind


@pytest.mark.parametrize(
    ("body", "placeholder"),
    [("照片", True), ("未接來電", True), ("รูป", True), ("เขียนโน้ตใหม่", True), ("รูปสวย", False), ("照片呢", False)],
)
def test_pc_bare_words(body, placeholder):
    assert is_pc_bare_placeholder(body) is placeholder


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        ("[LINE] 與小明的聊天記錄\n儲存日期：2024/01/06 12:34\n\n2024/01/05（五）\n上午12:05\t小明\t嗨\n", "line"),
        ("2024/01/05（五）\n下午 1:05\t小明\t嗨\n", "line"),
        ("ศ. 28/11/2568\n08:55\tสมชาย\tสวัสดีครับ\n", "line"),
        ("2026.08.31 วันจันทร์\n10:49 โอ๊ต รูป\n10:49 โอ๊ต คืนรถครับ\n", "line-pc"),
    ],
)
def test_detected_from_content(tmp_path, head, fmt):
    path = tmp_path / "talk.txt"
    path.write_text(head, encoding="utf-8")
    assert detect_format(path) == fmt


# --------------------------------------------------------------------------- prepare trains on typed text only


@pytest.mark.parametrize(
    ("export", "persona", "read_args", "expected"),
    [
        (LINE / "zh_tw_1to1.txt", "小明", (), {"還沒睡？", "中午吃什麼", "[貼圖]很可愛吧", "好"}),
        (LINE / "zh_tw_1to1.txt", "阿華", (), {"剛加班回來\n好累", "你看他已收回訊息"}),
        (LINE / "th_group.txt", "สมชาย", (), {"ปีใหม่วิ่งที่ไหนดี", "สวัสดีปีใหม่!", "ใครจะมาบ้าง\nตอบด้วย"}),
        # Lines 14 and 17 make one turn: the unsend notice between them is no one's turn.
        (LINE / "th_1to1.txt", "พี่ต้น", (), {"เช่นกันนะ", "ฟังแล้ว\nขำมาก 555\nยกเลิกข้อความที่ส่งผิดไปนะ"}),
        (LINE_PC / "pc_th.txt", "โอ๊ต", ("--speakers", "โอ๊ต,มายด์"), {"คืนรถครับ", "รูปสวยมาก"}),
        (LINE_PC / "pc_zh_tw.txt", "阿華", ("--speakers", "小明,阿華"), {"好", "照片\n真的好看"}),
    ],
    ids=["zh-tw-小明", "zh-tw-阿華", "th-group", "th-1to1", "pc-th", "pc-zh-tw"],
)
def test_prepare_targets_are_the_typed_messages(tmp_path, export, persona, read_args, expected):
    out = tmp_path / "ds"
    proc = run_cli("prepare", export, *read_args, "--persona", persona, "--out", out, "--eval-fraction", "0",
                   "--timezone", "Asia/Bangkok", timeout=120)
    assert proc.returncode == 0, proc.stderr
    samples = [json.loads(line) for name in ("train.jsonl", "eval.jsonl")
               for line in (out / name).read_text(encoding="utf-8").splitlines()]
    # Hand-made: the persona's typed turns, each a target once and unchanged (no Japanese-only normalising
    # or redaction touched the Thai or Chinese), and no placeholder or notice.
    assert sorted(s["target"] for s in samples) == sorted(expected)
