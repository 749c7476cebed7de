"""Record-level tests of the plain `Name:text` importer."""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from finetune.importers import ExportError, ReadOptions, open_export
from finetune.records import PLACEHOLDER, TEXT

FIXTURES = Path(__file__).parent / "fixtures" / "plain"
START = datetime(2000, 1, 1)
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)


def read(path: Path):
    return list(open_export(path, "plain", ReadOptions())[1])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "log.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_split_on_the_first_ascii_colon_and_trim():
    records = read(FIXTURES / "sessions.txt")
    assert [(r.speaker, r.text, r.kind) for r in records] == [
        ("ゆい", "おはよう", TEXT),
        ("ケンタ", "おはよー、今日は10:30集合だっけ？", TEXT),
        ("ゆい", "そう：駅の北口で", TEXT),
        ("ゆい", "", PLACEHOLDER),  # a turn with nothing typed: kept as a placeholder, never trained on
        ("ケンタ", "了解 :)", TEXT),
        ("ゆい", "着いた！", TEXT),
        ("ケンタ", "今向かってる", TEXT),
        ("Yui", "URL: https://example.com/a:b", TEXT),
    ]
    assert [r.line for r in records] == [1, 2, 3, 4, 5, 7, 8, 9]
    assert all(r.chat == "" and r.message_id is None and r.reply_to is None for r in records)


def test_synthetic_times_minute_apart_and_a_day_between_sessions():
    times = [r.time for r in read(FIXTURES / "sessions.txt")]
    assert times[:5] == [START + i * MINUTE for i in range(5)]
    assert times[5] == times[4] + DAY + MINUTE  # the blank line
    assert times[6:] == [times[5] + MINUTE, times[5] + 2 * MINUTE]
    assert all(t.tzinfo is None for t in times)


def test_times_stay_strictly_increasing_in_a_session_longer_than_a_day_of_minutes(tmp_path):
    path = write(tmp_path, "a:x\n" * 1500 + "\n" + "b:y\n")
    times = [r.time for r in read(path)]
    assert all(earlier < later for earlier, later in pairwise(times))
    assert times[-1] - times[-2] == DAY + MINUTE


def test_crlf_bom_and_extra_blank_lines(tmp_path):
    records = read(FIXTURES / "crlf_bom.txt")
    assert [(r.speaker, r.text, r.line) for r in records] == [
        ("Aoi", "hi there: how are you?", 2),
        ("Ren", "good", 3),
        ("Aoi", "😀", 6),
        ("Ren", "またね", 7),
    ]
    # Blank lines before the first message break nothing; two blank lines are one break.
    assert [r.time for r in records] == [START, START + MINUTE, START + DAY + 2 * MINUTE, START + DAY + 3 * MINUTE]


def test_line_without_colon(tmp_path):
    path = write(tmp_path, "a:hello\nthis line has no colon\n")
    with pytest.raises(ExportError) as info:
        read(path)
    assert str(info.value) == f"{path}:2: expected `Name:text`, found 'this line has no colon'"


def test_full_width_colon_gets_a_hint(tmp_path):
    path = write(tmp_path, "ゆい：おはよう\n")
    with pytest.raises(ExportError) as info:
        read(path)
    assert str(info.value) == (
        f"{path}:1: expected `Name:text`, found 'ゆい：おはよう' (it has a full-width '：'; this format splits on the ASCII ':')"
    )


def test_empty_name(tmp_path):
    path = write(tmp_path, "a:ok\n: who said this\n")
    with pytest.raises(ExportError) as info:
        read(path)
    assert str(info.value) == f"{path}:2: expected `Name:text`, found no name before the ':' in ': who said this'"


def test_sentence_before_the_colon_is_not_a_name(tmp_path):
    path = write(tmp_path, "a:ok\nand then the long explanation went on and on until: it ended\n")
    with pytest.raises(ExportError) as info:
        read(path)
    assert info.value.line == 2
    assert info.value.message == (
        "expected `Name:text`, but 'and then the long explanation went on and on until' before the first ':' "
        "does not look like a name (a tab, or over 40 characters)"
    )


def test_detected_from_content():
    fmt, records = open_export(FIXTURES / "sessions.txt")
    assert fmt == "plain" and len(list(records)) == 8
