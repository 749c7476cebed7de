"""The privacy check: does a reply repeat a training message word for word?

A tuned model that recites what someone wrote in the chat (an address, a confession, a friend's
message) leaks it to whoever talks to the bot. A reply "repeats a training message" when it
shares a substring of at least `min_chars` characters (20 by default: longer than a set phrase
like おはようございます！, short enough to catch a recited sentence) with any text in train.jsonl,
the persona's targets and every speaker's context turns alike. The real replies get the same
check: people repeat themselves, and that is the baseline a system is read against.

It must hold a big export (hundreds of thousands of distinct texts) in seconds and little memory,
so the index keeps no text-by-window table, only:
- the hashes of short windows ("seeds", `min_chars - stride + 1` characters) taken at every
  `stride`-th position of each text. Any common substring of `min_chars` characters contains one
  of them (its `stride` possible start positions hold a multiple of `stride`), so checking every
  position of a reply against the set misses no repeat; and
- all texts joined into one string, searched (at C speed) only for the seeds of the few replies
  that hit, to find the text, extend the match and confirm it is `min_chars` long. A seed hit that
  does not extend that far (a shorter common phrase, a hash collision) is no repeat.

Measured (one core of a shared machine): 200,000 distinct texts of median 18 characters index in
about 1.1 s into 23 MiB (47 MiB at the peak of building); of median 54 characters, 2.5 s and 85 MiB
(155 MiB peak), most of it the joined text itself. Checking 256 replies takes under half a second.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from .style import normalize_reply

_SEPARATOR = "\x00"  # between texts in the joined string: chat text never holds it, so no match runs across texts
# A seed that occurs in more texts than this (a pasted boilerplate) is followed only this far; the reply's other seeds
# still find a longer repeat.
_MAX_OCCURRENCES_PER_SEED = 200


@dataclass(frozen=True)
class VerbatimMatch:
    text: str  # the common substring
    speaker: str  # who wrote the training text it was found in


class TrainIndex:
    """Every distinct training text, indexed to tell whether a reply shares `min_chars` characters with one."""

    def __init__(self, texts: dict[str, str], min_chars: int = 20) -> None:
        """`texts`: text -> speaker. Texts shorter than `min_chars` cannot hold a repeat and are left out."""
        if min_chars < 2:
            raise ValueError("min_chars must be at least 2")
        self.min_chars = min_chars
        # A longer stride stores fewer hashes but leaves shorter seeds, which hit more shorter common phrases
        # (confirmed and dropped at search cost); a quarter of the window keeps both small.
        self._stride = max(1, min_chars // 4)
        self._seed = min_chars - self._stride + 1
        speakers: dict[str, int] = {}
        self._speaker_names: list[str] = []
        self._speaker_of = array("l")
        self._starts = array("q")
        hashes: list[int] = []
        kept: list[str] = []
        position = 1  # the joined string starts with a separator
        seed, stride = self._seed, self._stride
        for text, speaker in texts.items():
            if len(text) < min_chars:
                continue
            if speaker not in speakers:
                speakers[speaker] = len(self._speaker_names)
                self._speaker_names.append(speaker)
            self._speaker_of.append(speakers[speaker])
            self._starts.append(position)
            position += len(text) + 1
            kept.append(text)
            hashes.extend([hash(text[i : i + seed]) for i in range(0, len(text) - seed + 1, stride)])
        hashes.sort()
        self._seed_hashes = array("q", hashes)  # str hashes are 64-bit signed (Py_hash_t); stable within a process
        del hashes
        self._joined = _SEPARATOR + _SEPARATOR.join(kept) + _SEPARATOR

    def _has_seed(self, window: str) -> bool:
        h = hash(window)
        i = bisect_left(self._seed_hashes, h)
        return i < len(self._seed_hashes) and self._seed_hashes[i] == h

    @classmethod
    def from_samples(cls, samples: Iterable[dict], min_chars: int = 20) -> TrainIndex:
        """Prepared samples (train.jsonl rows): targets as the persona's texts, context turns as their speaker's."""
        texts: dict[str, str] = {}
        for sample in samples:
            target = sample.get("target")
            if target:
                texts.setdefault(target, sample.get("persona", ""))
            for turn in sample.get("context", ()):
                text = turn.get("text")
                if text:
                    texts.setdefault(text, turn.get("speaker", ""))
        return cls(texts, min_chars)

    def __len__(self) -> int:
        """Texts indexed (the distinct ones long enough to hold a repeat)."""
        return len(self._starts)

    def find(self, reply: str, min_chars: int | None = None) -> VerbatimMatch | None:
        """The longest common substring found between the reply and a training text, if `min_chars` long or more."""
        wanted = self.min_chars if min_chars is None else min_chars
        if wanted < self.min_chars:
            raise ValueError(f"this index finds repeats of {self.min_chars}+ characters, not {wanted}")
        reply = normalize_reply(reply).replace(_SEPARATOR, "")
        seed, joined = self._seed, self._joined
        best_length, best_start, best_text = 0, 0, -1
        covered_to = 0  # once a repeat is found, seeds inside it add nothing worth a search
        for i in range(len(reply) - seed + 1):
            if i + seed <= covered_to:
                continue
            window = reply[i : i + seed]
            if not self._has_seed(window):
                continue
            found = joined.find(window)
            for _ in range(_MAX_OCCURRENCES_PER_SEED):
                if found < 0:
                    break
                left = 0
                while i - left > 0 and reply[i - left - 1] == joined[found - left - 1]:
                    left += 1
                right = i + seed
                end = found + seed
                while right < len(reply) and reply[right] == joined[end]:
                    right += 1
                    end += 1
                length = right - (i - left)
                if length > best_length:
                    best_length, best_start = length, i - left
                    best_text = bisect_right(self._starts, found) - 1
                found = joined.find(window, found + 1)
            if best_length >= wanted:
                covered_to = best_start + best_length
        if best_length < wanted:
            return None
        speaker = self._speaker_names[self._speaker_of[best_text]]
        return VerbatimMatch(reply[best_start : best_start + best_length], speaker)
