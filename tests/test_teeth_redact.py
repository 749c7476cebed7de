"""finetune/redact.py at the edges of its number rules: a Japanese phone number is 0 and 9 or 10 more digits
(10 for a landline or a free-dial 0120 number, 11 for a mobile), so one digit fewer or more is something else
(a reference, an order number) and stays as typed, while every real length becomes <PHONE> and is counted."""

from __future__ import annotations

import pytest

from finetune.redact import Redactor, my_number_ok

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


# --- international numbers: E.164 allows at most 15 digits; the rule takes 8 or more ----------------------------------

INTERNATIONAL = [
    ("+1 234 5678", 8, True),
    ("+61 2 9374 4000", 11, True),  # Sydney, as printed
    ("+123 4567 8901 2345", 15, True),
    ("+1 234 567", 7, False),
    ("+123 4567 8901 2345 6", 16, False),
]


@pytest.mark.parametrize(("text", "digits", "phone"), INTERNATIONAL)
def test_international_numbers_of_8_to_15_digits_are_phone_numbers(text, digits, phone):
    assert sum(ch.isdigit() for ch in text) == digits
    redactor = Redactor()
    assert redactor(f"連絡は{text}まで") == ("連絡は<PHONE>まで" if phone else f"連絡は{text}まで")
    assert redactor.counts["phone"] == int(phone)


# --- My Number check digits on every branch of the rule -------------------------------------------------------------
# 平成26年総務省令第85号 第5条: Pn the n-th digit of the first eleven from the right, Qn = n + 1 (n <= 6) or
# n - 5 (n >= 7), r = sum(Pn * Qn) mod 11, check digit 0 if r <= 1 else 11 - r. Worked by hand:
#   16701139124: 4*2 + 2*3 + 1*4 + 9*5 + 3*6 + 1*7 + 1*2 + 0*3 + 7*4 + 6*5 + 1*6 = 154, r = 0  -> 0
#   03322453832: 2*2 + 3*3 + 8*4 + 3*5 + 5*6 + 4*7 + 2*2 + 2*3 + 3*4 + 3*5 + 0*6 = 155, r = 1  -> 0
#   36405622415: 5*2 + 1*3 + 4*4 + 2*5 + 2*6 + 6*7 + 5*2 + 0*3 + 4*4 + 6*5 + 3*6 = 167, r = 2  -> 9
#   49909514547: 7*2 + 4*3 + 5*4 + 4*5 + 1*6 + 5*7 + 9*2 + 0*3 + 9*4 + 9*5 + 4*6 = 230, r = 10 -> 1
MY_NUMBERS_BY_REMAINDER = ["167011391240", "033224538320", "364056224159", "499095145471"]


@pytest.mark.parametrize("number", MY_NUMBERS_BY_REMAINDER)
def test_my_number_check_digits_on_each_branch(number):
    assert my_number_ok(number)
    for wrong in "0123456789":
        if wrong != number[-1]:
            assert not my_number_ok(number[:-1] + wrong), wrong
    grouped = f"{number[:4]} {number[4:8]} {number[8:]}"
    assert Redactor()(f"マイナンバーは{grouped}です") == "マイナンバーは<MYNUMBER>です"


def test_a_my_number_has_twelve_digits():
    assert not my_number_ok("16701139124")  # the body alone
    assert not my_number_ok("1670113912400")
