"""A reply's text as its tokens come: what is new, where it stops, and what must wait.

The text is the caller's `text_of(ids)` of all the reply's ids (bunshin's: the tokenizer's decode, rinna's `<NL>`
as a newline, byte-fallback debris dropped), worked out again when a token comes: replies are a few hundred tokens
at most, and decoding them whole never mis-joins a character split over two byte tokens (an incomplete one decodes
as U+FFFD, which `text_of` drops, and appears whole a token later). What was sent is never taken back, so text that
may still turn out to be the start of a stop is held:

- a stop string: the longest end of the text that is the start of one (`"\\n"` held while `"\\n健太:"` may follow);
- the stop rule (a turn the model begins in someone's name, `\\nname: `): a line that has begun and may still
  become one is held until it is longer than a name can be, or has a colon that did not end the reply;
- a U+FFFD at the very end (an incomplete character, where `text_of` keeps it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .request import EngineRequest

# The stop rule's turns start with a name of at most this many characters after a newline (finetune.prompt's
# _TURN_START: 1 to 40 characters, then ": "): a new line is held until it has grown past that.
RULE_HOLD_CHARS = 42


def first_stop(text: str, stops: Sequence[str], stop_rule: Callable[[str], int | None] | None = None,
               start: int = 0) -> int | None:
    """Where a reply's text ends: the first of its stop strings found from `start`, or the stop rule's cut (a turn
    begun in someone's name), whichever comes first; None where neither is in it. The one rule for the slot engine
    (as tokens come), plain `generate()` (finetune/generation.py) and the remote engine's finished replies."""
    cuts = [at for at in (text.find(stop, start) for stop in stops) if at != -1]
    if stop_rule is not None:
        at = stop_rule(text)
        if at is not None:
            cuts.append(at)
    return min(cuts) if cuts else None


class Detokenizer:
    def __init__(self, request: EngineRequest, text_of: Callable[[list[int]], str]) -> None:
        self.request = request
        self.text_of = text_of
        self.stops = request.sampling.stop
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already given out
        self.text = ""  # the text of `ids`, when it was last worked out
        self.stopped_at: int | None = None  # where the text ends, once a stop was found

    @property
    def watches_text(self) -> bool:
        """Whether each token's text must be worked out (streamed, or stop strings to find)."""
        return self.request.stream or bool(self.stops)

    def add(self, token: int, piece_has_trigger: bool) -> tuple[str, bool]:
        """Take one generated token (not an end token); (new text to send, whether the reply stopped).
        `piece_has_trigger`: the token's own text holds a character of the stop rule's triggers."""
        self.ids.append(token)
        rule_due = self.request.stop_rule is not None and piece_has_trigger
        if not (self.watches_text or rule_due):
            return "", False
        self.text = self.text_of(self.ids)
        cut = self._stop_in(self.text, check_rule=rule_due or self.request.stream)
        if cut is not None:
            self.stopped_at = cut
            return self._take(cut), True
        if not self.request.stream:
            return "", False
        return self._take(self._safe_end(self.text)), False

    def finish(self) -> tuple[str, str]:
        """At the end (an end token, max_tokens, or a stop): (the text not yet sent, the whole reply's text)."""
        if self.stopped_at is None:
            self.text = self.text_of(self.ids)
            cut = self._stop_in(self.text, check_rule=True)
            self.stopped_at = len(self.text) if cut is None else cut
        whole = self.text[: self.stopped_at]
        return self._take(self.stopped_at), whole

    # -- where the text stops, and what is safe to send ----------------------------------------

    def _stop_in(self, text: str, check_rule: bool) -> int | None:
        # A stop string may span the text sent and the new: look back as far as the longest one reaches.
        start = max(0, self.sent - max(map(len, self.stops)) + 1) if self.stops else 0
        cut = first_stop(text, self.stops, self.request.stop_rule if check_rule else None, start)
        return None if cut is None else max(cut, self.sent)  # what was sent stays sent

    def _safe_end(self, text: str) -> int:
        """How far the text may be sent now without anything that could still become a stop."""
        full = len(text) - 1 if text.endswith("\ufffd") else len(text)
        end = full
        for stop in self.stops:
            for size in range(min(len(stop) - 1, full), 0, -1):
                if text.endswith(stop[:size], 0, full):
                    end = min(end, full - size)
                    break
        if self.request.stop_rule is not None:
            line = text.rfind("\n", 0, full)
            if line != -1 and _may_become_turn(text[line + 1 : full]):
                end = min(end, line)
        return max(end, self.sent)

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


def _may_become_turn(line: str) -> bool:
    """Whether a line begun may still turn into `name: ` (a name of 1 to 40 characters without a colon)."""
    if "：" in line:
        return False
    colon = line.find(":")
    if colon == -1:
        return len(line) <= RULE_HOLD_CHARS - 2
    return colon == len(line) - 1 and 1 <= colon <= RULE_HOLD_CHARS - 2  # the space after the colon is still to come
