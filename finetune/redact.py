"""Personal data out of training text: URLs, e-mail addresses, phone numbers, postal codes,
Japanese street addresses, payment card numbers and My Numbers (個人番号).

A tuned model repeats what it saw, so a friend's phone number in the chat log must not
reach the adapter. Each kind becomes a fixed token the model can learn to use in its place.
One alternation pass per text (not one pass per kind) keeps `prepare` fast on big exports.

Numbers with a check digit are taken only when it checks: a card number when the Luhn check
passes, a My Number when its 検査用数字 is right. A 16-digit order number or a 12-digit
tracking number is then left as it was 9 times in 10, the odds of a random last digit being
the right one.

A street address needs a place and a number: a municipality (市, 区, 郡+町村; a 政令市's
市+区) followed by the 番地 in any form people type (2-8-1, ３－４－１, 1丁目2番3号, 三丁目,
北1条西2丁目3-4, 488 after a 町), and with a building and room after it when there is one.
A place without a number (東京都新宿区で飲もう), or a number that counts something
(東京都で3時に, 2-3人, 1500円), is not an address.

Addresses without a prefecture (横浜市港北区日吉3-4-1) are redacted too, on stricter terms.
Pattern-based Japanese PII recognizers in public code (Presidio recognizer sets for Japanese)
anchor every address on one of the 47 prefecture names, so they miss this form; the tools that
do read it (the Digital Agency's abr-geocoder, jageocoder behind pygeonlp, geolonia's
normalize-japanese-addresses) look the municipality up in a national address dictionary, and
their own examples (町田市森野2-2-22, 千代田区一ツ橋2-1-2) show it is how people write an
address once the prefecture is obvious, which in a chat between friends it usually is.
We carry no dictionary, so without a prefecture the shape has to say "address" on its own: a
name ending in 市 or 区 (or a 郡), then at least two numbers in a street-number form (3-4-1,
2-8, 1丁目2番). That keeps 横浜市って広いよね, 新宿区役所 and 渋谷区の店で1500円だった as
they are, and misses the rare prefecture-less address with one bare number (与那国町字与那国129).

The pass stays linear: a rule starts only at a fixed word (http, a prefecture name) or where a
run begins (the lookbehinds), or looks no further than a few dozen characters ahead (numbers,
the place names before a 番地), so a 10 MB run of digits or kanji costs a bounded amount of
work per character instead of being rescanned from every position.
"""

from __future__ import annotations

import re
from collections import Counter

TOKENS = {
    "url": "<URL>",
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "postal_code": "<POSTCODE>",
    "address": "<ADDRESS>",
    "card": "<CARD>",
    "my_number": "<MYNUMBER>",
}
KINDS = tuple(TOKENS)  # the order stats.json and the summary line list them in

_D = "[0-9０-９]"  # people type full-width digits in Japanese text
_SEP = "[-‐－―−ー \u3000]"  # hyphens of every width, the long-vowel mark people use as a dash, spaces
# Not \w: Japanese letters are word characters, and 電話は090-… must still match.
_NOT_DIGIT_BEFORE = r"(?<![0-9０-９A-Za-z./:_-])"
_NOT_DIGIT_AFTER = r"(?![0-9０-９])"
# Card and My Numbers are often written after a colon (番号:4111…), so a colon may come before.
_NUMBER_START = r"(?<![0-9０-９A-Za-z./_\-‐－−―ー])"
# ...but not inside a longer hyphenated run. Not a space: 4111 1111 1111 1111 12/26 is a card and its expiry.
_NUMBER_END = r"(?![0-9０-９]|[-‐－−―ー][0-9０-９])"

