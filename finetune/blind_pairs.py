"""The blind test's pairs: a context, the real reply and one system's, chosen so that reading cannot solve it.

report.html shows each pair's context and two replies and asks which one the persona really wrote.
Contexts are the persona's own conversations, so the real reply of one sample is often a turn in the
context of the next sample of the same conversation, or the same catchphrase or greeting comes back
in another conversation. Drawn at random, most pairs of a small test could be solved by reading the
other pairs (24 to 29 of 40 real replies sat in another pair's context on tests/support/leaky_chats.py's
export). So:

- no reply shown in a pair, real or generated, is a near copy (near_copy.py) of any text shown in
  another pair: its context turns or its two replies. A real reply seen elsewhere gives the answer
  away; a generated one seen in a real context passes for real; a reply shown twice is answered the
  second time by memory, since the page tells the answer after each vote. A sample's context holds
  only turns before its reply (samples.py), so it has no later turns that could repeat the reply;
  an earlier turn the reply repeats is the situation both replies answer, not a clue;
- a generated reply equal to the real one is left out: there is nothing to tell apart;
- pairs come from different conversations first: each round takes at most one more pair from each
  conversation, in a seeded random order, until the test holds `limit` pairs;
- systems take turns: each pair goes to the system with the fewest pairs so far whose reply fits,
  but a reply that other samples show (a greeting, another sample's real reply) is tried last, since
  choosing it would shut all of them out.

What was left out, and why, goes into report.json's `blind_selection`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

from .near_copy import CONTAINMENT, MIN_CHARS, NGRAM, ComparableText, TextIndex

BLIND_PAIRS = 40  # enough for a verdict that means something, few enough to finish over a coffee

SAME_REPLY = "same_reply"  # the system said what the persona said
SHOWN_ELSEWHERE = "shown_elsewhere"  # a reply would repeat, or be repeated by, text of a pair already chosen
NOT_NEEDED = "not_needed"  # the test was full before the sample's turn came


@dataclass
class _Pair:
    index: int
    system: str
    context: list[ComparableText]
    replies: tuple[ComparableText, ComparableText]  # real, generated


@dataclass
class _Choice:
    """Pairs chosen so far, their texts indexed: what every later pair is checked against."""

    chosen: list[_Pair] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)
    shown: TextIndex = field(default_factory=TextIndex)  # every text a chosen pair shows
    replies: TextIndex = field(default_factory=TextIndex)  # the chosen pairs' replies

    def repeats(self, pair: _Pair) -> bool:
        """A reply of `pair` is a near copy of text a chosen pair shows, or a chosen reply is in its context."""
        return (any(self.shown.keys_with_copies_of(reply) for reply in pair.replies)
                or any(self.replies.keys_with_copies_of(text) for text in pair.context))

    def add(self, pair: _Pair) -> None:
        self.chosen.append(pair)
        for text in [*pair.context, *pair.replies]:
            self.shown.add(pair.index, text)
        for reply in pair.replies:
            self.replies.add(pair.index, reply)


class _Pool:
    """The samples and replies the pairs are chosen from, each text made comparable once."""

    def __init__(self, samples: list[dict], replies: dict[str, list[str]]):
        self.samples = samples
        self.replies = replies
        self.names = list(replies)
        self.known_conversations = bool(samples) and all("conversation" in s for s in samples)
        # eval.jsonl from before `conversation` was written: every sample counts as its own conversation.
        self.conversation = [s["conversation"] if self.known_conversations else ("sample", i)
                             for i, s in enumerate(samples)]
        self.context = [[ComparableText.of(str(t.get("text", ""))) for t in s["context"]] for s in samples]
        self.real = [ComparableText.of(s["target"]) for s in samples]

    def choose(self, order: list[int], limit: int) -> _Choice:
        """Greedy, in `order`, each round taking at most one more pair from each conversation."""
        choice = _Choice()
        per_system: Counter[str] = Counter()
        per_conversation: Counter = Counter()
        pending = order if self.names else []
        round_ = 0
        while pending and len(choice.chosen) < limit:
            later = []
            for position, i in enumerate(pending):
                if len(choice.chosen) >= limit:
                    later += pending[position:]
                    break
                if per_conversation[self.conversation[i]] > round_:
                    later.append(i)  # its conversation has its pair for this round
                    continue
                pair, reason = self._pair(i, choice, per_system)
                if pair is None:
                    choice.left_out[reason] += 1
                    continue
                choice.add(pair)
                per_system[pair.system] += 1
                per_conversation[self.conversation[i]] += 1
            pending = later
            round_ += 1
        choice.left_out[NOT_NEEDED] += len(pending) + (0 if self.names else len(self.samples))
        return choice

    def _pair(self, i: int, choice: _Choice, per_system: Counter) -> tuple[_Pair | None, str]:
        """Sample i's pair with a system whose reply fits, or why none fits. Systems whose reply is found
        in no other sample come first, the one with the fewest pairs among them: a reply that other
        samples show ("おつかれ〜", or a real reply of another sample) would shut all of them out."""
        real = self.samples[i]["target"]
        generated = {name: ComparableText.of(self.replies[name][i]) for name in self.names}

        def clashes(name: str) -> bool:
            return bool(self._shown.keys_with_copies_of(generated[name]) - {i})

        reason = SAME_REPLY
        for name in sorted(self.names, key=lambda n: (clashes(n), per_system[n], self.names.index(n))):
            if self.replies[name][i].strip() == real.strip():
                continue
            pair = _Pair(i, name, self.context[i], (self.real[i], generated[name]))
            if choice.repeats(pair):
                reason = SHOWN_ELSEWHERE
                continue
            return pair, ""
        return None, reason

    @cached_property
    def _shown(self) -> TextIndex:
        """Every text any sample would show (context and real reply), filed under the sample."""
        shown = TextIndex()
        for i, real in enumerate(self.real):
            shown.add(i, real)
            for text in self.context[i]:
                shown.add(i, text)
        return shown

    def repeat_counts(self) -> list[int]:
        """For each sample, how many others its real reply and context clash with, whatever the systems say:
        its real reply shown in theirs, or theirs in its context. A greeting every conversation opens with
        clashes with dozens; a reply said once, with the few samples after it in its conversation."""
        reals = TextIndex()
        for i, real in enumerate(self.real):
            reals.add(i, real)
        counts = []
        for i, real in enumerate(self.real):
            clashes = set(self._shown.keys_with_copies_of(real))
            for text in self.context[i]:
                clashes |= reals.keys_with_copies_of(text)
            counts.append(len(clashes - {i}))
        return counts


def choose_blind_pairs(samples: list[dict], replies: dict[str, list[str]], seed: int,
                       limit: int = BLIND_PAIRS) -> tuple[list[dict], dict]:
    """(pairs for report.json's `blind`, what the choice kept and left out for `blind_selection`)."""
    rng = random.Random(f"blind-{seed}")
    order = list(range(len(samples)))
    rng.shuffle(order)
    pool = _Pool(samples, replies)
    choice, how = pool.choose(order, limit), "random"
    if len(choice.chosen) < min(limit, len(samples)) and pool.names:
        # Short of pairs: a reply that comes back often blocks every pair that shows it. Trying the
        # samples with the fewest clashes first keeps more; with plenty of samples the random order
        # stays, so the pairs are not skewed towards unusual replies.
        counts = pool.repeat_counts()
        fewest_first = sorted(order, key=counts.__getitem__)  # stable: ties keep the random order
        second = pool.choose(fewest_first, limit)
        if len(second.chosen) > len(choice.chosen):
            choice, how = second, "fewest_repeats_first"

    pairs = []
    for pair in choice.chosen:
        sample = samples[pair.index]
        real, generated = sample["target"], replies[pair.system][pair.index]
        real_first = rng.random() < 0.5
        pairs.append({
            "id": sample.get("id") or f"sample-{pair.index}", "system": pair.system, "context": sample["context"],
            "first": real if real_first else generated, "second": generated if real_first else real,
            "real_is": "first" if real_first else "second",
        })
    selection = {
        "samples": len(samples),
        "limit": limit,
        "pairs": len(pairs),
        "order": how,
        "conversations": len({pool.conversation[p.index] for p in choice.chosen}) if pool.known_conversations else None,
        "systems": {name: sum(p.system == name for p in choice.chosen) for name in pool.names},
        "left_out": {key: choice.left_out[key] for key in (SAME_REPLY, SHOWN_ELSEWHERE, NOT_NEEDED)},
        "near_copy": {"min_chars": MIN_CHARS, "ngram": NGRAM, "containment": CONTAINMENT},
    }
    return pairs, selection
