"""Text built to make a careless redaction rule rescan from every position (finetune/redact.py): digits with
every separator, kanji with 都/市/区 and prefecture names over and over, 漢数字, particles next to numbers.
tests/test_redact.py checks what comes out of it; bench/redact_speed.py times 10 MB of it."""

from __future__ import annotations

PIECES = [
    "1234-5678-",
    "1234 5678 ",
    "０９０‐１２３４‐",
    "1234567890",
    "東京都千代田区",
    "横浜市港北区あ",
    "都市区町村郡",
    "東京都港区一二三四五六七八九十百千",
    "新宿区で3-4",
    "東京都港区1丁目",
]


def adversarial_text(size_bytes: int) -> str:
    """About `size_bytes` of UTF-8 made of PIECES, each repeated over an equal share."""
    share = size_bytes // len(PIECES)
    return "".join(piece * (share // len(piece.encode()) + 1) for piece in PIECES)
