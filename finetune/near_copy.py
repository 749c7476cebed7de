"""Is one chat text a copy of another, give or take spacing, punctuation, width and elongation?

The blind test (blind_pairs.py) must not show a reply anywhere else on the test: a voter who has seen
"まじか笑" in one pair's context knows which of two replies in another pair is the real one. Chat
copies are rarely exact: a friend quotes the reply inside a longer message, the context holds a burst
with a [スタンプ] in the middle, the same words come back with "!" instead of "！" or "ｗｗｗ" instead of
"www". So texts are compared in a normal form, and a copy is either the same normal form or one
text whose character trigrams are mostly found in the other.

The thresholds, and why:
- MIN_CHARS = 5: a normal form shorter than this (うん, おけ, 了解, それな, 草) counts only when
  the whole text is the same. Everyone says them, so finding "うん" inside a longer message tells a
  voter nothing, while the very same "うん" shown in another pair does. Five characters is also the
  run the style features count as copying from the context (style.py).
- NGRAM = 3: Japanese has no spaces, so words are not a unit; trigrams of characters are the shortest
  pieces that are rarely shared by chance (bigrams are mostly kana pairs every text has).
- CONTAINMENT = 0.6: the shorter text is a copy when at least 60% of its trigrams occur in the
  longer one. One changed character removes at most three of a text's trigrams, so a 10-character
  reply with one character changed keeps 5 of its 8 (0.62) and a 20-character one with two changed
  keeps 12 of 18 (0.67): still a copy. Two different replies on one topic share its noun and little
  else: 新しいカフェありだね against 新しいカフェ楽しみだね shares 4 of 8 (0.5), not a copy; a voter
  learns the topic from the context anyway. tests/test_blind_pairs.py holds these cases.
Containment is measured on the shorter text so that a reply found inside a longer message (a quote, a
burst, a clipped context turn that starts with "…") is a copy as well.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

MIN_CHARS = 5
NGRAM = 3
CONTAINMENT = 0.6

_REPEATS = re.compile(r"(.)\1+", re.DOTALL)


def normalise(text: str) -> str:
    """NFKC (full-width ＡＢＣ and half-width ｶﾅ become ABC and カナ), case folded, without spaces,
    punctuation, symbols (emoji too) or control characters, with each run of one character
    (ーーー, www, !!!) cut to one and without a long-vowel mark at the end (それなー is それな〜, whose
    〜 is punctuation). A text of nothing but symbols (👍, ！！) keeps its symbols."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(c for c in folded if unicodedata.category(c)[0] not in "PZSC")
    if not kept:
        kept = "".join(c for c in folded if not c.isspace() and unicodedata.category(c)[0] != "C")
    kept = _REPEATS.sub(r"\1", kept)
    return kept.rstrip("ー") or kept


@dataclass(frozen=True)
class ComparableText:
    """A text ready to compare: its normal form and that form's character trigrams."""

    norm: str
    grams: frozenset[str]

    @classmethod
    def of(cls, text: str) -> ComparableText:
        norm = normalise(text)
        return cls(norm, frozenset(norm[i:i + NGRAM] for i in range(len(norm) - NGRAM + 1)))


def near_copy(a: ComparableText, b: ComparableText) -> bool:
    """True when one text is a copy of the other, in whole or inside it (module docstring)."""
    if not a.norm or not b.norm:
        return False
    if a.norm == b.norm:
        return True
    short, long = (a, b) if len(a.norm) <= len(b.norm) else (b, a)
    if len(short.norm) < MIN_CHARS:
        return False
    if short.norm in long.norm:
        return True
    return len(short.grams & long.grams) >= CONTAINMENT * len(short.grams)


class TextIndex:
    """Texts filed under keys, for "which keys hold a near copy of this text?" without comparing the
    text with every one: only texts with the same normal form or a trigram in common can be copies
    (a text of MIN_CHARS or more has a trigram, and containment needs one shared). Chats say the same
    few things over and over, so each normal form is filed once, with all its keys."""

    def __init__(self) -> None:
        self._entries: list[tuple[ComparableText, set]] = []
        self._by_norm: dict[str, int] = {}
        self._by_gram: dict[str, list[int]] = {}
        self._answers: dict[str, frozenset] = {}

    def add(self, key: object, text: ComparableText) -> None:
        if not text.norm:
            return
        self._answers.clear()
        n = self._by_norm.get(text.norm)
        if n is None:
            n = self._by_norm[text.norm] = len(self._entries)
            self._entries.append((text, set()))
            for gram in text.grams:
                self._by_gram.setdefault(gram, []).append(n)
        self._entries[n][1].add(key)

    def keys_with_copies_of(self, text: ComparableText) -> frozenset:
        if text.norm not in self._answers:
            found: set = set()
            same = self._by_norm.get(text.norm)
            if same is not None:
                found |= self._entries[same][1]
            if len(text.norm) >= MIN_CHARS:
                for n in {n for gram in text.grams for n in self._by_gram.get(gram, ())}:
                    if near_copy(text, self._entries[n][0]):
                        found |= self._entries[n][1]
            self._answers[text.norm] = frozenset(found)
        return self._answers[text.norm]