# Street addresses. Place names are kanji and katakana (ヶ丘, 々); hiragana appears in some
# (勝どき, みなとみらい, 寺町通御池上る), but so do the particles of the sentence around them.
_NAME = "\u3400-\u4dbf\u4e00-\u9fff々〆〇ァ-ヺー"
_NAME_OR_KANA = _NAME + "ぁ-ゖ"
_PREFECTURE = (
    "(?:北海道|東京都|京都府|大阪府|(?:青森|岩手|宮城|秋田|山形|福島|茨城|栃木|群馬|埼玉|千葉|神奈川|新潟|富山|"
    "石川|福井|山梨|長野|岐阜|静岡|愛知|三重|滋賀|兵庫|奈良|和歌山|鳥取|島根|岡山|広島|山口|徳島|香川|愛媛|"
    "高知|福岡|佐賀|長崎|熊本|大分|宮崎|鹿児島|沖縄)県)"
)
# A particle right after the prefecture (東京都に, 東京都って) means the sentence went on, not the address.
_NOT_A_PARTICLE_FIRST = "(?![のにでへとはがをもやっじだなけまよ])"
# ...and one right before the number (新宿区で1-2時間, 港区から3-4) means the number is not its 番地.
_NOT_A_PARTICLE_BEFORE = "(?<![でにはがをとへものやかてらりよまっ])"
# The names from the municipality to the number, with at most one space inside (東京都新宿区 西新宿2-8-1).
_PLACE_NAMES = f"[{_NAME_OR_KANA}]{{1,32}}(?:[ \u3000][{_NAME_OR_KANA}]{{1,24}})?"
_KANJI_DIGITS = "〇一二三四五六七八九十百千"
_ADDRESS_NUMBER = f"(?:{_D}{{1,5}}|[{_KANJI_DIGITS}]{{1,4}})"
_ADDRESS_UNIT = "(?:丁目|丁|番地|番|号室|号|条[東西南北]?|地割)"  # longest first: 番地 before 番
_ADDRESS_STEP = f"(?:{_ADDRESS_UNIT}[-‐－−―ーの]?|[-‐－−―ーの])"  # 3番地の1, 1丁目2-3, 2-8-1
_TWO_OR_MORE_NUMBERS = f"{_ADDRESS_NUMBER}(?:{_ADDRESS_STEP}{_ADDRESS_NUMBER}){{1,6}}{_ADDRESS_UNIT}?"
# What follows a number that counts or measures rather than locates: 3時, 2-3人, 1500円, 2-3ヶ月.
_NOT_A_COUNT = "(?![0-9０-９時分秒円人回年月日歳才代点個本枚件倍割位度階限杯軒台匹冊着曲話周戦敗勝局組%％ヶかa-z])"
# A building and room after the number: " メゾン日吉101号室", "ハイツ201", " 305".
_BUILDING = (
    f"(?:[ \u3000]?(?:[{_NAME}A-Za-zＡ-Ｚａ-ｚ]{{1,20}}[ \u3000]?)?{_D}{{1,4}}(?:号室|号|階|[FＦ])?"
    f"{_NUMBER_END}{_NOT_A_COUNT})?"
)
# With a prefecture: 都道府県, a municipality within the next few names, then the number. One bare
# number counts only after a 町/村/字 (上本能寺前町488); one number with a unit (三丁目, 5番地) always does.
_ADDRESS_WITH_PREFECTURE = (
    f"{_PREFECTURE}[ \u3000]?(?=[{_NAME_OR_KANA}]{{0,12}}[市区町村郡]){_NOT_A_PARTICLE_FIRST}"
    f"{_PLACE_NAMES}{_NOT_A_PARTICLE_BEFORE}"
    f"(?:[ \u3000]?(?:{_TWO_OR_MORE_NUMBERS}|{_ADDRESS_NUMBER}{_ADDRESS_UNIT})|(?<=[町村字])[ \u3000]?{_D}{{1,5}})"
    f"{_NOT_A_COUNT}{_BUILDING}"
)
# Without one: only where a run of names starts (the lookbehind), a 市/区/郡 among its first names,
# and two or more numbers. さいたま市 is the one 政令市 whose name is not kanji.
_ADDRESS_WITHOUT_PREFECTURE = (
    f"(?<![{_NAME}])(?=[{_NAME}]{{1,10}}[市区]|[{_NAME}]{{1,8}}郡|さいたま市)"
    f"{_PLACE_NAMES}{_NOT_A_PARTICLE_BEFORE}[ \u3000]?{_TWO_OR_MORE_NUMBERS}{_NOT_A_COUNT}{_BUILDING}"
)

