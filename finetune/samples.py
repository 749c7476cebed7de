"""From chat records to training samples. Knows nothing of file formats.

    records of one chat ─► conversations (split on silence) ─► turns (bursts merged)
        ─► one sample per persona turn: the earlier turns as context, the reply as target

Rules that keep the data honest:
- placeholders ([スタンプ], attachments) and system lines never become targets;
  a placeholder stays in the context as its text, since "[写真]" is part of what was said;
- each message is redacted once, so counts are not multiplied by every context it appears in;
- the split is by time and by whole conversation: eval holds the latest conversations, so no
  reply in eval has its neighbours in train.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo

from .records import SYSTEM, TEXT, ChatRecord


@dataclass(frozen=True)
class SampleOptions:
    session_gap_s: float = 3 * 3600
    max_context_turns: int = 10
    max_context_chars: int = 1500
    max_turn_chars: int = 1000
    min_context_turns: int = 0
    eval_fraction: float = 0.05


@dataclass
class Turn:
    speaker: str
    time: datetime  # aware, UTC
    text: str  # everything the speaker said in the burst, placeholders included (the context view)
    typed: str  # only what was typed: the part that may become a target
    last: datetime  # time of the burst's latest message


@dataclass
class Conversation:
    source: str  # where it came from, for the sample's provenance
    start: datetime  # aware, UTC
    turns: list[Turn]
    solo: bool = False  # only the persona speaks (a data package): no context to learn from


@dataclass
class BuildStats:
    persona_turns: int = 0
    placeholder_only: int = 0
    too_long: int = 0
    too_little_context: int = 0
    duplicates: int = 0
    excluded_messages: int = 0
    system_lines: int = 0


def to_utc(t: datetime, local: tzinfo) -> datetime:
    """Exports without an offset (LINE) are in the exporter's local time; make every time comparable."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=local)
    return t.astimezone(timezone.utc)


def split_conversations(
    records: Iterable[ChatRecord],
    *,
    source: str,
    rename: Callable[[str], str],
    excluded: frozenset[str],
    gap_s: float,
    burst_gap_s: float,
    local: tzinfo,
    redact: Callable[[str], str],
    stats: BuildStats,
) -> list[Conversation]:
    """One chat's records -> conversations of turns. `rename` maps aliases to the persona's name.

    A speaker's consecutive messages form one turn while each follows the last within
    `burst_gap_s`; after a longer pause, even with nobody else speaking, a new turn starts
    (a follow-up 40 minutes later is not part of the same reply).
    """
    conversations: list[Conversation] = []
    turns: list[Turn] = []
    last_time: datetime | None = None
    for record in records:
        if record.kind == SYSTEM:
            stats.system_lines += 1
            continue
        if record.speaker in excluded:
            stats.excluded_messages += 1
            continue
        if record.time is None:
            continue  # no format we read lacks times; keep the guard for hand-made inputs
        time = to_utc(record.time, local)
        if last_time is not None and (time - last_time).total_seconds() > gap_s and turns:
            conversations.append(Conversation(source, turns[0].time, turns))
            turns = []
        last_time = time
        speaker = rename(record.speaker)
        # Redact each message once (placeholders too: `[位置情報] 住所` carries an address).
        said = redact(record.text.rstrip())
        typed = said if record.kind == TEXT else ""
        if turns and turns[-1].speaker == speaker and (time - turns[-1].last).total_seconds() <= burst_gap_s:
            turn = turns[-1]
            turn.last = time
            turn.text = f"{turn.text}\n{said}" if turn.text else said
            if typed:
                turn.typed = f"{turn.typed}\n{typed}" if turn.typed else typed
        else:
            turns.append(Turn(speaker, time, said, typed, time))
    if turns:
        conversations.append(Conversation(source, turns[0].time, turns))
    for conv in conversations:
        # Only the persona speaks (a data package, a memo chat): earlier turns are no context for a reply.
        conv.solo = len({t.speaker for t in conv.turns}) == 1
    return conversations


@dataclass
class Sample:
    conversation: int  # index into the conversations list, for the split
    time: datetime
    source: str
    context: list[dict]
    target: str
    key: str = field(default="")
    # When the sample's conversation began: its memory may only hold what was said before (person_memory.py).
    conversation_start: datetime | None = None

    def as_json(self, persona: str) -> dict:
        return {
            "id": self.key[:16],
            "persona": persona,
            "time": self.time.isoformat(),
            "conversation_start": (self.conversation_start or self.time).isoformat(),
            "source": self.source,
            "conversation": self.conversation,  # which conversation of the inputs: the blind test spreads over them
            "context": self.context,
            "target": self.target,
        }


def _clip(text: str, limit: int) -> str:
    # Keep a long context turn's end: the part right before the reply is what the reply answers.
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def build_samples(conversations: list[Conversation], persona: str, options: SampleOptions, stats: BuildStats) -> list[Sample]:
    samples: list[Sample] = []
    seen: set[str] = set()
    for index, conv in enumerate(conversations):
        turns = conv.turns
        for position, turn in enumerate(turns):
            if turn.speaker != persona:
                continue
            stats.persona_turns += 1
            if not turn.typed.strip():
                stats.placeholder_only += 1
                continue
            if len(turn.typed) > options.max_turn_chars:
                stats.too_long += 1
                continue
            context: list[dict] = []
            if not conv.solo:
                budget = options.max_context_chars
                for earlier in reversed(turns[max(0, position - options.max_context_turns) : position]):
                    text = _clip(earlier.text, options.max_turn_chars)
                    if len(text) > budget:
                        break
                    budget -= len(text)
                    context.append({"speaker": earlier.speaker, "text": text})
                context.reverse()
            if len(context) < options.min_context_turns:
                stats.too_little_context += 1
                continue
            key = hashlib.sha256(json.dumps([context, turn.typed], ensure_ascii=False).encode()).hexdigest()
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
            samples.append(Sample(index, turn.time, conv.source, context, turn.typed, key, conv.start))
    return samples


def split_by_time(samples: list[Sample], conversations: list[Conversation], eval_fraction: float) -> tuple[list[Sample], list[Sample]]:
    """The latest whole conversations go to eval until it holds `eval_fraction` of the samples."""
    if eval_fraction <= 0 or not samples:
        return samples, []
    per_conversation = Counter(s.conversation for s in samples)
    if len(per_conversation) < 2:
        return samples, []  # one conversation cannot be split without leaking; stats say so
    wanted = max(1, round(eval_fraction * len(samples)))
    eval_conversations: set[int] = set()
    taken = 0
    for index in sorted(per_conversation, key=lambda i: conversations[i].start, reverse=True):
        if taken >= wanted or len(eval_conversations) + 1 >= len(per_conversation):
            break
        eval_conversations.add(index)
        taken += per_conversation[index]
    train = [s for s in samples if s.conversation not in eval_conversations]
    held_out = [s for s in samples if s.conversation in eval_conversations]
    return train, held_out
