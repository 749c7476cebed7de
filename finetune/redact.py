"""Personal data out of training text: URLs, e-mail addresses, phone numbers, postal codes.

A tuned model repeats what it saw, so a friend's phone number in the chat log must not
reach the adapter. Each kind becomes a fixed token the model can learn to use in its place.
One alternation pass per text (not one pass per kind) keeps `prepare` fast on big exports.
"""

from __future__ import annotations

import re
from collections import Counter

TOKENS = {"url": "<URL>", "email": "<EMAIL>", "phone": "<PHONE>", "postal_code": "<POSTCODE>"}

_D = "[0-9０-９]"  # people type full-width digits in Japanese text
_SEP = "[-‐－―−ー \u3000]"  # hyphens of every width, the long-vowel mark people use as a dash, spaces
# Not \w: Japanese letters are word characters, and 電話は090-… must still match.
_NOT_DIGIT_BEFORE = r"(?<![0-9０-９A-Za-z./:_-])"
_NOT_DIGIT_AFTER = r"(?![0-9０-９])"

_PATTERN = re.compile(
    "|".join(
        [
            # URLs first: they may contain @ and digit runs that look like phone numbers.
            r"(?P<url>(?:https?|ftp)://[^\s<>\"'「」（）()]+|www\.[^\s<>\"'「」（）()]+)",
            # The lookbehind makes only the start of a run try a match: without it a 10 MB run of
            # letters (Japanese counts) is rescanned from every position, which is quadratic.
            r"(?P<email>(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)",
            # International: +81 90-1234-5678, +1 (555) 123-4567, +44 20 7946 0958, ＋８１…
            rf"(?P<phone_intl>[+＋]{_D}{{1,3}}(?:{_SEP}?[(（]?{_D}{{1,4}}[)）]?){{2,5}}{_NOT_DIGIT_AFTER})",
            # Japanese: 090-1234-5678, 03-1234-5678, 0120-123-456, (03)1234-5678, 09012345678, ０９０ー…
            rf"(?P<phone_jp>{_NOT_DIGIT_BEFORE}[(（]?[0０]{_D}{{1,4}}[)）]?{_SEP}?{_D}{{1,4}}{_SEP}?{_D}{{3,4}}{_NOT_DIGIT_AFTER})",
            # Postal codes: 〒100-0001, 〒１００－０００１, and bare 100-0001 (3-4 digits with a hyphen).
            rf"(?P<postal_code>〒\s?{_D}{{3}}{_SEP}?{_D}{{4}}|{_NOT_DIGIT_BEFORE}{_D}{{3}}[-‐－−]{_D}{{4}}{_NOT_DIGIT_AFTER})",
        ]
    )
)


def _digits(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


class Redactor:
    """Replaces personal data with tokens and counts what it replaced, by kind."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def _replace(self, m: re.Match) -> str:
        kind = m.lastgroup
        text = m.group(0)
        if kind == "phone_jp":
            # 0 + 9 or 10 more digits is a Japanese number; fewer is a price, a score, a date part.
            if not 10 <= _digits(text) <= 11:
                return text
            kind = "phone"
        elif kind == "phone_intl":
            if not 8 <= _digits(text) <= 15:  # E.164 allows at most 15 digits
                return text
            kind = "phone"
        self.counts[kind] += 1
        return TOKENS[kind]

    def __call__(self, text: str) -> str:
        if not text:
            return text
        return _PATTERN.sub(self._replace, text)