_PATTERN = re.compile(
    "|".join(
        [
            # URLs first: they may contain @ and digit runs that look like phone numbers.
            r"(?P<url>(?:https?|ftp)://[^\s<>\"'「」（）()]+|www\.[^\s<>\"'「」（）()]+)",
            # The lookbehind makes only the start of a run try a match: without it a 10 MB run of
            # letters (Japanese counts) is rescanned from every position, which is quadratic.
            r"(?P<email>(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)",
            # Cards before phones, so 0123 4567 8901 2345 is not read as a phone number and a tail.
            # As typed: 4-4-4-4 (spaces, hyphens, or none), Amex 4-6-5, Diners 4-6-4, or 13-19 digits in one run.
            # My Number: 12 digits, 4-4-4 as printed on the card, or in one run. One lookbehind for both
            # (a lookbehind tried at every position is what this pass spends its time on).
            rf"{_NUMBER_START}(?:"
            rf"(?P<card>{_D}{{4}}(?:{_SEP}?{_D}{{4}}){{3}}|{_D}{{4}}{_SEP}?{_D}{{6}}{_SEP}?{_D}{{4,5}}|{_D}{{13,19}}){_NUMBER_END}"
            # A fourth group after 4-4-4 (1234 5678 9018 04) makes it some longer number, not a My Number.
            rf"|(?P<my_number>{_D}{{4}}{_SEP}?{_D}{{4}}{_SEP}?{_D}{{4}})(?!{_SEP}?{_D})"
            rf")",
            # International: +81 90-1234-5678, +1 (555) 123-4567, +44 20 7946 0958, ＋８１…
            rf"(?P<phone_intl>[+＋]{_D}{{1,3}}(?:{_SEP}?[(（]?{_D}{{1,4}}[)）]?){{2,5}}{_NOT_DIGIT_AFTER})",
            # Japanese: 090-1234-5678, 03-1234-5678, 0120-123-456, (03)1234-5678, 09012345678, ０９０ー…
            rf"(?P<phone_jp>{_NOT_DIGIT_BEFORE}[(（]?[0０]{_D}{{1,4}}[)）]?{_SEP}?{_D}{{1,4}}{_SEP}?{_D}{{3,4}}{_NOT_DIGIT_AFTER})",
            # Postal codes: 〒100-0001, 〒１００－０００１, and bare 100-0001 (3-4 digits with a hyphen).
            rf"(?P<postal_code>〒\s?{_D}{{3}}{_SEP}?{_D}{{4}}|{_NOT_DIGIT_BEFORE}{_D}{{3}}[-‐－−]{_D}{{4}}{_NOT_DIGIT_AFTER})",
            rf"(?P<address>{_ADDRESS_WITH_PREFECTURE}|{_ADDRESS_WITHOUT_PREFECTURE})",
        ]
    )
)
_PREFECTURE_NAME = re.compile(_PREFECTURE)
_ASCII_DIGITS = str.maketrans("０１２３４５６７８９", "0123456789")


def _digits(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


def _digit_string(s: str) -> str:
    return "".join(ch for ch in s.translate(_ASCII_DIGITS) if ch.isdigit())


def luhn_ok(number: str) -> bool:
    """The Luhn check every payment card number carries in its last digit (ISO/IEC 7812-1)."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def my_number_ok(number: str) -> bool:
    """The 検査用数字 of a 12-digit 個人番号 (番号法施行令 第8条; the formula is 平成26年総務省令第85号 第5条):
    with Pn the n-th of the first eleven digits counted from the right (n = 1..11) and Qn = n + 1 for
    n <= 6, n - 5 for n >= 7, let r = (sum of Pn * Qn) mod 11; the check digit is 0 when r <= 1, else 11 - r.
    """
    if len(number) != 12:
        return False
    body = number[:11]
    total = sum(int(body[-n]) * (n + 1 if n <= 6 else n - 5) for n in range(1, 12))
    remainder = total % 11
    return int(number[11]) == (0 if remainder <= 1 else 11 - remainder)


class Redactor:
    """Replaces personal data with tokens and counts what it replaced, by kind."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def _replace(self, m: re.Match) -> str:
        kind = m.lastgroup
        text = m.group(0)
        keep = ""
        if kind == "phone_jp":
            # 0 + 9 or 10 more digits is a Japanese number; fewer is a price, a score, a date part.
            if not 10 <= _digits(text) <= 11:
                return text
            kind = "phone"
        elif kind == "phone_intl":
            if not 8 <= _digits(text) <= 15:  # E.164 allows at most 15 digits
                return text
            kind = "phone"
        elif kind == "card":
            if not luhn_ok(_digit_string(text)):
                return text
        elif kind == "my_number":
            if not my_number_ok(_digit_string(text)):
                return text
        elif kind == "address":
            # A run of names may start before the address (今日東京都…, 神奈川県から東京都…): the
            # address starts at its last prefecture name, and the words before it stay.
            starts = [p.start() for p in _PREFECTURE_NAME.finditer(text)]
            keep = text[: starts[-1]] if starts else ""
        self.counts[kind] += 1
        return keep + TOKENS[kind]

    def __call__(self, text: str) -> str:
        if not text:
            return text
        return _PATTERN.sub(self._replace, text)
