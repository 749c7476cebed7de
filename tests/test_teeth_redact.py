"""finetune/redact.py at the edges of its number rules: a Japanese phone number is 0 and 9 or 10 more digits
(10 for a landline or a free-dial 0120 number, 11 for a mobile), so one digit fewer or more is something else
(a reference, an order number) and stays as typed, while every real length becomes <PHONE> and is counted."""

from __future__ import annotations

import pytest

from finetune.redact import Redactor

PHONES = [
    ("03-1234-5678", 10),  # Tokyo landline
    ("0120-123-456", 10),  # free dial
    ("（06）1234-5678", 10),  # area code in full-width brackets
    ("090-1234-5678", 11),  # mobile
    ("０８０１２３４５６７８", 11),  # mobile in full-width digits, unbroken
]
NOT_PHONES = [
    ("受付番号は012-345-678です", 9),
    ("03-123-4567", 9),
    ("0120-12-345", 9),
    ("012345678", 9),
    ("(0123)4567-8901", 12),
]


@pytest.mark.parametrize(("text", "digits"), PHONES)
def test_ten_and_eleven_digits_are_a_phone_number(text, digits):
    redactor = Redactor()
    assert redactor(f"電話は{text}だよ") == "電話は<PHONE>だよ"
    assert dict(redactor.counts) == {"phone": 1}


@pytest.mark.parametrize(("text", "digits"), NOT_PHONES)
def test_nine_or_twelve_digits_are_not_a_phone_number(text, digits):
    redactor = Redactor()
    assert redactor(text) == text
    assert not redactor.counts


def test_the_tables_say_the_digit_counts_they_claim():
    for text, digits in PHONES + NOT_PHONES:
        assert sum(ch.isdigit() for ch in text) == digits, text
